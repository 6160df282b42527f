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

from .evaluation import _predict, _split_batch

__all__ = ["uniform_soup", "greedy_soup", "recompute_batchnorm", "make_accuracy_eval_fn", "has_batchnorm"]

_BN_WARNING = (
    "This model has BatchNorm layers and no `bn_dataloader` was given. Averaging weights does not average "
    "the statistics the network would produce: the soup's activations have different means and variances "
    "than any member's, so the copied running_mean/running_var are wrong and accuracy can collapse. Pass a "
    "training dataloader (`bn_dataloader=...`) or call `recompute_batchnorm(soup, train_loader)` afterwards."
)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether `model` holds BatchNorm layers (whose running statistics a soup must recompute)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def _check_members(members: Sequence[nn.Module | str | os.PathLike]) -> list[nn.Module]:
    members = list(members)
    if not members:
        raise ValueError("A soup needs at least one member; got an empty list.")
    if any(isinstance(m, (str, os.PathLike)) for m in members):
        from .ensemble import _load_member  # strict safetensors loading, as for ensembles

        members = [_load_member(m) if isinstance(m, (str, os.PathLike)) else m for m in members]
    for i, m in enumerate(members):
        if not isinstance(m, nn.Module):
            raise TypeError(f"Soup member {i} is a {type(m).__name__}, expected a torch/transformers model.")
    ref = {k: tuple(v.shape) for k, v in members[0].state_dict().items()}
    for i, m in enumerate(members[1:], start=1):
        if type(m) is not type(members[0]):
            raise ValueError(
                f"Cannot average weights of different architectures: member 0 is "
                f"{type(members[0]).__name__}, member {i} is {type(m).__name__}."
            )
        other = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        if other != ref:
            diff = sorted(set(ref.items()) ^ set(other.items()))[:5]
            raise ValueError(f"Member {i} has different weight names or shapes than member 0, e.g. {diff}.")
    return members


@torch.no_grad()
def uniform_soup(
    members: Sequence[PreTrainedModel | str | os.PathLike],
    bn_dataloader: Iterable | None = None,
    warn_batchnorm: bool = True,
) -> PreTrainedModel:
    """Average the members' weights uniformly and return an ordinary model of the members' class.

    Floating tensors are accumulated in float32 (float64 stays float64) and cast back to the member dtype, so
    a bf16 soup is not rounded K times. Integer buffers (e.g. BatchNorm ``num_batches_tracked``) are copied
    from member 0. Tied weights (one tensor under several names) are averaged once. The result is a deep copy
    of member 0 holding the averaged state; the members are not modified.

    Args:
        members: models of one architecture with identical weight names and shapes, or their
            ``save_pretrained`` directories (loaded strictly, safetensors only).
        bn_dataloader: training batches used to re-estimate BatchNorm statistics (see `recompute_batchnorm`).
            Models with BatchNorm and no loader get a warning explaining why this matters.
        warn_batchnorm: set False to silence that warning when you recompute the statistics yourself.
    """
    members = _check_members(members)
    soup = copy.deepcopy(members[0])
    states = [m.state_dict() for m in members]
    averaged: dict[str, torch.Tensor] = {}
    done: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}  # tied weights share storage
    for name, ref in states[0].items():
        key = (ref.untyped_storage().data_ptr() + ref.storage_offset(), ref.dtype, tuple(ref.shape))
        if key in done:
            averaged[name] = done[key]
            continue
        if ref.is_floating_point() or ref.is_complex():
            acc_dtype = ref.dtype if ref.dtype in (torch.float64, torch.complex128) else None
            acc_dtype = acc_dtype or (torch.complex64 if ref.is_complex() else torch.float32)
            acc = torch.zeros(ref.shape, dtype=acc_dtype, device=ref.device)
            for state in states:
                acc += state[name].to(device=ref.device, dtype=acc_dtype)
            value = (acc / len(states)).to(ref.dtype)
        else:
            value = ref.clone()
        averaged[name] = done[key] = value
    soup.load_state_dict(averaged, strict=True)
    if bn_dataloader is not None:
        recompute_batchnorm(soup, bn_dataloader)
    elif warn_batchnorm and has_batchnorm(soup):
        warnings.warn(_BN_WARNING, UserWarning, stacklevel=2)
    return soup


def greedy_soup(
    members: Sequence[PreTrainedModel | str | os.PathLike],
    eval_fn: Callable[[PreTrainedModel], float],
    bn_dataloader: Iterable | None = None,
) -> tuple[PreTrainedModel, list[int]]:
    """Greedy soup (Wortsman et al., 2022): add members in order of held-out score while the score improves.

    Members are sorted by ``eval_fn(member)`` (higher is better); starting from the best one, each next member
    is kept only if the uniform soup with it scores *strictly* higher than without it.

    ``eval_fn`` must score a HELD-OUT split (a validation split carved from the training data), never the test
    set: the greedy choice is a fit on that data, and reporting test accuracy of a soup picked on the test set
    is optimistic. Build one with `make_accuracy_eval_fn(validation_loader)`, which refuses an empty loader.

    Returns:
        ``(soup, chosen_indices)`` with indices into `members`, in the order they were added.
    """
    members = _check_members(members)

    def score(model: PreTrainedModel) -> float:
        value = float(eval_fn(model))
        if not math.isfinite(value):
            raise ValueError(
                f"eval_fn returned {value}; greedy_soup needs a finite held-out score. An empty held-out set "
                "gives NaN: pass a non-empty validation split (never the test set)."
            )
        return value

    scores = [score(m) for m in tqdm(members, desc="greedy soup: scoring members", leave=False)]
    order = sorted(range(len(members)), key=lambda i: scores[i], reverse=True)
    chosen, best = [order[0]], scores[order[0]]
    for i in tqdm(order[1:], desc="greedy soup: adding members", leave=False):
        candidate = uniform_soup([members[j] for j in [*chosen, i]], bn_dataloader, warn_batchnorm=False)
        value = score(candidate)
        if value > best:
            chosen, best = [*chosen, i], value
    return uniform_soup([members[j] for j in chosen], bn_dataloader), chosen


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
            inputs, _ = _split_batch(batch, model)
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


def make_accuracy_eval_fn(dataloader: Iterable) -> Callable[[nn.Module], float]:
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
        logits, labels = _predict(model, dataloader, empty_error=empty)
        if len(labels) == 0:
            raise ValueError(empty)
        return (logits.argmax(-1) == labels).sum().item() / len(labels)

    return eval_fn
