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
    """Re-draw the task head with the model's own `_init_weights`, from the current torch RNG state.

    Seed first (`transformers.set_seed`) for a reproducible draw. transformers 5 marks loaded tensors as
    initialised and skips them in `_init_weights`; the marks are cleared so the head really is re-drawn.
    """
    for head in task_heads(model):
        for tensor in list(head.parameters()) + list(head.buffers()):
            if getattr(tensor, "_is_hf_initialized", False):
                tensor._is_hf_initialized = False
        for module in head.modules():
            module._is_hf_initialized = False
        head.apply(model._init_weights)
    return model
