"""Weight averaging ("model soups") of fine-tuned members that share one pre-trained basin.

Members fine-tuned from one checkpoint (StarSSE, SSE, Local DE) stay in one loss basin, so the average of
their weights is itself a good model that costs one forward pass. ``uniform_soup`` averages all members;
``greedy_soup`` is the greedy recipe of Wortsman et al. (2022, "Model soups"); ``recompute_batchnorm``
re-estimates BatchNorm statistics, which averaging does not produce correctly.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .averaging import RunningSum as _RunningSum
from .averaging import check_weights
from .averaging import floating_names as _floating_names
from .checks import assert_finite
from .evaluation import make_accuracy_eval_fn, split_batch
from .members import check_like as _check_like
from .members import load_member

__all__ = [
    "uniform_soup",
    "greedy_soup",
    "weighted_average",
    "recompute_batchnorm",
    "make_accuracy_eval_fn",
    "has_batchnorm",
]

_BN_WARNING = (
    "This model has BatchNorm layers and no `bn_dataloader` was given. Averaging weights does not average "
    "the statistics the network would produce: the soup's activations have different means and variances "
    "than any member's, so the copied running_mean/running_var are wrong and accuracy can collapse. Pass a "
    "training dataloader (`bn_dataloader=...`) or call `recompute_batchnorm(soup, train_loader)` afterwards."
)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether `model` holds BatchNorm layers (whose running statistics a soup must recompute)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


Member = nn.Module | str | os.PathLike


def _sources(members: Sequence[Member]) -> list[Member]:
    """The members as a list of modules or paths (nothing loaded yet); a clear error for anything else."""
    members = list(members)
    if not members:
        raise ValueError("A soup needs at least one member; got an empty list.")
    for i, m in enumerate(members):
        if not isinstance(m, (nn.Module, str, os.PathLike)):
            raise TypeError(
                f"Soup member {i} is a {type(m).__name__}, expected a torch/transformers model or the "
                "save_pretrained directory of one."
            )
    return members


def _materialise(member: Member, copy_module: bool = False) -> nn.Module:
    """A module for `member`: a directory is loaded strictly (safetensors only); a module is used as is, or
    deep-copied when the caller will overwrite its weights."""
    if isinstance(member, (str, os.PathLike)):
        return load_member(member)  # strict safetensors loading, as for ensembles
    return copy.deepcopy(member) if copy_module else member


@torch.no_grad()
def weighted_average(
    members: Sequence[Member], weights: Sequence[float] | None = None, *, into: nn.Module | None = None
) -> nn.Module:
    """``sum_k w_k theta_k / sum_k w_k`` of the members' weights, streamed: one member is read at a time.

    The one averaging function of hf-ens: `uniform_soup` (all weights 1), `greedy_soup`'s final soup and
    `hf_ens.basin.interpolate` (weights ``1 - alpha, alpha``) use it. Floating tensors are accumulated in
    float32 (float64 stays float64) and cast back to member 0's dtype; integer buffers (e.g. BatchNorm
    ``num_batches_tracked``) come from member 0; tied weights (one tensor under several names) are averaged
    once. Members given as directories are loaded one after the other, so averaging K fp32 members holds two
    state dicts in memory (the running sum, which becomes the result, and the member being added).

    Args:
        members: models of one architecture with identical weight names and shapes, or their
            ``save_pretrained`` directories (loaded strictly, safetensors only). They are not modified.
        weights: one finite number per member (default: all 1); negative weights extrapolate (e.g. an
            interpolation alpha outside [0, 1]); their sum must not be 0.
        into: write the average into this module of the same architecture (e.g. a working copy reused for many
            averages) instead of a new copy of member 0.

    Returns:
        `into`, or a new model of member 0's class holding the average.
    """
    members = _sources(members)
    weights = check_weights(weights, len(members))
    first = _materialise(members[0], copy_module=into is None)
    ref_shapes = {k: tuple(v.shape) for k, v in first.state_dict().items()}
    out = first if into is None else into
    if into is not None:  # the result's integer buffers come from member 0, as when it is a copy of member 0
        target = _check_like(first, ref_shapes, into, 0)
        for name, value in first.state_dict().items():
            if not (value.is_floating_point() or value.is_complex()):
                target[name].copy_(value)
    running = _RunningSum(first.state_dict(), _floating_names(first), weights[0], alias=into is None)
    del first
    for i, (member, weight) in enumerate(zip(members[1:], weights[1:], strict=True), start=1):
        model = _materialise(member)
        state = _check_like(out, ref_shapes, model, i)
        running.add(state, weight)
        del model, state  # the next member is loaded only after this one is released
    running.write_mean(out)
    return out


def _finish(soup: nn.Module, bn_dataloader: Iterable | None, warn: bool) -> nn.Module:
    if bn_dataloader is not None:
        recompute_batchnorm(soup, bn_dataloader)
    elif warn and has_batchnorm(soup):
        warnings.warn(_BN_WARNING, UserWarning, stacklevel=3)
    return soup


def uniform_soup(
    members: Sequence[PreTrainedModel | str | os.PathLike],
    bn_dataloader: Iterable | None = None,
    warn_batchnorm: bool = True,
) -> PreTrainedModel:
    """Average the members' weights uniformly and return an ordinary model of the members' class.

    A streaming running mean (`weighted_average` with equal weights), as in model-soups: members given as
    directories are loaded one at a time, so K members cost two state dicts of memory, not K. Floating
    tensors are accumulated in float32 (float64 stays float64) and cast back to the member dtype, so a bf16
    soup is not rounded K times. Integer buffers (e.g. BatchNorm ``num_batches_tracked``) are copied from
    member 0. Tied weights (one tensor under several names) are averaged once. The members are not modified.

    Args:
        members: models of one architecture with identical weight names and shapes, or their
            ``save_pretrained`` directories (loaded strictly, safetensors only).
        bn_dataloader: training batches used to re-estimate BatchNorm statistics (see `recompute_batchnorm`).
            Models with BatchNorm and no loader get a warning explaining why this matters.
        warn_batchnorm: set False to silence that warning when you recompute the statistics yourself.
    """
    return _finish(weighted_average(members), bn_dataloader, warn_batchnorm)


@torch.no_grad()
def greedy_soup(
    members: Sequence[PreTrainedModel | str | os.PathLike],
    eval_fn: Callable[[PreTrainedModel], float],
    bn_dataloader: Iterable | None = None,
) -> tuple[PreTrainedModel, list[int]]:
    """Greedy soup (Wortsman et al., 2022): add members in order of held-out score while the score improves.

    Members are sorted by ``eval_fn(member)`` (higher is better); starting from the best one, each next member
    is kept only if the uniform soup with it scores *strictly* higher than without it. As in model-soups, a
    running sum of the chosen members is kept and each candidate soup ``(sum + member) / (n + 1)`` is written
    into one working model: K soups are built in all, never a copy per try, and directories are loaded one at
    a time (memory: the sum, the working model and the member being tried).

    ``eval_fn`` must score a HELD-OUT split (a validation split carved from the training data), never the test
    set: the greedy choice is a fit on that data, and reporting test accuracy of a soup picked on the test set
    is optimistic. Build one with `make_accuracy_eval_fn(validation_loader)`, which refuses an empty loader.

    Returns:
        ``(soup, chosen_indices)`` with indices into `members`, in the order they were added.
    """
    members = _sources(members)

    def score(model: nn.Module) -> float:
        value = float(eval_fn(model))
        if not math.isfinite(value):
            raise ValueError(
                f"eval_fn returned {value}; greedy_soup needs a finite held-out score. An empty held-out set "
                "gives NaN: pass a non-empty validation split (never the test set)."
            )
        return value

    scores = [score(_materialise(m)) for m in tqdm(members, desc="greedy soup: scoring members", leave=False)]
    order = sorted(range(len(members)), key=lambda i: scores[i], reverse=True)
    soup = _materialise(
        members[order[0]], copy_module=True
    )  # the working model every candidate is written to
    ref_shapes = {k: tuple(v.shape) for k, v in soup.state_dict().items()}
    running = _RunningSum(soup.state_dict(), _floating_names(soup))
    chosen, best = [order[0]], scores[order[0]]
    for i in tqdm(order[1:], desc="greedy soup: adding members", leave=False):
        model = _materialise(members[i])
        state = _check_like(soup, ref_shapes, model, i)
        running.write_mean(soup, plus=state)
        if bn_dataloader is not None:
            recompute_batchnorm(soup, bn_dataloader)
        value = score(soup)
        if value > best:
            running.add(state)
            chosen, best = [*chosen, i], value
        del model, state
    running.write_mean(soup)
    assert_finite(soup, f"the greedy soup of members {chosen}")
    return _finish(soup, bn_dataloader, warn=True), chosen


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, dataloader: Iterable, max_batches: int | None = None) -> nn.Module:
    """Re-estimate BatchNorm running statistics of `model` (e.g. a soup) on training batches, in place.

    Running statistics are reset and accumulated as an exact cumulative average (``momentum=None``) over the
    loader, in train mode without gradients; momenta and train/eval modes are restored afterwards. Models
    without BatchNorm are returned unchanged.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return model
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    seen = 0
    try:
        model.train()
        for step, batch in enumerate(tqdm(dataloader, desc="recompute BatchNorm", leave=False)):
            if max_batches is not None and step >= max_batches:
                break
            inputs, _ = split_batch(batch, model)
            model(**inputs)
            seen += 1
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    if seen == 0:
        raise ValueError(
            "recompute_batchnorm got an empty dataloader; BatchNorm statistics were reset to defaults."
        )
    return model
