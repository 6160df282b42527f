"""`AdapterEnsembleForTokenClassification`: K LoRA token classifiers (peft ``TOKEN_CLS``) on ONE base.

The members of `hf_ens.adapters.AdapterEnsembleModel` (adapters on one shared base, each with its own head
in ``modules_to_save``) with the per-token behaviour of
`hf_ens.ensemble_token.EnsembleForTokenClassification`: mean member probability per token, token CE with
``-100`` ignored, the exact merged soup at the repo root. Built by ``AdapterEnsembleModel.from_adapters`` /
``EnsembleModel.from_pretrained`` when the base is a token classifier.
"""

from __future__ import annotations

from . import registry
from .adapters import PEFT_FORMAT, AdapterEnsembleModel
from .ensemble_token import EnsembleForTokenClassification, check_token_task
from .members import TOKEN_CLASSIFICATION_SUFFIXES

__all__ = ["AdapterEnsembleForTokenClassification"]


class AdapterEnsembleForTokenClassification(AdapterEnsembleModel, EnsembleForTokenClassification):
    """An `EnsembleForTokenClassification` whose K members are LoRA adapters on one shared base."""

    def __init__(self, config, peft_model, processor=None):
        check_token_task(config)
        AdapterEnsembleModel.__init__(self, config, peft_model, processor=processor)


registry.register_task_class(
    PEFT_FORMAT, TOKEN_CLASSIFICATION_SUFFIXES, AdapterEnsembleForTokenClassification
)
