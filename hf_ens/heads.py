"""The task head of a transformers model: the part that is new when a checkpoint meets a new task."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


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


@torch.no_grad()
def reinit_task_head(model: PreTrainedModel) -> PreTrainedModel:
    """Re-draw the task head in place with PyTorch's default initialisation, from the current torch RNG state.

    As the paper's ``change_head`` (a fresh ``nn.Linear`` with PyTorch's default init): every head layer is
    reset with its public ``reset_parameters()``, no private transformers hook involved. Seed first
    (`transformers.set_seed(seed + k)`) for a reproducible draw. A head holding parameters that no layer with
    ``reset_parameters`` owns cannot be re-drawn this way and raises ValueError.
    """
    for head in task_heads(model):
        layers = [m for m in head.modules() if callable(getattr(m, "reset_parameters", None))]
        covered = {id(p) for m in layers for p in m.parameters(recurse=False)}
        stray = [name for name, p in head.named_parameters() if id(p) not in covered]
        if stray:
            raise ValueError(
                f"Cannot re-draw the head of {type(model).__name__}: parameters {stray[:5]} belong to no "
                "layer with reset_parameters()."
            )
        for layer in layers:
            layer.reset_parameters()
    return model
