"""The per-task rule of an ensemble: how K members' outputs combine into one, and which loss scores it.

One rule per ``problem_type`` (transformers' names), chosen from the members' config as transformers' own
``*ForSequenceClassification`` heads choose their loss:

==============================  ==========================================  ======================  ==========
problem type                    ensemble ``logits``                          what the pipeline shows  loss
==============================  ==========================================  ======================  ==========
single_label_classification     ``log mean_k softmax(z_k)``                  mean member softmax      CE
multi_label_classification      ``logit(mean_k sigmoid(z_k))``              mean member sigmoid      BCE
regression                      ``mean_k z_k`` (``spread``: std over k)       mean member value        MSE
==============================  ==========================================  ======================  ==========

Each combined output is in the members' own form (logits whose softmax / sigmoid is the mean probability,
or a value), so arg-max, ``Trainer.evaluate``, pipelines and losses need no special case. ``problem_type``
None means single-label for ``num_labels > 1`` and regression for ``num_labels == 1`` (as the members' own
forward decides; the ensemble's config then names it, so a pipeline shows the mean value, not a sigmoid).

Token classification (``*ForTokenClassification``, always single-label: transformers trains those heads with
CE whatever ``problem_type`` says) is the single-label rule at every position: member logits [K, B, T, C]
give [B, T, C], and the loss is the CE of every token whose label is not ``-100``, averaged over them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SINGLE_LABEL", "MULTI_LABEL", "REGRESSION", "PROBLEM_TYPES", "problem_type_of", "combine", "loss"]

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"
PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL, REGRESSION)


def problem_type_of(config) -> str:
    """The members' problem type from their config (``problem_type``, else from ``num_labels``)."""
    problem_type = getattr(config, "problem_type", None)
    if problem_type is None:
        return REGRESSION if getattr(config, "num_labels", 2) == 1 else SINGLE_LABEL
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"Unknown problem_type {problem_type!r}; hf-ens knows {list(PROBLEM_TYPES)}.")
    return problem_type


def log_mean_softmax(member_logits: torch.Tensor) -> torch.Tensor:
    """``log(mean_k softmax(z_k))`` over the first (member) dimension, any trailing shape ([K, B, C] or a
    causal LM's [K, B, T, V]), computed stably as ``logsumexp - log K``: the ensemble's single-label and
    next-token rule, written once."""
    return torch.logsumexp(torch.log_softmax(member_logits, dim=-1), dim=0) - math.log(member_logits.shape[0])


def combine(member_logits: torch.Tensor, problem_type: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ensemble output [B, C], spread [B, C] or None) from member outputs [K, B, C], in float32 (per token:
    [K, B, T, C] gives [B, T, C], the same rule at every position).

    Single-label: log of the mean softmax. Multi-label: the logit of the mean sigmoid, computed stably as
    ``logsumexp_k logsigmoid(z_k) - logsumexp_k logsigmoid(-z_k)`` (the ``log K`` cancels), so its sigmoid
    is the mean member probability. Regression: the mean value, and the members' standard deviation (over
    k, population form: 0 for one member) as the spread.
    """
    z = member_logits.float()
    if problem_type == SINGLE_LABEL:
        return log_mean_softmax(z), None
    if problem_type == MULTI_LABEL:
        logsig = nn.functional.logsigmoid
        return torch.logsumexp(logsig(z), dim=0) - torch.logsumexp(logsig(-z), dim=0), None
    if problem_type == REGRESSION:
        return z.mean(dim=0), z.std(dim=0, correction=0)
    raise ValueError(f"Unknown problem_type {problem_type!r}; hf-ens knows {list(PROBLEM_TYPES)}.")


def loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """The members' own loss, applied to the combined output: CE, BCE on the mean probability, or MSE.

    Single-label per token (logits [B, T, C], labels [B, T]): CE over every token whose label is not -100,
    averaged over those tokens, as transformers' ``*ForTokenClassification`` computes it.

    Labels are checked first, so a wrong kind of label gives a message, not an index or dtype error from
    inside torch.
    """
    labels = labels.to(logits.device)
    if problem_type == SINGLE_LABEL:
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise ValueError(
                "Single-label ensemble got non-integer labels; class ids are expected (a regression or "
                "multi-label model needs problem_type='regression' / 'multi_label_classification')."
            )
        if logits.ndim > 2:  # per position (token classification): the same rule on every token
            if tuple(labels.shape) != tuple(logits.shape[:-1]):
                raise ValueError(
                    f"Token-level ensemble: expected labels of shape {tuple(logits.shape[:-1])} (one class "
                    f"id per token, -100 for tokens not scored), got {tuple(labels.shape)}."
                )
            logits, labels = logits.flatten(0, -2), labels.flatten()
        labels = labels.long().reshape(-1)
        if labels.numel() != logits.shape[0]:
            raise ValueError(
                f"Single-label ensemble: expected {logits.shape[0]} class ids, got labels of shape "
                f"{tuple(labels.shape)}."
            )
        # -100 (transformers' "not scored", e.g. padding or sub-word continuations) is ignored: the mean is
        # over scored labels, as in every transformers *ForSequenceClassification / *ForTokenClassification
        return nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    if problem_type == MULTI_LABEL:
        if labels.shape != logits.shape:
            raise ValueError(
                f"Multi-label ensemble: labels must be 0/1 per label, shape {tuple(logits.shape)}; got "
                f"{tuple(labels.shape)}."
            )
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    if problem_type == REGRESSION:
        if labels.numel() != logits.numel():
            raise ValueError(
                f"Regression ensemble: expected {logits.numel()} targets (shape {tuple(logits.shape)}), got "
                f"labels of shape {tuple(labels.shape)}."
            )
        return nn.functional.mse_loss(logits, labels.float().reshape(logits.shape))
    raise ValueError(f"Unknown problem_type {problem_type!r}; hf-ens knows {list(PROBLEM_TYPES)}.")
