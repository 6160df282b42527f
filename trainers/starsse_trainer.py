"""StarSSE, SSE and Local DE as ONE ``transformers.Trainer`` run.

The whole ensemble is a single training loop of ``model1_steps + (K - 1) * cycle_steps`` optimizer steps with
one LR schedule (:mod:`trainers.schedule`). A callback acts at cycle boundaries, keyed on
``TrainerState.global_step`` (the counter that gradient accumulation and skipped fp16 steps cannot
desynchronise):

* at the end of cycle k (``on_step_end``) the weights are written atomically to ``members/member_{k:02d}``;
* at the start of cycle k >= 1 (``on_step_begin`` of its first step) the weights are reset to the cycle's
  *anchor* and the optimizer state is cleared. The anchor is the one mechanism behind the three methods:
  ``sse`` has none (continue from the current weights), ``starsse`` anchors at model 1, ``local_de`` at the
  original weights plus a member-seeded new head and data order.

Everything needed to continue (anchor weights, members written, cycles started, the plan) is stored inside
each Trainer checkpoint, so ``train(resume_from_checkpoint=...)`` reproduces an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch.utils.data import Sampler
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, set_seed
from transformers.utils import logging

from hf_ens.heads import reinit_task_head

from .schedule import CyclePlan, plan_cycles
from .starsse_config import StarSSEConfig

logger = logging.get_logger(__name__)

CYCLE_STATE_NAME = "starsse_state.json"
ANCHOR_NAME = "starsse_anchor.safetensors"
MEMBERS_DIR = "members"


class MemberSeededSampler(Sampler[int]):
    """Random order per epoch, drawn from ``(seed, epoch)``; with ``epochs_per_member``, from ``(seed +
    member, epoch within member)`` so that each Local DE member shuffles its data with its own seed.

    Stateless apart from ``set_epoch`` (which the Trainer calls each epoch), so a resumed run sees the same
    order.
    """

    def __init__(self, num_samples: int, seed: int, epochs_per_member: int | None = None):
        self.num_samples = num_samples
        self.seed = seed
        self.epochs_per_member = epochs_per_member
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def seed_of_epoch(self, epoch: int) -> tuple[int, int]:
        if self.epochs_per_member:
            member, local_epoch = divmod(epoch, self.epochs_per_member)
            return self.seed + member, local_epoch
        return self.seed, epoch

    def __iter__(self):
        seed = np.random.SeedSequence(list(self.seed_of_epoch(self.epoch))).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(seed))
        yield from torch.randperm(self.num_samples, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_samples


class _CycleCallback(TrainerCallback):
    """Starts cycles and snapshots members at the exact optimizer steps of the plan."""

    def __init__(self, trainer: StarSSETrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._on_train_begin()

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._maybe_start_cycle(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._maybe_snapshot(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.accelerator.wait_for_everyone()


class StarSSETrainer(Trainer):
    """A ``Trainer`` whose single ``train()`` call produces K ensemble members (StarSSE, SSE or Local DE).

    Members are ordinary ``save_pretrained`` directories listed by :attr:`member_paths`; :meth:`ensemble` and
    :meth:`soup` turn them into ``hf_ens`` objects. All other Trainer features keep working (gradient
    accumulation, eval/save strategies, callbacks, ``resume_from_checkpoint``, DDP, bf16/fp16).
    """

    args: StarSSEConfig

    def __init__(self, *args, **kwargs):
        config = kwargs["args"] if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if isinstance(config, StarSSEConfig):
            _ensure_writable(config.output_dir)  # before Trainer.__init__ tries to create it
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, StarSSEConfig):
            raise ValueError(f"StarSSETrainer needs args=StarSSEConfig(...), got {type(self.args).__name__}.")
        if self.lr_scheduler is not None:
            raise ValueError(
                "StarSSETrainer owns the LR schedule (trainers.schedule); do not pass a lr_scheduler."
            )
        self.plan: CyclePlan | None = None
        self.snapshot_seconds = 0.0  # time spent writing members (and copying the StarSSE anchor)
        self.cycle_start_seconds = 0.0  # time spent reloading anchors / resetting the optimizer
        self._anchor: dict[str, torch.Tensor] | None = None
        self._members_written = 0  # members 0..n-1 are on disk
        self.written_members: list[int] = []  # members this process wrote (only the main process writes)
        self._cycles_started = 0  # cycle 0 starts with training; cycle k >= 1 once its start was applied
        self._resumed_state: dict[str, Any] | None = None
        self._train_sampler: MemberSeededSampler | None = None
        self.add_callback(_CycleCallback(self))

    # ------------------------------------------------------------------ public API
    @property
    def members_dir(self) -> str:
        return os.path.join(self.args.output_dir, MEMBERS_DIR)

    @property
    def member_paths(self) -> list[str]:
        """``{output_dir}/members/member_{k:02d}`` for k = 0..K-1 (written at the end of cycle k)."""
        return [os.path.join(self.members_dir, f"member_{k:02d}") for k in range(self.args.num_members)]

    def lr_schedule(self) -> tuple[list[int], list[float], list[int]]:
        """(optimizer steps, LR used at each step, steps that end a member) of the run, for plots.

        Comes from the same :class:`~trainers.schedule.CyclePlan` the scheduler uses; known once ``train()``
        has sized the run.
        """
        if self.plan is None:
            raise ValueError("The schedule is sized when training starts: call trainer.train() first.")
        return list(range(self.plan.total_steps)), self.plan.learning_rates(), self.plan.boundaries

    def ensemble_metadata(self) -> dict[str, Any]:
        """The metadata stored with the ensemble (``ensemble_config.json`` and the model card)."""
        args = self.args
        config = getattr(self.model, "config", None)
        return {
            "method": args.method,
            "num_members": args.num_members,
            "learning_rate": args.learning_rate,
            "num_train_epochs": args.num_train_epochs,
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps,
            "cycle_epochs": args.cycle_epochs,
            "cycle_learning_rate": args.cycle_learning_rate,
            "cycle_warmup_steps": args.cycle_warmup_steps,
            "reset_optimizer": args.reset_optimizer,
            "model1_steps": self.plan.model1_steps if self.plan else None,
            "cycle_steps": self.plan.cycle_steps if self.plan else None,
            "base_model": getattr(config, "_name_or_path", None) or None,
            "seed": args.seed,
        }

    def ensemble(self):
        """The trained members as an ``hf_ens.EnsembleModel``."""
        from hf_ens import EnsembleModel

        self._check_members_complete()
        return EnsembleModel.from_members(
            self.member_paths, processor=self.processing_class, metadata=self.ensemble_metadata()
        )

    def soup(self):
        """Uniform weight average of the members (``hf_ens.uniform_soup``)."""
        from hf_ens import uniform_soup

        self._check_members_complete()
        return uniform_soup(self.member_paths)

    def _check_members_complete(self) -> None:
        missing = [p for p in self.member_paths if not os.path.isdir(p)]
        if missing:
            raise ValueError(f"Members not trained yet (run trainer.train() first): missing {missing}.")

    # ------------------------------------------------------------------ training set-up
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        self._resumed_state = None
        self._check_output_dir(resuming=bool(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _check_output_dir(self, resuming: bool) -> None:
        out = self.args.output_dir
        _ensure_writable(out)
        if resuming or self.args.overwrite_output_dir:
            return
        existing = [
            name
            for name in sorted(os.listdir(out))
            if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") or name == MEMBERS_DIR
        ]
        if existing:
            raise ValueError(
                f"output_dir {out!r} already holds {existing}; pass resume_from_checkpoint=... to continue "
                "that run or overwrite_output_dir=True to replace it."
            )

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if self.args.method == "local_de" and not isinstance(sampler, torch.utils.data.RandomSampler):
            raise ValueError(
                "method='local_de' reshuffles the data per member and needs "
                "train_sampling_strategy='random' and a training dataset with a length."
            )
        if type(sampler) is not torch.utils.data.RandomSampler:
            return sampler
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self._train_sampler = MemberSeededSampler(len(sampler.data_source), seed)
        return self._train_sampler

    def set_initial_training_values(self, args, dataloader):
        """Size the run to all K cycles and validate everything before the first step."""
        values = list(super().set_initial_training_values(args, dataloader))
        num_train_epochs, steps_per_epoch, num_examples, _, total_batch, steps_in_epoch, _ = values
        plan = plan_cycles(args, steps_per_epoch)
        if args.max_steps is not None and args.max_steps > 0 and args.max_steps != plan.total_steps:
            raise ValueError(
                f"max_steps={args.max_steps} does not match the {args.num_members} cycles of the run "
                f"(model 1: {plan.model1_steps} steps, then {args.num_members - 1} x {plan.cycle_steps} = "
                f"{plan.total_steps} optimizer steps); leave max_steps=-1 or set it to exactly that total."
            )
        if args.method == "local_de":
            # Member boundaries are epoch boundaries: each member restarts the data order from its own seed.
            if plan.model1_steps % steps_per_epoch:
                raise ValueError(
                    f"method='local_de' needs a whole number of epochs per member, got num_train_epochs="
                    f"{args.num_train_epochs} ({plan.model1_steps} steps, {steps_per_epoch} per epoch)."
                )
            if self._train_sampler is not None:
                self._train_sampler.epochs_per_member = plan.model1_steps // steps_per_epoch
        if self._resumed_state is not None:
            self._check_resumed_state(self._resumed_state, plan)
        self.plan = plan
        self._lr_lambda = plan.lr_lambda()
        total = plan.total_steps
        num_train_epochs = math.ceil(total / steps_per_epoch)
        return (
            num_train_epochs,
            steps_per_epoch,
            num_examples,
            total * total_batch,
            total_batch,
            steps_in_epoch,
            total,
        )

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            self.lr_scheduler = _GlobalStepLR(optimizer, self._lr_lambda)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ cycle mechanics
    def _on_train_begin(self) -> None:
        state = self._resumed_state
        if state is None:
            self._members_written, self._cycles_started, self._anchor = 0, 0, None
            if self.args.method == "local_de":
                self._anchor = self._copy_weights()  # the original (pre-trained) weights
        else:
            self._members_written = state["members_written"]
            self._cycles_started = state["cycles_started"]
            self._anchor = state.get("anchor")
        self.lr_scheduler.sync(self.state.global_step)
        os.makedirs(self.members_dir, exist_ok=True)

    def _maybe_start_cycle(self, global_step: int) -> None:
        k = self.plan.cycle_of_step(global_step)
        if k <= self._cycles_started:
            return
        start = time.perf_counter()
        model = self.model
        if self._anchor is not None:
            model.load_state_dict(self._anchor, strict=True)
        if self.args.method == "local_de":
            member_seed = self.args.seed + k
            set_seed(member_seed)
            reinit_task_head(model)
        if self.args.reset_optimizer:
            self.optimizer.state.clear()
        self._cycles_started = k
        self.cycle_start_seconds += time.perf_counter() - start

    def _maybe_snapshot(self, global_step: int) -> None:
        self.lr_scheduler.sync(global_step)  # skipped fp16 steps must not shift the schedule
        k = self._members_written
        if k >= self.args.num_members or global_step != self.plan.boundaries[k]:
            return
        start = time.perf_counter()
        if self.args.should_save:
            self._write_member(k)
            self.written_members.append(k)
        if k == 0 and self.args.method == "starsse":
            self._anchor = self._copy_weights()
        self._members_written = k + 1
        self.accelerator.wait_for_everyone()
        self.snapshot_seconds += time.perf_counter() - start

    def _copy_weights(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self.model.state_dict().items()}

    def _write_member(self, k: int) -> None:
        """save_pretrained into a temp dir next to the target, then rename: a crash never leaves half a
        member."""
        final = self.member_paths[k]
        os.makedirs(self.members_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=self.members_dir, prefix=f".member_{k:02d}.")
        try:
            self.accelerator.unwrap_model(self.model).save_pretrained(tmp)
            if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
                self.processing_class.save_pretrained(tmp)
            if os.path.exists(final):  # only reachable when resuming or overwrite_output_dir
                trash = tempfile.mkdtemp(dir=self.members_dir, prefix=f".old_member_{k:02d}.")
                os.replace(final, os.path.join(trash, "old"))
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial) -> None:
        # Written before the Trainer's own files: a checkpoint with trainer_state.json always has the cycle
        # state.
        output_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            if self._anchor is not None:
                anchor = {k: v.detach().to("cpu").contiguous() for k, v in self._anchor.items()}
                safetensors.torch.save_file(anchor, os.path.join(output_dir, ANCHOR_NAME))
            state = {
                "method": self.args.method,
                "num_members": self.args.num_members,
                "model1_steps": self.plan.model1_steps,
                "cycle_steps": self.plan.cycle_steps,
                "members_written": self._members_written,
                "cycles_started": self._cycles_started,
                "has_anchor": self._anchor is not None,
            }
            tmp = os.path.join(output_dir, CYCLE_STATE_NAME + ".tmp")
            with open(tmp, "w") as f:
                json.dump(state, f, indent=2)
            os.replace(tmp, os.path.join(output_dir, CYCLE_STATE_NAME))
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore weights through ``from_pretrained`` (with its key conversion) and the cycle state.

        transformers 5.24's own ``_load_from_checkpoint`` loads the legacy key names that ``save_pretrained``
        writes without converting them (upstream #48805): for ViT it silently keeps wrong weights. Loading a
        fresh copy with ``from_pretrained`` and copying it in with ``strict=True`` either restores every
        tensor or raises.
        """
        target = model if model is not None else self.model
        if isinstance(target, PreTrainedModel) and not self.is_fsdp_enabled and not self.is_deepspeed_enabled:
            loaded, info = type(target).from_pretrained(
                resume_from_checkpoint, output_loading_info=True, dtype=target.dtype
            )
            problems = {
                k: v
                for k, v in info.items()
                if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
            }
            if problems:
                raise ValueError(f"Checkpoint {resume_from_checkpoint} does not match the model: {problems}")
            target.load_state_dict(loaded.state_dict(), strict=True)
            del loaded
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._resumed_state = self._read_cycle_state(resume_from_checkpoint, target)

    def _read_cycle_state(self, checkpoint: str, model) -> dict[str, Any]:
        path = os.path.join(checkpoint, CYCLE_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{checkpoint} has no {CYCLE_STATE_NAME}: it was not written by StarSSETrainer.")
        with open(path) as f:
            state = json.load(f)
        if state.get("has_anchor"):
            device = next(model.parameters()).device
            state["anchor"] = safetensors.torch.load_file(
                os.path.join(checkpoint, ANCHOR_NAME), device=str(device)
            )
        return state

    def _check_resumed_state(self, state: dict[str, Any], plan: CyclePlan) -> None:
        ours = {
            "method": self.args.method,
            "num_members": self.args.num_members,
            "model1_steps": plan.model1_steps,
            "cycle_steps": plan.cycle_steps,
        }
        theirs = {k: state.get(k) for k in ours}
        if theirs != ours:
            raise ValueError(
                f"Cannot resume: the checkpoint was made with {theirs}, this run is configured for {ours}."
            )


def _ensure_writable(output_dir: str) -> None:
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write_test."):
            pass
    except OSError as err:
        raise ValueError(f"output_dir {output_dir!r} cannot be written: {err}") from err


class _GlobalStepLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose step count is re-synchronised to ``TrainerState.global_step`` after every step.

    The Trainer skips ``lr_scheduler.step()`` when fp16 loss scaling skipped the optimizer step, while
    ``global_step`` (which places the cycle boundaries) still advances; ``sync`` makes the LR follow
    global_step.
    """

    def sync(self, global_step: int) -> None:
        if self.last_epoch != global_step:
            self.last_epoch = global_step - 1
            self.step()
