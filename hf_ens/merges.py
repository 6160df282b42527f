"""Merges computed from the pre-trained base: task arithmetic, TIES and DARE, for full and LoRA members.

A soup averages the members' weights; a *merge* works on their task vectors ``tau_k = theta_k - theta_0``
(what fine-tuning changed in the pre-trained base ``theta_0``) and returns ``theta_0 + scale * merge(tau)``:

- ``task_arithmetic``: ``sum_k w_k tau_k`` (Ilharco et al., 2023). With the default weights ``1/K`` and
  ``scale=1`` it IS the uniform soup, and it is computed by the one averaging function of hf-ens
  (`hf_ens.soups.weighted_average` of ``[base, *members]``, weights ``[1 - scale sum w, scale w_1, ...]``);
- ``ties``: keep each task vector's top-``density`` entries by magnitude, elect a sign per entry (sign of the
  sum), average the entries that agree with it (Yadav et al., 2023, "TIES-Merging");
- ``dare_linear`` / ``dare_ties``: drop each entry with probability ``1 - density`` and rescale the rest by
  ``1 / density`` (Yu et al., 2024, "DARE"), then add (``dare_linear``) or TIES-merge (``dare_ties``).

The per-tensor operators are peft's (``peft.utils.merge_utils``, what ``add_weighted_adapter`` applies), so
hf-ens and peft merge alike. Default weights make every method an average: ``1/K`` for the summing methods
(task arithmetic, DARE linear), ``1`` for the disjoint-mean ones (TIES, DARE-TIES).

For LoRA members (`lora_merge`) the task vector of an adapted weight is its merged delta ``scale_k B_k A_k``:
merged into a plain model (exact), or, with ``rank=r``, as ONE LoRA adapter of rank r by truncated SVD of the
merged delta (peft's ``add_weighted_adapter`` with its ``svd`` / ``ties_svd`` / ``dare_*_svd`` types).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .averaging import accumulation_dtype as _accumulation_dtype
from .averaging import floating_names as _floating_names
from .members import check_like as _check_like
from .soups import Member, _materialise, _sources, weighted_average

__all__ = ["MERGE_METHODS", "merge_models", "task_arithmetic", "lora_merge", "default_merge_weights"]

MERGE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
_DISJOINT = ("ties", "dare_ties")  # a disjoint mean over agreeing members: weights 1 average already
_SVD_TYPES = {
    "task_arithmetic": "svd",
    "ties": "ties_svd",
    "dare_linear": "dare_linear_svd",
    "dare_ties": "dare_ties_svd",
}


def default_merge_weights(method: str, k: int) -> list[float]:
    """The weights that make `method` an average of K task vectors: 1/K when it sums, 1 when it means."""
    return [1.0] * k if method in _DISJOINT else [1.0 / k] * k


def _check_args(method: str, k: int, weights, density: float, scale: float, sign="total") -> list[float]:
    if sign not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {sign!r}.")
    if method not in MERGE_METHODS:
        raise ValueError(f"Unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}.")
    weights = default_merge_weights(method, k) if weights is None else [float(w) for w in weights]
    if len(weights) != k or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"Need one finite weight per member ({k}); got {weights!r}.")
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(
            f"density must be in (0, 1] (the share of each task vector kept), got {density!r}; "
            "DARE's drop rate is 1 - density."
        )
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}.")
    if method == "task_arithmetic" and density != 1.0:
        raise ValueError("task_arithmetic keeps every entry: density must be 1 (ties and dare_* prune).")
    return weights


def _merge_tensors(
    method: str, deltas: list[torch.Tensor], weights: list[float], density: float, sign_method: str
) -> torch.Tensor:
    """peft's merge of K task tensors (float32), ``density >= 1`` meaning nothing is pruned (no warning)."""
    from peft.utils import merge_utils

    w = torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        if method == "task_arithmetic":
            return merge_utils.task_arithmetic(deltas, w)
        if method == "ties":
            return merge_utils.ties(deltas, w, density, sign_method)
        if method == "dare_linear":
            return merge_utils.dare_linear(deltas, w, density)
        return merge_utils.dare_ties(deltas, w, density, sign_method)


@contextlib.contextmanager
def _seeded(seed: int | None):
    """DARE draws its masks from torch's RNG: a seed gives the same merge each time, caller's RNG kept."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------- full members
@torch.no_grad()
def task_arithmetic(
    base: Member, members: Sequence[Member], weights: Sequence[float] | None = None, scale: float = 1.0
) -> nn.Module:
    """``theta_0 + scale * sum_k w_k (theta_k - theta_0)`` (default ``w_k = 1/K``: the uniform soup).

    The same expression as ``sum_k w'_k theta_k`` over ``[base, *members]`` with weights summing to 1, so it
    is `weighted_average`: streamed (one member loaded at a time), float32 sums, tied weights kept tied.
    """
    members = _sources(members)
    weights = _check_args("task_arithmetic", len(members), weights, 1.0, scale)
    coefficients = [scale * w for w in weights]
    return weighted_average([base, *members], [1.0 - sum(coefficients), *coefficients])


@torch.no_grad()
def merge_models(
    base: Member,
    members: Sequence[Member],
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    density: float = 1.0,
    scale: float = 1.0,
    majority_sign_method: str = "total",
    seed: int | None = 0,
) -> nn.Module:
    """Merge full members fine-tuned from `base` (see the module docstring); returns a model of base's class.

    Args:
        base: the pre-trained model the members were fine-tuned from (a module or its directory).
        members: the fine-tuned models (modules or ``save_pretrained`` directories), of base's architecture.
        method: one of `MERGE_METHODS`.
        weights: one per member (default: `default_merge_weights`).
        density: share of each task vector kept (TIES: by magnitude; DARE: at random, drop rate 1 - density).
        scale: ``lambda`` multiplying the merged task vector.
        majority_sign_method: TIES sign election, "total" (sign of the sum) or "frequency" (majority vote).
        seed: seed of DARE's random drop (None: the global RNG as it stands).

    Memory: task arithmetic streams like a soup; TIES and DARE hold the K members at once (they combine the K
    values of every entry), plus the base and the result.
    """
    members = _sources(members)
    weights = _check_args(method, len(members), weights, density, scale, majority_sign_method)
    if method == "task_arithmetic":
        return task_arithmetic(base, members, weights, scale)
    out = _materialise(base, copy_module=True)
    ref_shapes = {k: tuple(v.shape) for k, v in out.state_dict().items()}
    target = out.state_dict()
    states = [_check_like(out, ref_shapes, _materialise(m), i + 1) for i, m in enumerate(members)]
    with _seeded(seed):
        for name in _floating_names(out):  # one per storage: tied weights are merged once and stay tied
            theta0 = target[name].to(_accumulation_dtype(target[name]))
            deltas = [s[name].to(device=theta0.device, dtype=theta0.dtype) - theta0 for s in states]
            merged = _merge_tensors(method, deltas, weights, density, majority_sign_method)
            target[name].copy_(theta0.add_(merged, alpha=scale))
    return out


# --------------------------------------------------------------------------------------------- LoRA members
@torch.no_grad()
def lora_merge(
    model,
    adapters: Sequence[str],
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    density: float = 1.0,
    scale: float = 1.0,
    majority_sign_method: str = "total",
    seed: int | None = 0,
    rank: int | None = None,
    name: str = "merge",
):
    """Merge LoRA members (adapters of one ``PeftModel``) from the frozen base; `model` is not modified.

    ``rank=None``: ONE plain transformers model, every adapted weight ``W0 + scale * merge_k(s_k B_k A_k)``
    and every ``modules_to_save`` copy ``original + scale * merge_k(copy_k - original)``: exact, no peft
    needed to load it. With the default weights, ``method="task_arithmetic"`` is `lora_uniform_soup`.

    ``rank=r``: a copy of `model` holding only adapter `name` of rank r, the truncated SVD of the same merged
    deltas (peft's ``add_weighted_adapter``, combination types ``svd``, ``ties_svd``, ``dare_linear_svd``,
    ``dare_ties_svd``); the base stays frozen and shared. r >= the layers' smaller dimension is exact.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    from .lora_config import check_adapter_names

    adapters = check_adapter_names(model, adapters)
    weights = _check_args(method, len(adapters), weights, density, scale, majority_sign_method)
    if rank is not None:
        args = (method, weights, density, scale, majority_sign_method, seed, rank, name)
        return _lora_merge_adapter(model, adapters, *args)
    merged_model = copy.deepcopy(model)
    with _seeded(seed):
        for module in merged_model.modules():
            if isinstance(module, LoraLayer):
                names = [a for a in adapters if a in module.lora_A or a in module.lora_embedding_A]
                if len(names) not in (0, len(adapters)):
                    raise ValueError(f"Adapters {adapters} do not all adapt the same layers.")
                if names:
                    base = module.get_base_layer().weight
                    deltas = [module.get_delta_weight(a).float() for a in adapters]
                    delta = _merge_tensors(method, deltas, weights, density, majority_sign_method)
                    base.copy_((base.float() + scale * delta.to(base.device)).to(base.dtype))
            elif isinstance(module, ModulesToSaveWrapper):
                names = [a for a in adapters if a in module.modules_to_save]
                if len(names) not in (0, len(adapters)):
                    raise ValueError(f"Adapters {adapters} do not all train the same modules_to_save.")
                if names:
                    original = module.original_module.state_dict()
                    target = module.modules_to_save[adapters[0]].state_dict()
                    states = [module.modules_to_save[a].state_dict() for a in adapters]
                    for key, value in target.items():
                        if value.is_floating_point():
                            theta0 = original[key].float()
                            deltas = [s[key].float() - theta0 for s in states]
                            delta = _merge_tensors(method, deltas, weights, density, majority_sign_method)
                            value.copy_((theta0 + scale * delta).to(value.dtype))
    merged_model.set_adapter(adapters[0])  # unload() keeps the active adapter's modules_to_save copy
    plain = merged_model.unload()
    plain.train(model.training)
    return plain


def _lora_merge_adapter(model, adapters, method, weights, density, scale, sign_method, seed, rank, name):
    """`lora_merge` with ``rank=r``: peft's ``add_weighted_adapter`` (SVD types) on a copy of `model`."""
    from peft.utils import ModulesToSaveWrapper

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int (or None for a merged plain model), got {rank!r}.")
    if name in model.peft_config:
        raise ValueError(f"The model already holds an adapter named {name!r}; choose another name.")
    if any(isinstance(m, ModulesToSaveWrapper) and m.modules_to_save for m in model.modules()):
        raise ValueError(
            "A merged adapter of rank r cannot hold modules_to_save (peft merges LoRA factors only); use "
            "rank=None for a merged plain model."
        )
    from peft.tuners.lora import LoraLayer

    smallest = min(
        min(m.get_base_layer().weight.shape[:2])
        for m in model.modules()
        if isinstance(m, LoraLayer) and adapters[0] in m.lora_A
    )
    if rank > smallest:
        raise ValueError(f"rank={rank} exceeds the smallest adapted layer's dimension ({smallest}).")
    out = copy.deepcopy(model)
    with _seeded(seed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        out.add_weighted_adapter(
            list(adapters),
            [scale * w for w in weights],
            name,
            combination_type=_SVD_TYPES[method],
            svd_rank=rank,
            svd_full_matrices=False,
            density=density,
            majority_sign_method=sign_method,
        )
    for adapter in list(out.peft_config):
        if adapter != name:
            out.delete_adapter(adapter)
    out.set_adapter(name)
    return out.train(model.training)
