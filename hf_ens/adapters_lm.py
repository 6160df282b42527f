"""`AdapterEnsembleModelForCausalLM`: K LoRA causal-LM members on ONE base that score and generate.

The member loop of `hf_ens.adapters.AdapterEnsembleModel` (one adapter active per member forward) with the
causal-LM behaviour of `hf_ens.ensemble_lm.EnsembleModelForCausalLM`: token NLL of the averaged distribution,
``generate()`` with one KV cache per member, the exact merged soup at the repo root. Built by
``AdapterEnsembleModel.from_adapters`` / ``EnsembleModel.from_pretrained`` when the base is a causal LM.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from .adapters import AdapterEnsembleModel
from .ensemble_lm import EnsembleModelForCausalLM

__all__ = ["AdapterEnsembleModelForCausalLM"]


class AdapterEnsembleModelForCausalLM(AdapterEnsembleModel, EnsembleModelForCausalLM):
    """An `EnsembleModelForCausalLM` whose K members are LoRA adapters on one shared base."""

    def __init__(self, config, peft_model, processor=None):
        AdapterEnsembleModel.__init__(self, config, peft_model, processor=processor)
        self._setup_generation()

    def _member_model(self, k: int) -> PreTrainedModel:
        return self.peft_model.get_base_model()
