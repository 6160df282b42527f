"""Metrics for causal-LM members, ensembles and soups: per-token scores of the next-token distribution.

The conventions of `hf_ens.metrics`, applied to every scored token (position ``t`` predicts ``labels[t + 1]``;
``-100`` is not scored, as in transformers' causal-LM loss):

  * ``nll``: mean token negative log-likelihood (natural log); ``perplexity = exp(nll)``.
  * ``accuracy``: fraction of tokens whose top-1 next token is the label.
  * ``ece``: expected calibration error of the top-1 confidence, ``n_bins`` equal-width bins (`metrics.ece`).
  * ``brier``: multi-class Brier score of the next-token distribution (sum over the vocabulary, in [0, 2]).
  * ``diversity/disagreement``: mean over member pairs of the fraction of tokens whose top-1 differs.
  * ``diversity/mutual_information``: mean over tokens of ``H(mean_k p_k) - mean_k H(p_k)`` (nats), the
    ensemble's epistemic uncertainty; `token_uncertainty` gives it per token, to flag unreliable generations.

Token classification (``*ForTokenClassification`` members, `hf_ens.EnsembleForTokenClassification`) is scored
by the same rule without the shift (``shift=False``: position ``t`` against ``labels[t]``), over the class
distribution of every token whose label is not ``-100``; `compute_token_metrics` is its Trainer hook.

Everything streams: `LMMetricAccumulator` keeps sums and ECE bin counts, never the [tokens, vocabulary]
probabilities of a whole evaluation set, so a held-out corpus costs the memory of one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

__all__ = [
    "LM_METRICS",
    "LMMetricAccumulator",
    "scored_tokens",
    "lm_metrics",
    "token_uncertainty",
    "lm_ensemble_metrics",
    "evaluate_lm_ensemble",
    "make_lm_eval_fn",
    "compute_lm_metrics",
    "compute_token_metrics",
]

LM_METRICS = ("nll", "perplexity", "accuracy", "ece", "brier")


def scored_tokens(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits ``[..., N, V]`` of the scored positions and their targets ``[N]``.

    `logits` is ``[B, T, V]`` or member logits ``[K, B, T, V]``; `labels` ``[B, T]``. With `shift` (the
    default, as transformers' causal-LM loss) position ``t`` is scored against ``labels[:, t + 1]``.
    """
    if logits.ndim not in (3, 4) or labels.ndim != 2 or tuple(logits.shape[-3:-1]) != tuple(labels.shape):
        raise ValueError(
            f"Expected logits [B, T, V] (or member logits [K, B, T, V]) and labels [B, T]; got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    labels = labels.to(logits.device)
    if shift:
        logits, labels = logits[..., :-1, :], labels[:, 1:]
    keep = labels != ignore_index
    return logits[..., keep, :], labels[keep]


class LMMetricAccumulator:
    """Running token NLL, accuracy, Brier and ECE bins of one model's next-token predictions, by batch."""

    def __init__(self, n_bins: int = 15):
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1; got {n_bins}.")
        self.n_bins = n_bins
        self.tokens = 0
        self.nll_sum = self.correct = self.brier_sum = 0.0
        self.bin_count = torch.zeros(n_bins, dtype=torch.float64)
        self.bin_conf = torch.zeros(n_bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(n_bins, dtype=torch.float64)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add scored tokens: `logits` ``[N, V]`` (log-probabilities or raw scores), `targets` ``[N]``."""
        if targets.numel() == 0:
            return
        if targets.min() < 0 or targets.max() >= logits.shape[-1]:
            raise ValueError(
                f"Targets must lie in [0, {logits.shape[-1] - 1}] or be ignored (-100); got "
                f"{int(targets.min())}..{int(targets.max())}."
            )
        log_p = torch.log_softmax(logits.detach().double(), dim=-1)
        targets = targets.to(log_p.device)
        target_log_p = log_p.gather(-1, targets[:, None])[:, 0]
        conf, pred = log_p.exp().max(-1)
        correct = (pred == targets).double()
        p = log_p.exp()
        # sum_c (p_c - onehot_c)^2 = sum_c p_c^2 - 2 p_y + 1
        brier = (p * p).sum(-1) - 2 * target_log_p.exp() + 1
        bins = (torch.ceil(conf * self.n_bins).long() - 1).clamp(0, self.n_bins - 1).cpu()
        self.tokens += int(targets.numel())
        self.nll_sum -= float(target_log_p.sum())
        self.correct += float(correct.sum())
        self.brier_sum += float(brier.sum())
        self.bin_count += torch.bincount(bins, minlength=self.n_bins).double()
        self.bin_conf.index_add_(0, bins, conf.cpu())
        self.bin_correct.index_add_(0, bins, correct.cpu())

    def compute(self, prefix: str = "") -> dict[str, float]:
        if self.tokens == 0:
            raise ValueError("LM metrics need at least one scored token; every label was ignored (-100).")
        n, filled = float(self.tokens), self.bin_count > 0
        gaps = (self.bin_correct[filled] - self.bin_conf[filled]).abs()  # n_b * |acc_b - conf_b|
        nll = self.nll_sum / n
        values = {
            "nll": nll,
            "perplexity": math.exp(min(nll, 700.0)),
            "accuracy": self.correct / n,
            "ece": float(gaps.sum()) / n,
            "brier": self.brier_sum / n,
        }
        return {f"{prefix}{k}": v for k, v in values.items()}


def lm_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    n_bins: int = 15,
    prefix: str = "",
    shift: bool = True,
) -> dict[str, float]:
    """`LM_METRICS` of one model's logits ``[B, T, V]`` against causal-LM `labels` ``[B, T]`` (shifted; with
    ``shift=False``, token-classification labels: one per position)."""
    acc = LMMetricAccumulator(n_bins)
    acc.add(*scored_tokens(logits, labels, ignore_index, shift))
    return acc.compute(prefix)


@torch.no_grad()
def token_uncertainty(member_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token uncertainty of an ensemble from member logits ``[K, ..., V]`` (e.g. ``[K, B, T, V]``).

    Returns tensors of shape ``[...]``: ``entropy`` of the averaged distribution (total uncertainty),
    ``expected_entropy`` (mean member entropy: aleatoric), ``mutual_information`` (their difference:
    epistemic, where members disagree), ``disagreement`` (fraction of member pairs with different top-1
    tokens; 0 for one member) and ``confidence`` (top-1 probability of the average).
    """
    log_p = torch.log_softmax(member_logits.detach().double(), dim=-1)
    k = log_p.shape[0]
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(k)
    entropy = -(log_mean.exp() * log_mean).sum(-1)
    expected = -(log_p.exp() * log_p).sum(-1).mean(0)
    top1 = log_p.argmax(-1)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    disagreement = (
        torch.stack([(top1[i] != top1[j]).double() for i, j in pairs]).mean(0)
        if pairs
        else torch.zeros_like(entropy)
    )
    return {
        "entropy": entropy,
        "expected_entropy": expected,
        "mutual_information": (entropy - expected).clamp(min=0),
        "disagreement": disagreement,
        "confidence": log_mean.exp().max(-1).values,
    }


class _EnsembleAccumulator:
    """Ensemble, mean-member, soup and diversity metrics of an LM ensemble, batch by batch."""

    def __init__(self, num_members: int, n_bins: int, soup: bool):
        self.ensemble = LMMetricAccumulator(n_bins)
        self.members = [LMMetricAccumulator(n_bins) for _ in range(num_members)]
        self.soup = LMMetricAccumulator(n_bins) if soup else None
        self.tokens = 0
        self.mi_sum = self.disagreement_sum = 0.0

    def add(
        self, member_logits, labels, soup_logits=None, ignore_index: int = -100, shift: bool = True
    ) -> None:
        if member_logits.ndim != 4 or member_logits.shape[0] != len(self.members):
            raise ValueError(
                f"Expected member logits [K={len(self.members)}, B, T, V]; got {tuple(member_logits.shape)}."
            )
        scored, targets = scored_tokens(member_logits, labels, ignore_index, shift)  # [K, N, V], [N]
        log_p = torch.log_softmax(scored.double(), dim=-1)
        self.ensemble.add(torch.logsumexp(log_p, dim=0) - math.log(len(self.members)), targets)
        for acc, logits in zip(self.members, log_p, strict=True):
            acc.add(logits, targets)
        if self.soup is not None:
            self.soup.add(*scored_tokens(soup_logits, labels, ignore_index, shift))
        unc = token_uncertainty(log_p)
        self.tokens += int(targets.numel())
        self.mi_sum += float(unc["mutual_information"].sum())
        self.disagreement_sum += float(unc["disagreement"].sum())

    def compute(self) -> dict[str, float]:
        out = self.ensemble.compute("ensemble/")
        member = [acc.compute() for acc in self.members]
        out.update({f"member_mean/{m}": sum(r[m] for r in member) / len(member) for m in LM_METRICS})
        if self.soup is not None:
            out.update(self.soup.compute("soup/"))
        out["diversity/disagreement"] = self.disagreement_sum / self.tokens
        out["diversity/mutual_information"] = self.mi_sum / self.tokens
        return out


def lm_ensemble_metrics(
    member_logits: torch.Tensor,
    labels: torch.Tensor,
    soup_logits: torch.Tensor | None = None,
    ignore_index: int = -100,
    n_bins: int = 15,
    shift: bool = True,
) -> dict[str, float]:
    """``ensemble/*``, ``member_mean/*`` (mean of the members' metrics), ``soup/*`` (with `soup_logits`) and
    ``diversity/*`` metrics of member logits ``[K, B, T, V]`` against causal-LM `labels` ``[B, T]`` (with
    ``shift=False``: token-classification labels)."""
    acc = _EnsembleAccumulator(member_logits.shape[0], n_bins, soup_logits is not None)
    acc.add(member_logits, labels, soup_logits, ignore_index, shift)
    return acc.compute()


@torch.no_grad()
def evaluate_lm_ensemble(
    ensemble, dataloader: Iterable, soup=None, ignore_index: int = -100, n_bins: int = 15, shift: bool = True
) -> dict[str, float]:
    """`lm_ensemble_metrics` of an `EnsembleModelForCausalLM` (and optionally its soup, put in eval mode)
    over a loader of causal-LM batches (``input_ids``, ``attention_mask``, ``labels``), streamed batch by
    batch: memory is one batch's member logits, whatever the size of the held-out set. ``shift=False``: an
    `EnsembleForTokenClassification` over token-classification batches (one label per token)."""
    acc = None
    was_training = ensemble.training
    ensemble.eval()
    if soup is not None:
        soup.eval()
    try:
        for batch in dataloader:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            if "labels" not in batch:
                raise ValueError(
                    "evaluate_lm_ensemble needs batches with `labels` (e.g. a causal-LM collator)."
                )
            out = ensemble(**inputs)
            soup_logits = soup(**inputs).logits if soup is not None else None
            if acc is None:
                acc = _EnsembleAccumulator(out.member_logits.shape[0], n_bins, soup is not None)
            acc.add(out.member_logits, batch["labels"], soup_logits, ignore_index, shift)
    finally:
        ensemble.train(was_training)
    if acc is None:
        raise ValueError("evaluate_lm_ensemble got an empty dataloader.")
    return acc.compute()


def make_lm_eval_fn(
    dataloader: Iterable, ignore_index: int = -100, shift: bool = True
) -> Callable[[torch.nn.Module], float]:
    """``eval_fn(model) -> -token NLL`` on a HELD-OUT loader of causal-LM batches, for `hf_ens.greedy_soup`
    (higher is better: greedy selection by held-out loss). Never pass the test set. ``shift=False``: token
    classifiers (one label per token) instead of causal LMs."""

    @torch.no_grad()
    def eval_fn(model: torch.nn.Module) -> float:
        acc, was_training = LMMetricAccumulator(), model.training
        model.eval()
        try:
            for batch in dataloader:
                if "labels" not in batch:
                    raise ValueError("make_lm_eval_fn needs batches with `labels` (a causal-LM collator).")
                device = next(model.parameters()).device
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                acc.add(*scored_tokens(model(**inputs).logits, batch["labels"], ignore_index, shift))
        finally:
            model.train(was_training)
        if acc.tokens == 0:
            raise ValueError(
                "The held-out loader yielded no scored tokens; greedy_soup needs a non-empty split."
            )
        return -acc.compute()["nll"]

    return eval_fn


def compute_lm_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for `transformers.Trainer` on a causal LM (one model or an LM ensemble, whose
    logits already are log-mean-probabilities): `LM_METRICS` of the scored tokens, e.g. ``eval_perplexity``.

    The Trainer pads predictions of different lengths with -100, where the labels are -100 too, so padding
    is never scored. It holds every [N, T, V] logit of the evaluation set in memory: for a large vocabulary
    or set use `evaluate_lm_ensemble` (streamed) instead.
    """
    predictions, labels = eval_pred[0], eval_pred[1]
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    return lm_metrics(torch.as_tensor(predictions), torch.as_tensor(labels).long())


def compute_token_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for `transformers.Trainer` on a token classifier (one model or an
    `EnsembleForTokenClassification`): `LM_METRICS` (``accuracy``, ``nll``, ``ece``, ``brier``...) of
    every token whose label is not ``-100``, unshifted; the Trainer's -100 padding is never scored."""
    predictions, labels = eval_pred[0], eval_pred[1]
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    return lm_metrics(torch.as_tensor(predictions), torch.as_tensor(labels).long(), shift=False)
