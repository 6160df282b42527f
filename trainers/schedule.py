"""The one learning-rate schedule of a StarSSE / SSE / Local DE run, as a function of the optimizer step.

The run is a single training loop of ``model1_steps + (num_members - 1) * cycle_steps`` optimizer steps (steps
are counted after gradient accumulation, exactly like ``TrainerState.global_step``):

* steps ``[0, model1_steps)`` follow the configured Trainer schedule (``lr_scheduler_type``, ``warmup_steps``)
  of an ordinary fine-tune of ``model1_steps`` steps;
* every later cycle restarts at ``cycle_learning_rate`` (after an optional linear warmup) and anneals by
  cosine to ~0 over ``cycle_steps``.

The trainer, the recipe's LR plot and the tests all call :func:`starsse_lr_lambda` (through
:class:`CyclePlan`), so there is exactly one definition of the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import get_scheduler

__all__ = ["CyclePlan", "cosine_cycle_factor", "model1_lr_lambda", "plan_cycles", "starsse_lr_lambda"]


def cosine_cycle_factor(step_in_cycle: int, cycle_steps: int, warmup_steps: int) -> float:
    """LR factor inside one later cycle: linear warmup from 0, then half a cosine from 1 down to ~0.

    Same formula as transformers' ``get_cosine_schedule_with_warmup`` so that a cycle without warmup starts at
    exactly the peak and its last step is one cosine step above 0.
    """
    if step_in_cycle < warmup_steps:
        return step_in_cycle / max(1, warmup_steps)
    progress = (step_in_cycle - warmup_steps) / max(1, cycle_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def model1_lr_lambda(
    lr_scheduler_type: str,
    num_training_steps: int,
    num_warmup_steps: int,
    scheduler_specific_kwargs: dict | None = None,
) -> Callable[[int], float]:
    """The LR factor function of an ordinary Trainer schedule (the one model 1 follows).

    Built by transformers' own ``get_scheduler`` on a throw-away optimizer, so every step-based scheduler type
    keeps its exact upstream definition (linear, cosine, polynomial, warmup_stable_decay, ...).
    """
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(
        lr_scheduler_type,
        optimizer=dummy,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=dict(scheduler_specific_kwargs or {}),
    )
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas:
        raise ValueError(
            f"lr_scheduler_type={lr_scheduler_type!r} is not a function of the optimizer step; "
            "StarSSETrainer needs a step-based schedule for model 1 "
            "(e.g. 'linear', 'cosine', 'constant_with_warmup')."
        )
    return lambdas[0]


def starsse_lr_lambda(
    step: int,
    *,
    model1_steps: int,
    cycle_steps: int,
    num_members: int,
    model1_lambda: Callable[[int], float],
    cycle_lr_ratio: float | None = 1.0,
    cycle_warmup_steps: int = 0,
    repeat_model1: bool = False,
) -> float:
    """LR factor (multiplier of ``learning_rate``) at optimizer step ``step`` (0-based, before the update).

    ``cycle_lr_ratio`` is ``cycle_learning_rate / learning_rate``; None while ``cycle_learning_rate="auto"``
    has not chosen it yet (later cycles then get NaN). With ``repeat_model1`` (Local DE) every later
    cycle replays model 1's schedule instead of the cosine restart. Steps past the last cycle return 0.
    """
    if step < model1_steps:
        return float(model1_lambda(step))
    cycle, step_in_cycle = divmod(step - model1_steps, cycle_steps)
    if cycle >= num_members - 1:
        return 0.0
    if repeat_model1:
        return float(model1_lambda(step_in_cycle))
    if cycle_lr_ratio is None:
        return math.nan  # the Trainer asks one step ahead, before the probes; never trained with
    return cycle_lr_ratio * cosine_cycle_factor(step_in_cycle, cycle_steps, cycle_warmup_steps)


@dataclass(frozen=True)
class CyclePlan:
    """Where every cycle of a run starts and ends, in optimizer steps, plus the LR at any step.

    ``cycle_learning_rate`` is None until ``cycle_learning_rate="auto"`` has chosen it (after model 1).
    """

    model1_steps: int
    cycle_steps: int
    num_members: int
    learning_rate: float
    cycle_learning_rate: float | None
    cycle_warmup_steps: int
    lr_scheduler_type: str = "linear"
    model1_warmup_steps: int = 0
    lr_scheduler_kwargs: tuple = ()
    repeat_model1: bool = False

    @property
    def total_steps(self) -> int:
        return self.model1_steps + (self.num_members - 1) * self.cycle_steps

    @property
    def boundaries(self) -> list[int]:
        """Global step at which member k is complete (end of cycle k), for k = 0..K-1."""
        return [self.model1_steps + k * self.cycle_steps for k in range(self.num_members)]

    def cycle_start(self, k: int) -> int:
        return 0 if k == 0 else self.boundaries[k - 1]

    def cycle_of_step(self, step: int) -> int:
        """Index of the cycle that optimizer step ``step`` (0-based) belongs to."""
        if step < self.model1_steps:
            return 0
        return min(1 + (step - self.model1_steps) // self.cycle_steps, self.num_members - 1)

    def lr_lambda(self) -> Callable[[int], float]:
        """The LR factor function of the whole run (a closure over :func:`starsse_lr_lambda`)."""
        model1 = model1_lr_lambda(
            self.lr_scheduler_type,
            self.model1_steps,
            self.model1_warmup_steps,
            dict(self.lr_scheduler_kwargs),
        )
        if self.cycle_learning_rate is None:
            ratio = None
        else:
            ratio = self.cycle_learning_rate / self.learning_rate if self.learning_rate > 0 else 0.0

        def lr_lambda(step: int) -> float:
            return starsse_lr_lambda(
                step,
                model1_steps=self.model1_steps,
                cycle_steps=self.cycle_steps,
                num_members=self.num_members,
                model1_lambda=model1,
                cycle_lr_ratio=ratio,
                cycle_warmup_steps=self.cycle_warmup_steps,
                repeat_model1=self.repeat_model1,
            )

        return lr_lambda

    def learning_rates(self) -> list[float]:
        """LR of every optimizer step of the run (for plots and tests)."""
        if self.cycle_learning_rate is None and self.num_members > 1:
            raise ValueError("cycle_learning_rate='auto' has not chosen the cycle LR yet (after model 1).")
        fn = self.lr_lambda()
        return [self.learning_rate * fn(step) for step in range(self.total_steps)]


def plan_cycles(args, num_update_steps_per_epoch: int) -> CyclePlan:
    """Turn a ``StarSSEConfig`` and the number of optimizer steps per epoch into a :class:`CyclePlan`.

    Epoch counts become steps the same way the Trainer does it (``ceil(epochs * steps_per_epoch)``); warmups
    given as a fraction (< 1) become ``ceil(fraction * steps)`` like ``TrainingArguments.get_warmup_steps``.
    """
    epochs = {"num_train_epochs": args.num_train_epochs, "cycle_epochs": args.cycle_epochs}
    for name, value in epochs.items():
        if not math.isfinite(value * num_update_steps_per_epoch):
            raise ValueError(f"{name}={value} is too large: more optimizer steps than a float holds.")
    model1_steps = math.ceil(args.num_train_epochs * num_update_steps_per_epoch)
    if args.method == "local_de":
        cycle_steps = model1_steps  # every member is a full, independent fine-tune
    else:
        cycle_steps = math.ceil(args.cycle_epochs * num_update_steps_per_epoch)
    if model1_steps < 1 or cycle_steps < 1:
        raise ValueError(
            f"num_train_epochs={args.num_train_epochs} and cycle_epochs={args.cycle_epochs} give "
            f"{model1_steps} and {cycle_steps} optimizer steps with "
            f"{num_update_steps_per_epoch} steps per epoch; every cycle needs at least one step."
        )
    local_de = args.method == "local_de"
    cw = args.cycle_warmup_steps
    cycle_warmup = int(cw) if cw >= 1 else math.ceil(cw * cycle_steps)
    if not local_de and cycle_warmup >= cycle_steps and args.num_members > 1:
        raise ValueError(
            f"cycle_warmup_steps={cw} leaves no annealing inside a cycle of {cycle_steps} steps."
        )
    model1_warmup = args.get_warmup_steps(model1_steps)
    if args.warmup_steps >= 1 and model1_warmup >= model1_steps:  # a fraction is scaled to the run
        raise ValueError(
            f"warmup_steps={args.warmup_steps} leaves no decay in model 1's {model1_steps} optimizer steps."
        )
    return CyclePlan(
        model1_steps=model1_steps,
        cycle_steps=cycle_steps,
        num_members=args.num_members,
        learning_rate=args.learning_rate,
        cycle_learning_rate=args.learning_rate
        if local_de
        else None
        if args.cycle_learning_rate == "auto"
        else args.cycle_learning_rate,
        cycle_warmup_steps=0 if local_de else cycle_warmup,
        lr_scheduler_type=str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        model1_warmup_steps=model1_warmup,
        lr_scheduler_kwargs=tuple(sorted((args.lr_scheduler_kwargs or {}).items())),
        repeat_model1=local_de,
    )
