"""The one weighted running mean of hf-ens: ``sum_k w_k theta_k / sum_k w_k``, in float32 or wider.

Used by the full-model soups (`hf_ens.soups.weighted_average`, `uniform_soup`, `greedy_soup`), the basin
interpolation, the merges (`hf_ens.merges`) and the LoRA soups (`hf_ens.adapters.lora_uniform_soup`, whose
tensors are the members' merged deltas and ``modules_to_save`` copies). Narrower floats are accumulated in
float32 (a bf16 soup is not rounded K times), float64 stays float64; tied weights (one storage under several
names) are averaged once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["floating_names", "accumulation_dtype", "check_weights", "RunningSum", "weighted_mean"]


def check_weights(weights: Sequence[float] | None, n: int, what: str = "member") -> list[float]:
    """`weights` as floats (default: n ones), refused (ValueError) unless one finite number per `what` with a
    non-zero sum."""
    weights = [1.0] * n if weights is None else list(weights)
    if len(weights) != n or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
    ):
        raise ValueError(f"Need one finite weight per {what} ({n}); got {weights!r}.")
    if sum(weights) == 0:
        raise ValueError(f"The averaging weights sum to 0 ({weights!r}); pass weights with a non-zero sum.")
    return [float(w) for w in weights]


def floating_names(model: nn.Module) -> list[str]:
    """State-dict names of `model`'s floating tensors, one per storage: tied weights are averaged once."""
    seen, names = set(), []
    for name, t in model.state_dict().items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        key = (t.untyped_storage().data_ptr() + t.storage_offset(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 (complex64) for narrower floats, so a bf16 soup is not rounded K times; wider stays wider."""
    if t.dtype in (torch.float64, torch.complex128):
        return t.dtype
    return torch.complex64 if t.is_complex() else torch.float32


class RunningSum:
    """``sum_k w_k * theta_k`` of the floating tensors named `names`, in float32 or wider, state by state.

    With ``alias=True`` the sum lives in the tensors of the first state where their dtype allows (a model
    that becomes the average), so averaging K fp32 members holds two state dicts: the sum and one member.
    """

    def __init__(self, state: dict[str, torch.Tensor], names: list[str], weight: float = 1.0, alias=False):
        self.sum: dict[str, torch.Tensor] = {}
        for name in names:
            t, dtype = state[name], accumulation_dtype(state[name])
            value = t if alias and t.dtype == dtype else t.to(dtype, copy=True)
            self.sum[name] = value.mul_(weight) if weight != 1 else value
        self.total = float(weight)

    def add(self, state: dict[str, torch.Tensor], weight: float = 1.0) -> None:
        for name, acc in self.sum.items():
            value = state[name].to(device=acc.device, dtype=acc.dtype)
            acc.add_(value) if weight == 1 else acc.add_(value, alpha=weight)
        self.total += weight

    def write_mean(self, model: nn.Module, plus: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``sum / total`` into `model`, in its dtypes; this ends the sum (it is divided in place).

        With `plus`, write the candidate ``(sum + plus) / (total + 1)`` and keep the sum: one tensor at a time
        is allocated, so a greedy try costs no copy of a whole soup.
        """
        total = self.total + (plus is not None)
        target = model.state_dict()
        for name, acc in self.sum.items():
            if plus is not None:
                value = torch.add(acc, plus[name].to(device=acc.device, dtype=acc.dtype)).div_(total)
            else:
                value = acc.div_(total) if total != 1 else acc
            if value.data_ptr() != target[name].data_ptr():  # an aliased sum already is the model's tensor
                target[name].copy_(value)
        if plus is None:
            self.total = 1.0

    def mean(self) -> dict[str, torch.Tensor]:
        """``sum / total`` (float32 or wider); this ends the sum (it is divided in place)."""
        for acc in self.sum.values():
            acc.div_(self.total)
        self.total = 1.0
        return self.sum


def weighted_mean(tensors: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_k w_k t_k / sum_k w_k`` of same-shaped tensors (float32 or wider), streamed: a `RunningSum` of
    one tensor (for LoRA deltas and ``modules_to_save`` copies)."""
    running = None
    for t, w in zip(tensors, weights, strict=True):
        if running is None:
            running = RunningSum({"t": t}, ["t"], w)
        else:
            running.add({"t": t}, w)
    if running is None:
        raise ValueError("weighted_mean got no tensors.")
    return running.mean()["t"]
