"""The task head of a transformers model: the part that is new when a checkpoint meets a new task."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

logger = logging.get_logger(__name__)


def task_heads(model: PreTrainedModel) -> list[torch.nn.Module]:
    """Top-level modules outside the base model (e.g. the `classifier` of ViT, Swin, ResNet, BERT)."""
    prefix = getattr(model, "base_model_prefix", "")
    heads = [module for name, module in model.named_children() if name != prefix]
    if not isinstance(model, PreTrainedModel) or not prefix or not heads:
        raise ValueError(
            f"{type(model).__name__} has no task head outside its base model: re-drawing a head needs a "
            "PreTrainedModel with a `base_model_prefix` and a head (e.g. *ForImageClassification)."
        )
    return heads


def _storage(p: torch.Tensor) -> int:
    """Where a tensor's memory lives: two parameters tied under any names share it."""
    return p.untyped_storage().data_ptr()


@torch.no_grad()
def reinit_task_head(model: PreTrainedModel) -> PreTrainedModel:
    """Re-draw the task head in place with PyTorch's default initialisation, from the current torch RNG state.

    As the paper's ``change_head`` (a fresh ``nn.Linear`` with PyTorch's default init): every head layer is
    reset with its public ``reset_parameters()``, no private transformers hook involved. Seed first
    (`transformers.set_seed(seed + k)`) for a reproducible draw. A head holding parameters that no layer with
    ``reset_parameters`` owns cannot be re-drawn this way and raises ValueError.

    A head layer that shares memory with the body (the output projection of a language model with
    ``tie_word_embeddings=True`` IS the input embedding) is kept: re-drawing it would re-draw the embedding
    too. Sharing is judged by storage, not by names; that the layer was kept is logged once.
    """
    heads = task_heads(model)
    body = {_storage(p) for p in getattr(model, model.base_model_prefix).parameters()}
    for head in heads:
        layers = [m for m in head.modules() if callable(getattr(m, "reset_parameters", None))]
        covered = {id(p) for m in layers for p in m.parameters(recurse=False)}
        stray = [name for name, p in head.named_parameters() if id(p) not in covered]
        if stray:
            raise ValueError(
                f"Cannot re-draw the head of {type(model).__name__}: parameters {stray[:5]} belong to no "
                "layer with reset_parameters()."
            )
        for layer in layers:
            if any(_storage(p) in body for p in layer.parameters(recurse=False)):
                logger.warning_once(
                    f"{type(model).__name__}: head layer {type(layer).__name__} shares its weights with the "
                    "body (tied to the input embeddings); it is kept, not re-drawn (that would re-draw the "
                    "embeddings). Members started from this checkpoint differ by data order and dropout only."
                )
                continue
            layer.reset_parameters()
    return model
