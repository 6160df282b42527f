"""Finite-weight checks: NaN or Inf weights silently make every prediction class 0, so catch them early."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["NonFiniteError", "nonfinite_tensors", "assert_finite", "raise_nonfinite"]


class NonFiniteError(ValueError):
    """A model or state dict holds NaN/Inf weights (training diverged, or a file was damaged)."""


def nonfinite_tensors(weights: nn.Module | Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors (parameters and buffers) that hold a NaN or an Inf."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    return [
        name
        for name, t in state.items()
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def assert_finite(weights: nn.Module | Mapping[str, torch.Tensor], what: str) -> None:
    """Raise `NonFiniteError` naming `what` (e.g. "member 3") and the first offending tensors."""
    raise_nonfinite(nonfinite_tensors(weights), what)


def raise_nonfinite(bad: list[str], what: str) -> None:
    """`assert_finite`'s refusal, for names found elsewhere (e.g. in the shards of an FSDP2 model)."""
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(
            f"{what} has non-finite (NaN/Inf) weights in {len(bad)} tensor(s): {shown}. Training diverged "
            "(lower the learning rate / cycle learning rate) or the weights were damaged; refusing to use it."
        )
