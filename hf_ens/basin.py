"""Basin analysis (the paper's Sec. 4): are two fine-tuned models in the same loss basin?

Two models share a basin when the loss/error along the straight line between their weights has no bump
(barrier ~ 0); then their weight average (a soup) works. `interpolation_profile` measures that line,
`barrier` sums it up in one number (the bump above the straight line between the two ends), and
`weight_distance` shows how far a cycle moved a member from model 1 or from the pre-trained checkpoint.
Users sweep the cycle learning rate with these to find where members start leaving the pre-train basin.

BatchNorm models: interpolated running statistics are not those of the interpolated weights; recompute
them in `eval_fn` (e.g. `hf_ens.recompute_batchnorm`) before evaluating.

LoRA (peft) models are judged by their merged weights (`hf_ens.adapters.merged_model`: ``W0 + scale B A`` and
the ``modules_to_save`` head): the straight line between two LoRA members is
``W0 + (1 - alpha) scale B_a A_a + alpha scale B_b A_b``, not the model of the interpolated factors
(``((1 - alpha) B_a + alpha B_b) ((1 - alpha) A_a + alpha A_b)`` has a cross term, a curve in weight space).
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .soups import weighted_average

EvalResult = Mapping[str, float] | Sequence[float]


def _check_module(name: str, model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{name} must be a torch.nn.Module (e.g. a PreTrainedModel), got {type(model).__name__}."
        )
    return model


def _paired_tensors(tensors_a: dict, tensors_b: dict) -> None:
    if tensors_a.keys() != tensors_b.keys():
        only_a = sorted(set(tensors_a) - set(tensors_b))[:5]
        only_b = sorted(set(tensors_b) - set(tensors_a))[:5]
        raise ValueError(
            f"The models have different architectures: only in the first {only_a}, "
            f"only in the second {only_b}."
        )
    for key, a in tensors_a.items():
        if a.shape != tensors_b[key].shape:
            raise ValueError(
                f"The models have different architectures: {key} is {tuple(a.shape)} vs "
                f"{tuple(tensors_b[key].shape)}."
            )


def whole_model(model: nn.Module) -> nn.Module:
    """The model whose weights stand for `model` in weight space: a peft model's active adapter merged into a
    new plain model (`hf_ens.adapters.merged_model`), any other model itself."""
    if (
        "peft" in sys.modules
    ):  # a peft model exists only once peft is imported; full-model users never load it
        from .adapters import is_peft_model, merged_model

        if is_peft_model(model):
            return merged_model(model)
    return model


def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A new model with weights `(1 - alpha) * model_a + alpha * model_b` (alpha=0 gives model_a).

    The soups' averaging (`hf_ens.soups.weighted_average` with weights ``1 - alpha, alpha``): floating tensors
    (parameters and buffers) are combined in float32 and cast back to model_a's dtype; integer buffers are
    copied from model_a. Neither input is modified. A LoRA (peft) model enters by its merged weights
    (`whole_model`), and the result is then a plain model.
    """
    _check_alpha(alpha)
    _check_module("model_a", model_a)
    _check_module("model_b", model_b)
    return weighted_average([whole_model(model_a), whole_model(model_b)], [1 - alpha, alpha])


def _check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}.")


def _normalise(result) -> dict[str, float]:
    if isinstance(result, Mapping):
        out = {str(k): float(v) for k, v in result.items()}
        if "error" not in out and "accuracy" in out:
            out["error"] = 1.0 - out["accuracy"]
    elif isinstance(result, Sequence) and not isinstance(result, str) and len(result) == 2:
        out = {"loss": float(result[0]), "error": float(result[1])}
    else:
        out = {}
    if "loss" not in out or "error" not in out:
        raise TypeError(
            "eval_fn(model) must return a dict with 'loss' and 'error' (or 'accuracy'), or a (loss, error) "
            f"pair; got {result!r}."
        )
    return out


def interpolation_profile(
    model_a: nn.Module,
    model_b: nn.Module,
    eval_fn: Callable[[nn.Module], EvalResult],
    num_points: int = 11,
    alphas: Sequence[float] | None = None,
) -> dict[str, list[float]]:
    """Evaluate `eval_fn` along the line from model_a (alpha=0) to model_b (alpha=1).

    `eval_fn(model)` returns `{"loss": ..., "error": ...}` (extra keys are kept, "accuracy" may replace
    "error") or a `(loss, error)` pair; the model it gets is in eval mode. Returns
    `{"alphas": [...], "loss": [...], "error": [...], ...}` as plain floats (JSON-ready). LoRA (peft) models
    are interpolated by their merged weights (`whole_model`): `eval_fn` then gets a plain model.
    """
    from tqdm.auto import tqdm

    _check_module("model_a", model_a)
    _check_module("model_b", model_b)
    if alphas is None:
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
            raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}.")
        alphas = [i / (num_points - 1) for i in range(num_points)]
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty.")
    for alpha in alphas:
        _check_alpha(alpha)
    model_a, model_b = whole_model(model_a), whole_model(model_b)
    working = copy.deepcopy(model_a)  # one copy, overwritten per point, instead of one model per point
    profile: dict[str, list[float]] = {"alphas": alphas}
    for alpha in tqdm(alphas, desc="interpolation profile", unit="point"):
        weighted_average([model_a, model_b], [1 - alpha, alpha], into=working)
        working.eval()
        for key, value in _normalise(eval_fn(working)).items():
            profile.setdefault(key, []).append(value)
    return profile


def barrier(values: Sequence[float], alphas: Sequence[float] | None = None) -> float:
    """Largest excess of a path over the straight line between its end values, never below 0.

    `max_t [L(t) - ((1 - t) L(0) + t L(1))]` over the points of the path, with `t` the position of each
    point between the two ends (`alphas`, as `interpolation_profile` returns them; evenly spaced when None).
    Pass a quantity where lower is better (loss, error). A linear or convex path has no barrier (0); a bump
    gives its height above the line. Not `max - mean of the ends`: that calls any rising path a barrier.
    """
    values = _floats(values)
    if any(math.isnan(v) for v in values):
        raise ValueError(f"barrier got NaN values: {values}.")
    if len(values) < 2:
        raise ValueError(f"barrier needs at least the two end points, got {len(values)} value(s).")
    if alphas is None:
        alphas = [i / (len(values) - 1) for i in range(len(values))]
    alphas = _floats(alphas)
    if len(alphas) != len(values):
        raise ValueError(f"barrier got {len(values)} values for {len(alphas)} alphas.")
    start, end = alphas[0], alphas[-1]
    increasing = all(a < b for a, b in zip(alphas[:-1], alphas[1:], strict=True))
    if not increasing or not all(math.isfinite(a) for a in alphas):
        raise ValueError(f"alphas must be finite and increase strictly along the path, got {alphas}.")
    line = [values[0] + (a - start) / (end - start) * (values[-1] - values[0]) for a in alphas]
    return max(0.0, max(v - ref for v, ref in zip(values, line, strict=True)))


def _floats(seq) -> list[float]:
    return [float(v) for v in (seq.tolist() if hasattr(seq, "tolist") else seq)]


def weight_distance(model_a: nn.Module, model_b: nn.Module, relative: bool = False) -> float:
    """L2 distance between the floating-point parameters of two models of one architecture.

    With `relative=True` the distance is divided by the norm of model_b's parameters (model_b is the
    reference, e.g. model 1 or the pre-trained checkpoint), which makes models of different sizes comparable.
    Buffers (BatchNorm statistics) are not parameters and are left out. LoRA (peft) models are compared by
    their merged weights (`whole_model`).
    """
    _check_module("model_a", model_a)
    _check_module("model_b", model_b)
    model_a, model_b = whole_model(model_a), whole_model(model_b)
    params_a = {k: v for k, v in model_a.named_parameters() if v.is_floating_point()}
    params_b = {k: v for k, v in model_b.named_parameters() if v.is_floating_point()}
    _paired_tensors(params_a, params_b)
    squared = norm_b = 0.0
    with torch.no_grad():
        for key, a in params_a.items():
            b = params_b[key].to(device=a.device, dtype=torch.float64)
            squared += (a.double() - b).pow(2).sum().item()
            norm_b += b.pow(2).sum().item()
    distance = math.sqrt(squared)
    if relative:
        if norm_b == 0:
            raise ValueError("relative=True but the reference model_b has all-zero parameters.")
        distance /= math.sqrt(norm_b)
    return distance


def distances_to(models: Sequence[nn.Module], reference: nn.Module, relative: bool = False) -> list[float]:
    """`weight_distance(m, reference)` for each model, e.g. every member's distance to model 1."""
    return [weight_distance(m, reference, relative=relative) for m in models]


def plot_profile(
    profile: Mapping[str, Sequence[float]],
    path: str | os.PathLike = "interpolation_profile.png",
    title: str | None = None,
    labels: tuple[str, str] = ("model A", "model B"),
) -> Path:
    """Plot loss and error (%) along the interpolation path as a two-panel PNG, barriers in the titles
    (the largest excess over the straight line between the two ends, see `barrier`)."""
    from .plots import new_figure, save_figure

    if "alphas" not in profile or not ("loss" in profile or "error" in profile):
        raise ValueError("profile must hold 'alphas' and 'loss' and/or 'error' (see interpolation_profile).")
    alphas = [float(a) for a in profile["alphas"]]
    panels = [k for k in ("loss", "error") if k in profile]
    fig, axes = new_figure(ncols=len(panels))
    for ax, key in zip(axes, panels, strict=True):
        values = [float(v) for v in profile[key]]
        if len(values) != len(alphas):
            raise ValueError(f"profile[{key!r}] has {len(values)} values for {len(alphas)} alphas.")
        scale = 100.0 if key == "error" else 1.0
        ax.plot(alphas, [v * scale for v in values], marker="o", ms=4, color="tab:red")
        ax.set_xlabel(f"alpha  (0 = {labels[0]}, 1 = {labels[1]})")
        ax.set_ylabel("test error (%)" if key == "error" else "test loss")
        unit = " points" if key == "error" else ""
        height = barrier(values, alphas) * scale
        ax.set_title(f"{key} barrier (excess over the end-to-end line): {height:.3g}{unit}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Linear interpolation between two models")
    return save_figure(fig, path)
