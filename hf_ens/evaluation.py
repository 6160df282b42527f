"""The one evaluation path of hf-ens, for the library, the recipes, the comparison and the trainer's probe.

One way to read a batch (`split_batch`) and one predict loop (`predict`) serve `predict_logits`,
`EnsembleModel.predict`, `evaluate_ensemble`, the held-out scores a greedy soup is picked by
(`make_accuracy_eval_fn`), the loss/error a basin profile or LR probe reads (`loss_error`,
`make_loss_error_fn`) and `recompute_batchnorm`.

Wherever batches are taken, a zero-argument callable returning fresh batches is accepted too (for loaders that
are generators, e.g. batches preprocessed on the device at each pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .lm_metrics import LMMetricAccumulator, evaluate_lm_ensemble, scored_tokens
from .members import CAUSAL_LM_SUFFIXES, TOKEN_CLASSIFICATION_SUFFIXES
from .metrics import (
    _SINGLE_LABEL_ONLY,
    accuracy,
    classification_metrics,
    ensemble_log_probs,
    ensemble_metrics,
    nll,
)

__all__ = [
    "split_batch",
    "predict",
    "predict_logits",
    "loss_error",
    "evaluate_loss_error",
    "make_loss_error_fn",
    "make_accuracy_eval_fn",
    "ensemble_size_curve",
    "evaluate_ensemble",
]

Batches = Iterable | Callable[[], Iterable]


def _fresh(batches: Batches) -> Iterable:
    return batches() if callable(batches) else batches


def split_batch(batch, model: torch.nn.Module, label_key: str = "labels") -> tuple[dict, torch.Tensor | None]:
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
def predict(
    model: torch.nn.Module,
    batches: Batches,
    *,
    empty_error: str = "predict got no batches: the evaluation set is empty.",
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
        for batch in tqdm(_fresh(batches), desc=desc, disable=desc is None, leave=False):
            inputs, y = split_batch(batch, model, label_key)
            if y is None:
                keys = "'labels' or 'label'" if label_key == "labels" else repr(label_key)
                raise ValueError(f"A batch carries no labels ({keys}); evaluation needs labelled batches.")
            out = getattr(model(**inputs), output)
            if out.ndim > (3 if output == "member_logits" else 2):
                raise ValueError(
                    f"The model returns per-token logits of shape {tuple(out.shape)} (a language model or a "
                    "token classifier): per-sample metrics and accuracy do not apply. Use "
                    "hf_ens.evaluate_ensemble / evaluate_loss_error (they score per token), "
                    "hf_ens.evaluate_lm_ensemble / hf_ens.lm_metrics (shift=False for token classification), "
                    "and hf_ens.make_lm_eval_fn for a greedy soup by held-out token NLL (shift=False for "
                    "token classification)."
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
    batches: Batches,
    label_key: str = "labels",
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model` in eval mode over `batches` and return (logits [N, C] fp32 on CPU, labels [N]).

    `predict` with ``output="logits"``. The model's train/eval mode is restored afterwards, so this is safe
    to call in the middle of training.
    """
    return predict(
        model,
        batches,
        label_key=label_key,
        desc=desc,
        empty_error="predict_logits got no batches: the evaluation set is empty.",
    )


def loss_error(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{"loss": mean cross-entropy (nats), "error": 1 - accuracy}`` of single-label logits [N, C]: what a
    basin profile (`hf_ens.basin.interpolation_profile`) and the trainer's LR probe read. A NaN/Inf row counts
    as an error (`hf_ens.metrics.accuracy`), never as class 0."""
    return {
        "loss": torch.nn.functional.cross_entropy(logits.float(), labels).item(),
        "error": 1.0 - float(accuracy(logits, labels)),
    }


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith(CAUSAL_LM_SUFFIXES)  # PeftModelForCausalLM included


def _is_token_classifier(model: nn.Module) -> bool:
    """A per-token classifier: a *ForTokenClassification, its peft wrapper or an ensemble of them."""
    return type(model).__name__.endswith(TOKEN_CLASSIFICATION_SUFFIXES)


@torch.no_grad()
def _lm_loss_error(model: nn.Module, batches: Batches, shift: bool = True) -> dict[str, float]:
    acc, was_training = LMMetricAccumulator(), model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        for batch in _fresh(batches):
            if "labels" not in batch:
                raise ValueError("Evaluating a per-token loss and error needs labelled batches (`labels`).")
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits.float()
            acc.add(*scored_tokens(logits, batch["labels"].to(device), shift=shift))
    finally:
        model.train(was_training)
    metrics = acc.compute()
    return {"loss": metrics["nll"], "error": 1.0 - metrics["accuracy"]}


def evaluate_loss_error(model: nn.Module, batches: Batches) -> dict[str, float]:
    """``{"loss", "error"}`` of `model` on labelled `batches`, in eval mode (its mode restored afterwards).

    A classifier: `loss_error` of its logits (mean cross-entropy, 1 - accuracy). A causal LM: per token, the
    NLL and top-1 error of the next token over every scored position (shifted labels, ``-100`` ignored), the
    loss its own training minimises. A token classifier: the same per token, unshifted (``-100`` ignored).
    What basin profiles and the trainer's LR probe read.
    """
    if _is_causal_lm(model) or _is_token_classifier(model):
        return _lm_loss_error(model, batches, shift=not _is_token_classifier(model))
    return loss_error(*predict_logits(model, batches))


def make_loss_error_fn(
    batches: Batches, prepare: Callable[[nn.Module], object] | None = None
) -> Callable[[nn.Module], dict[str, float]]:
    """``eval_fn(model) -> {"loss", "error"}`` (`evaluate_loss_error`) on `batches`, for
    `interpolation_profile` and probes; `prepare(model)` runs first (e.g. attach a device preprocessor)."""

    def eval_fn(model: nn.Module) -> dict[str, float]:
        if prepare is not None:
            prepare(model)
        return evaluate_loss_error(model, batches)

    return eval_fn


def make_accuracy_eval_fn(dataloader: Batches) -> Callable[[nn.Module], float]:
    """Build ``eval_fn(model) -> accuracy`` on a HELD-OUT loader, for `greedy_soup` (never pass the test set).

    Raises ValueError for an empty loader, now when its length is known, else at the first call.
    """
    try:
        if len(dataloader) == 0:  # type: ignore[arg-type]
            raise ValueError(
                "make_accuracy_eval_fn got an empty held-out dataloader; greedy_soup needs data."
            )
    except TypeError:
        pass

    empty = "The held-out dataloader yielded no samples; greedy_soup needs a non-empty split."

    def eval_fn(model: nn.Module) -> float:
        logits, labels = predict(model, dataloader, empty_error=empty)
        if len(labels) == 0:
            raise ValueError(empty)
        return accuracy(logits, labels)  # a NaN/Inf prediction is wrong, never class 0

    return eval_fn


def ensemble_size_curve(member_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, list]:
    """Accuracy and NLL of the ensemble of the first k members, k = 1..K: ``{"sizes", "accuracy", "nll"}``."""
    sizes = list(range(1, member_logits.shape[0] + 1))
    log_probs = [ensemble_log_probs(member_logits[:k]) for k in sizes]
    return {
        "sizes": sizes,
        "accuracy": [accuracy(lp, labels) for lp in log_probs],
        "nll": [nll(lp, labels) for lp in log_probs],
    }


def evaluate_ensemble(
    ensemble,
    dataloader: Batches,
    soup: nn.Module | None = None,
    *,
    models: Mapping[str, nn.Module] | None = None,
    size_curve: bool = False,
) -> dict:
    """`ensemble_metrics` of an `EnsembleModel` (and optionally its soup) on a labelled loader.

    The result feeds `EnsembleModel.save_pretrained(..., metrics=...)` and `push_to_hub(..., metrics=...)`,
    which put it into the model card. Evaluate on the split you report, never on the one that picked a soup.
    `models` (e.g. ``{"greedy_soup": greedy}``) adds ``<name>/accuracy``... of other single models on the same
    batches; `size_curve` adds ``ensemble_size_curve`` (`ensemble_size_curve`). The loader is read once per
    model: it must yield the same batches each pass (do not shuffle it).

    An `EnsembleForTokenClassification` is scored per token (every token whose label is not ``-100``):
    `hf_ens.evaluate_lm_ensemble` with ``shift=False`` (``ensemble/*``, ``member_mean/*``, ``soup/*`` and
    ``diversity/*`` keys); `models` and `size_curve` are per-sample options, refused there.
    """
    if _is_token_classifier(ensemble):
        if models or size_curve:
            raise ValueError(
                "evaluate_ensemble of a token-classification ensemble scores tokens (evaluate_lm_ensemble, "
                "shift=False): models= and size_curve= are not supported there."
            )
        return evaluate_lm_ensemble(ensemble, _fresh(dataloader), soup=soup, shift=False)
    problem_type = getattr(ensemble.config, "problem_type", None)
    if problem_type not in (None, "single_label_classification"):
        raise ValueError(_SINGLE_LABEL_ONLY.format(what=f"this ensemble's members are {problem_type!r}"))
    member_logits, labels = ensemble.predict(_fresh(dataloader))

    def logits_of(model: nn.Module, name: str) -> torch.Tensor:
        logits, again = predict(
            model,
            dataloader,
            desc=f"evaluate {name}",
            empty_error="evaluate_ensemble got an empty dataloader.",
        )
        if not torch.equal(again, labels):
            raise ValueError("The dataloader yielded different labels on a second pass; do not shuffle it.")
        return logits

    soup_logits = None if soup is None else logits_of(soup, "soup")
    metrics = ensemble_metrics(member_logits, labels, soup_logits=soup_logits)
    for name, model in (models or {}).items():
        metrics.update(classification_metrics(logits_of(model, name), labels, prefix=f"{name}/"))
    if size_curve:
        metrics["ensemble_size_curve"] = ensemble_size_curve(member_logits, labels)
    return metrics
