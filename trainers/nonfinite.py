"""A non-finite training loss, noted on the device and read where the host waits for the device anyway.

Why: ``bool(torch.isfinite(loss))`` after every step makes the host wait for the GPU to finish that step
before it can queue the next one, so the GPU idles while Python prepares each step (the plain Trainer's
``logging_nan_inf_filter`` costs the same). `LossWatch.update` keeps the first non-finite step and its loss
in two device tensors instead; `LossWatch.first_nonfinite` reads them (one synchronisation) at logging,
evaluation, checkpoint and member-snapshot steps, before anything is written: a diverged run still stops
before it saves NaN weights, and the error still names the step where the loss first left the finite range.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_ens.checks import NonFiniteError


class LossWatch:
    """The first optimizer step whose loss was NaN or Inf, kept on the loss's device."""

    def __init__(self) -> None:
        self._step: torch.Tensor | None = None  # -1 while every loss was finite
        self._loss: torch.Tensor | None = None

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Note `loss` (any shape) of optimizer step `step` (0-based); no host synchronisation."""
        value = loss.detach().float().sum()
        if self._step is None or self._step.device != value.device:
            self._step = torch.full((), -1, dtype=torch.long, device=value.device)
            self._loss = torch.zeros((), device=value.device)
        first = ~torch.isfinite(value) & (self._step < 0)
        self._step = torch.where(first, step, self._step)
        self._loss = torch.where(first, value, self._loss)

    def first_nonfinite(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss noted, else None; waits for the device."""
        if self._step is None:
            return None
        step = int(self._step)
        return None if step < 0 else (step, float(self._loss))

    def check(self, describe: Callable[[float, int], str]) -> None:
        """Raise `NonFiniteError` with ``describe(loss, step)`` if a non-finite loss was noted (waits for the
        device)."""
        found = self.first_nonfinite()
        if found is not None:
            step, loss = found
            raise NonFiniteError(describe(loss, step))
