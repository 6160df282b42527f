"""Batch inference helpers shared by recipes, benchmarks and basin analysis.

One way to read a batch (`_split_batch`) and one predict loop (`_predict`) serve `predict_logits`,
`EnsembleModel.predict`, `evaluate_ensemble`, `make_accuracy_eval_fn` and `recompute_batchnorm`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from tqdm.auto import tqdm


def _split_batch(
    batch, model: torch.nn.Module, label_key: str = "labels"
) -> tuple[dict, torch.Tensor | None]:
    """(model inputs on the model's device, labels or None) from a dict batch (HF collators) or a tuple.

    Labels are `label_key`; with the default, a ``label`` column (`datasets`' usual name) counts too; every
    other key of a dict goes to the model. A tuple ``(inputs, labels)`` or a bare tensor feeds the model's
    ``main_input_name``; a longer tuple is refused (which element is the ``attention_mask``?), and so is a
    tuple for a model that takes ``input_ids``: it would carry no ``attention_mask`` and padding would be
    attended silently.
    """
    device = next(model.parameters()).device
    if isinstance(batch, Mapping):
        label_keys = ("labels", "label") if label_key == "labels" else (label_key,)
        labels = next((batch[k] for k in label_keys if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k not in label_keys}
    elif isinstance(batch, (tuple, list)):
        main = getattr(model, "main_input_name", "pixel_values")
        if len(batch) > 2 or main == "input_ids":
            raise TypeError(
                f"A {len(batch)}-element {type(batch).__name__} batch for a model taking {main!r}: a tuple "
                "carries only (inputs, labels), so an attention_mask (or any other input) would be dropped. "
                "Use dict batches, e.g. transformers.DataCollatorWithPadding."
            )
        inputs, labels = (
            {getattr(model, "main_input_name", "pixel_values"): batch[0]},
            batch[1] if len(batch) > 1 else None,
        )
    elif isinstance(batch, torch.Tensor):
        inputs, labels = {getattr(model, "main_input_name", "pixel_values"): batch}, None
    else:
        raise TypeError(f"Unsupported batch type {type(batch).__name__}: use dicts (HF collators) or tuples.")
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return inputs, labels


@torch.no_grad()
def _predict(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    empty_error: str,
    label_key: str = "labels",
    desc: str | None = None,
    output: str = "logits",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`output` of every batch, fp32 on CPU, concatenated over samples; labels [N]) in eval mode, no grad.

    ``output="member_logits"`` ([K, B, C], an `EnsembleModel`'s) is concatenated along dim 1, anything else
    along dim 0. The train/eval mode is restored afterwards, so this is safe in the middle of training; a
    progress bar shows when `desc` is given; `empty_error` is the ValueError's message for no batches.
    """
    was_training, chunks, labels = model.training, [], []
    model.eval()
    try:
        for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            inputs, y = _split_batch(batch, model, label_key)
            if y is None:
                keys = "'labels' or 'label'" if label_key == "labels" else repr(label_key)
                raise ValueError(f"A batch carries no labels ({keys}); evaluation needs labelled batches.")
            out = getattr(model(**inputs), output)
            if out.ndim > (3 if output == "member_logits" else 2):
                raise ValueError(
                    f"The model returns per-token logits of shape {tuple(out.shape)} (a language model): "
                    "per-sample metrics and accuracy do not apply. Use hf_ens.evaluate_lm_ensemble / "
                    "hf_ens.lm_metrics, and hf_ens.make_lm_eval_fn for a greedy soup by held-out token NLL."
                )
            chunks.append(out.float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError(empty_error)
    return torch.cat(chunks, dim=1 if output == "member_logits" else 0), torch.cat(labels)


def predict_logits(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    label_key: str = "labels",
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model` in eval mode over `batches` and return (logits [N, C] fp32 on CPU, labels [N]).

    The model's train/eval mode is restored afterwards, so this is safe to call in the middle of training.
    """
    return _predict(
        model,
        batches,
        label_key=label_key,
        desc=desc,
        empty_error="predict_logits got no batches: the evaluation set is empty.",
    )
