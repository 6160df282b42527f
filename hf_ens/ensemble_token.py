"""`EnsembleForTokenClassification`: K token classifiers (NER, POS tagging...) of one architecture, one model.

The single-label rule of `hf_ens.tasks` at every position: ``logits`` [B, T, C] are
``log(mean_k softmax(z_k))`` per token (the causal-LM ensemble's per-position averaging, without the shift),
and ``loss`` with ``labels`` [B, T] is the cross-entropy of the averaged distribution over every token whose
label is not ``-100``, averaged over those tokens: what a single ``*ForTokenClassification`` computes, so
``Trainer.evaluate`` and the ``token-classification`` pipeline (``hf_ens.pipeline(model=ens)``) need no
special case.

Saved and loaded like every `hf_ens.EnsembleModel` (members, digests, Hub round trip): the repo root holds the
uniform soup as a plain ``AutoModelForTokenClassification`` checkpoint, and the tokenizer travels with it.
``EnsembleModel.from_members`` / ``from_pretrained`` of token classifiers return this class; LoRA members
(peft ``TOKEN_CLS``) on one base give `hf_ens.adapters_token.AdapterEnsembleForTokenClassification`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModelForTokenClassification, PreTrainedModel

from . import registry, tasks
from .ensemble import EnsembleConfig, EnsembleModel, EnsembleOutput
from .members import TOKEN_CLASSIFICATION_SUFFIXES

__all__ = ["EnsembleForTokenClassification", "check_token_task"]


def check_token_task(config: EnsembleConfig) -> None:
    """Refuse token classifiers whose labels the per-token softmax rule does not fit, before any work.

    transformers' ``*ForTokenClassification`` heads train with cross-entropy over ``num_labels`` classes
    whatever ``problem_type`` says, so only that reading is averaged: one label (which hf-ens would read as
    regression) or a multi-label / regression ``problem_type`` would average something the members never
    learned.
    """
    num_labels = config.num_labels
    problem_type = getattr(config.member_config, "problem_type", None) or config.problem_type
    if num_labels < 2 or problem_type not in (None, tasks.SINGLE_LABEL):
        raise ValueError(
            f"Token-classification members with num_labels={num_labels} and problem_type={problem_type!r} "
            "are not supported: transformers trains *ForTokenClassification heads with a softmax over >= 2 "
            "classes per token (cross-entropy, whatever problem_type says), which is what the ensemble "
            "averages. Use num_labels >= 2 and problem_type=None."
        )


class EnsembleForTokenClassification(EnsembleModel):
    """An `EnsembleModel` of *ForTokenClassification members: per token, the mean member probability.

    What `AutoModelForTokenClassification` (given an `EnsembleConfig`) and ``EnsembleModel.from_members`` /
    ``from_pretrained`` of token classifiers build. ``out.logits`` [B, T, C] are log-probabilities (their
    softmax is the mean member softmax), ``out.member_logits`` [K, B, T, C] the members' raw logits.
    """

    main_input_name = "input_ids"
    _member_suffix = "ForTokenClassification"
    _member_suffixes = TOKEN_CLASSIFICATION_SUFFIXES

    def __init__(
        self,
        config: EnsembleConfig,
        members: Sequence[PreTrainedModel] | None = None,
        processor: Any | None = None,
    ):
        if isinstance(config, EnsembleConfig) and config.member_config is not None:
            check_token_task(config)
        super().__init__(config, members=members, processor=processor)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EnsembleOutput | tuple:
        """`EnsembleModel.forward` with the token ids first; ``labels`` [B, T] hold one class id per token,
        ``-100`` where a token is not scored (padding, special tokens, sub-word continuations)."""
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            labels=labels,
            return_dict=return_dict,
            **kwargs,
        )


# `import hf_ens` makes the ensemble a token classifier transformers' Auto classes and pipelines know.
AutoModelForTokenClassification.register(EnsembleConfig, EnsembleForTokenClassification, exist_ok=True)
registry.register_task_class("full", TOKEN_CLASSIFICATION_SUFFIXES, EnsembleForTokenClassification)
