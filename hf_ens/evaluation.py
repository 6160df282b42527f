"""Batch inference helpers shared by recipes, benchmarks and basin analysis."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    label_key: str = "labels",
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model` in eval mode over `batches` and return (logits [N, C] fp32 on CPU, labels [N]).

    The model's train/eval mode is restored afterwards, so this is safe to call in the middle of training.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    try:
        for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            inputs = {k: v.to(device) for k, v in batch.items() if k != label_key}
            all_logits.append(model(**inputs).logits.float().cpu())
            all_labels.append(batch[label_key].cpu())
    finally:
        model.train(was_training)
    if not all_logits:
        raise ValueError("predict_logits got no batches: the evaluation set is empty.")
    return torch.cat(all_logits), torch.cat(all_labels)
