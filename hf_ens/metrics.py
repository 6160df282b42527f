"""Classification metrics for members, ensembles and soups, plus member diversity.

All functions take logits (unnormalised scores or log-probabilities; both give the same probabilities after
a softmax) as torch tensors or numpy arrays, and integer labels. They compute in float64 and return floats.

Conventions (documented because papers differ):
  * ``nll``: mean negative log-likelihood of the true class (natural log).
  * ``ece``: expected calibration error with ``n_bins`` equal-width confidence bins on [0, 1]; confidence is
    the maximum probability, ``ece = sum_b (n_b / N) * |accuracy_b - mean confidence_b|``; bin b holds
    confidences in ``(lo_b, hi_b]`` (the first bin also holds 0).
  * ``brier``: sum over classes of ``(p_c - onehot_c)^2``, averaged over samples (range [0, 2]; the
    multi-class form of Brier 1950, *not* divided by the number of classes).
  * ``diversity/disagreement``: mean over member pairs of the fraction of samples predicted differently.
  * ``diversity/kl_to_ensemble``: mean over members and samples of KL(member || ensemble), i.e.
    ``sum_c p_k,c (log p_k,c - log p_ens,c)`` with ``p_ens`` the mean member probability (a generalised
    Jensen-Shannon divergence; zero iff all members agree exactly).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from .tasks import log_mean_softmax

__all__ = [
    "accuracy",
    "nll",
    "ece",
    "brier",
    "classification_metrics",
    "ensemble_log_probs",
    "logits_from_probabilities",
    "disagreement",
    "kl_to_ensemble",
    "ensemble_metrics",
    "compute_metrics",
]

METRICS = ("accuracy", "nll", "ece", "brier")


def _to_tensor(x, dtype=torch.float64) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype)


_SINGLE_LABEL_ONLY = (
    "hf_ens.metrics (accuracy, NLL, ECE, Brier) are defined for single-label classification (one class id "
    "per sample, a softmax over classes); {what}. Score a multi-label or regression ensemble with its own "
    "metrics on `EnsembleModel(...).logits` (sigmoid probabilities / mean values)."
)


def _check_single_label(labels) -> None:
    """Refuse multi-label (one 0/1 row per sample) and regression (fractional) targets with the reason,
    instead of scoring them as class ids (a silent wrong number)."""
    y = _to_tensor(labels)
    if y.ndim > 1 and y.shape[-1] > 1:
        what = f"got labels of shape {tuple(y.shape)} (multi-label?)"
        raise ValueError(_SINGLE_LABEL_ONLY.format(what=what))
    if not torch.equal(y, y.round()):
        raise ValueError(_SINGLE_LABEL_ONLY.format(what="got non-integer labels (regression targets?)"))


def _prepare(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    _check_single_label(labels)
    log_probs = torch.log_softmax(_to_tensor(logits), dim=-1)
    labels = _to_tensor(labels, torch.long).reshape(-1)
    if log_probs.ndim != 2 or log_probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Expected logits of shape [N, C] and labels of shape [N]; got {tuple(log_probs.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if labels.numel() == 0:
        raise ValueError("Metrics need at least one sample; got an empty array.")
    if labels.min() < 0 or labels.max() >= log_probs.shape[1]:
        raise ValueError(
            f"Labels must lie in [0, {log_probs.shape[1] - 1}]; got {labels.min()}..{labels.max()}."
        )
    return log_probs, labels


def _valid_rows(log_probs: torch.Tensor) -> torch.Tensor:
    """Rows that are a prediction at all: a NaN/Inf logit makes a row NaN, and arg-max of NaN is class 0,
    which would count as correct for every class-0 sample."""
    return ~torch.isnan(log_probs).any(-1) & torch.isfinite(log_probs.max(-1).values)


def accuracy(logits, labels) -> float:
    """Fraction of samples whose arg-max class is the label; a non-finite (NaN/Inf) prediction is wrong."""
    log_probs, labels = _prepare(logits, labels)
    return ((log_probs.argmax(-1) == labels) & _valid_rows(log_probs)).double().mean().item()


def nll(logits, labels) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    log_probs, labels = _prepare(logits, labels)
    return -log_probs.gather(1, labels[:, None]).mean().item()


def ece(logits, labels, n_bins: int = 15) -> float:
    """Expected calibration error with `n_bins` equal-width bins over the max-probability confidence."""
    log_probs, labels = _prepare(logits, labels)
    conf, pred = log_probs.exp().max(-1)
    correct = (pred == labels).double()
    # bin b holds (b/n, (b+1)/n]; clamp puts confidence 0 into the first bin.
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.double().mean().item() * abs(correct[mask].mean().item() - conf[mask].mean().item())
    return total


def brier(logits, labels) -> float:
    """Multi-class Brier score: sum over classes of (p - onehot)^2, averaged over samples."""
    log_probs, labels = _prepare(logits, labels)
    onehot = torch.nn.functional.one_hot(labels, log_probs.shape[1]).double()
    return ((log_probs.exp() - onehot) ** 2).sum(-1).mean().item()


def fit_temperature(logits, labels, low: float = 0.05, high: float = 20.0, iterations: int = 60) -> float:
    """The temperature T minimising the NLL of ``logits / T`` (Guo et al. 2017), fitted on held-out data.

    NLL(beta * z) is convex in beta = 1 / T, so a golden-section search on beta in [1/high, 1/low] finds it;
    a T at either bound means the search interval was too narrow. Ensembles pass their log-mean-probabilities.
    Calibration compared after temperature scaling separates "more confident" from "worse calibrated".
    """
    log_probs, y = _prepare(logits, labels)
    if not 0.0 < low < high:
        raise ValueError(f"Need 0 < low < high, got low={low}, high={high}.")
    invalid = int((~_valid_rows(log_probs)).sum())
    if invalid:
        raise ValueError(
            f"fit_temperature got non-finite (NaN/Inf) logits in {invalid} of {len(y)} rows: no temperature "
            "calibrates them (the model diverged or its weights are damaged)."
        )

    def loss(beta: float) -> float:
        return torch.nn.functional.cross_entropy(log_probs * beta, y).item()

    a, b = 1.0 / high, 1.0 / low
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return 2.0 / (a + b)


def temperature_scaled(logits, temperature: float) -> torch.Tensor:
    """``logits / temperature`` (float64), for the metrics after temperature scaling."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    return _to_tensor(logits) / temperature


def logits_from_probabilities(probs) -> torch.Tensor:
    """``log(probs)`` (float64): logits whose softmax is `probs`, so every metric also takes probabilities.

    `probs` [..., C] must be non-negative and sum to 1 over the last axis (to 1e-4); a zero probability gives
    a logit of -inf, so the NLL of a true class predicted with p = 0 is inf, as it should be.
    """
    p = _to_tensor(probs)
    if p.ndim == 0 or p.numel() == 0:
        raise ValueError(f"Expected probabilities of shape [..., C]; got shape {tuple(p.shape)}.")
    if (
        not torch.isfinite(p).all()
        or (p < 0).any()
        or not torch.allclose(p.sum(-1), torch.ones(()).double(), atol=1e-4)
    ):
        raise ValueError(
            "Probabilities must be finite, non-negative and sum to 1 over the last axis; pass logits "
            "(probabilities=False) otherwise."
        )
    return p.log()


def classification_metrics(logits, labels, prefix: str = "") -> dict[str, float]:
    """accuracy, nll, ece and brier of one set of logits, keys prefixed with `prefix`."""
    return {
        f"{prefix}{name}": fn(logits, labels)
        for name, fn in zip(METRICS, (accuracy, nll, ece, brier), strict=True)
    }


def _member_logits(member_logits) -> torch.Tensor:
    z = _to_tensor(member_logits)
    if z.ndim != 3:
        raise ValueError(f"member_logits must have shape [K, N, C]; got {tuple(z.shape)}.")
    return z


def ensemble_log_probs(member_logits) -> torch.Tensor:
    """log(mean_k softmax(z_k)) from member logits [K, N, C], computed stably as logsumexp - log K."""
    return log_mean_softmax(_member_logits(member_logits))


def disagreement(member_logits) -> float:
    """Mean over member pairs of the fraction of samples with different predicted classes (0 for K=1)."""
    preds = _to_tensor(member_logits).argmax(-1)
    pairs = list(itertools.combinations(range(preds.shape[0]), 2))
    if not pairs:
        return 0.0
    return float(np.mean([(preds[i] != preds[j]).double().mean().item() for i, j in pairs]))


def kl_to_ensemble(member_logits) -> float:
    """Mean over members and samples of KL(member || ensemble mean probability)."""
    log_p = torch.log_softmax(_to_tensor(member_logits), -1)
    log_ens = ensemble_log_probs(member_logits)
    return (log_p.exp() * (log_p - log_ens[None])).sum(-1).mean().item()


def ensemble_metrics(member_logits, labels, soup_logits=None) -> dict[str, float]:
    """All metrics of an ensemble: each member, their mean, the ensemble, the soup (if given), and diversity.

    Keys: ``member_{k}/{metric}``, ``member_mean/{metric}``, ``ensemble/{metric}``, ``soup/{metric}``,
    ``diversity/disagreement``, ``diversity/kl_to_ensemble`` with metric in accuracy, nll, ece, brier.
    """
    z = _member_logits(member_logits)
    if z.shape[0] == 0:
        raise ValueError("ensemble_metrics needs at least one member; got member_logits with K=0.")
    out: dict[str, float] = {}
    for k in range(z.shape[0]):
        out.update(classification_metrics(z[k], labels, prefix=f"member_{k}/"))
    for name in METRICS:
        out[f"member_mean/{name}"] = float(np.mean([out[f"member_{k}/{name}"] for k in range(z.shape[0])]))
    out.update(classification_metrics(ensemble_log_probs(z), labels, prefix="ensemble/"))
    if soup_logits is not None:
        out.update(classification_metrics(soup_logits, labels, prefix="soup/"))
    out["diversity/disagreement"] = disagreement(z)
    out["diversity/kl_to_ensemble"] = kl_to_ensemble(z)
    out["num_members"] = float(z.shape[0])
    return out


def compute_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for `transformers.Trainer`.

    Plain logits [N, C] (of a single model, or of an `EnsembleModel`: already log-mean-probabilities) give
    ``accuracy``, ``nll``, ``ece``, ``brier``. A predictions tuple ``(logits, member_logits [K, N, C])`` gives
    the full `ensemble_metrics`. (`EnsembleModel` hides ``member_logits`` from the Trainer by default, via
    ``config.keys_to_ignore_at_inference``, because the Trainer concatenates outputs along dim 0.)
    """
    predictions, labels = eval_pred[0], eval_pred[1]
    first = predictions[0] if isinstance(predictions, (tuple, list)) else predictions
    if np.ndim(first) == 3:  # [N, T, C]: per token, where these per-sample metrics would misread the labels
        raise ValueError(
            f"compute_metrics got per-token predictions of shape {tuple(np.shape(first))}: use "
            "hf_ens.compute_token_metrics (token classification) or hf_ens.compute_lm_metrics (causal LMs)."
        )
    if isinstance(predictions, Sequence) and not isinstance(predictions, (np.ndarray, torch.Tensor)):
        if (
            len(predictions) > 1
            and np.ndim(predictions[1]) == 3
            and np.shape(predictions[1])[1] == len(labels)
        ):
            return ensemble_metrics(predictions[1], labels)
        predictions = predictions[0]
    return classification_metrics(predictions, labels)
