"""The cycle plan in action: where each member starts (its *anchor*), when it is written, and its seed.

:mod:`trainers.schedule` says WHEN (the :class:`~trainers.schedule.CyclePlan`: boundaries and the LR of every
optimizer step, a pure function of the step). This module says WHAT happens there, for the one loop and for a
branch (``trainers.branches``) alike:

* the start of cycle k >= 1 (:meth:`MemberCycles.start`): the anchor's weights (``sse``: none, continue;
  ``starsse``: model 1; ``local_de``: the original weights), every global RNG reseeded from
  :func:`branch_seed` ``(seed, k)`` and, for Local DE, a new task head (or LoRA adapter) drawn under it; in
  the loop the optimizer state is cleared too (``reset_optimizer``);
* the end of cycle k (:meth:`MemberCycles.snapshot`): weights checked finite (``hf_ens.checks``) and written
  atomically (``hf_ens._io.atomic_directory``) to ``members/member_{k:02d}``; StarSSE copies model 1 as the
  anchor of every later cycle.

:class:`CycleCallback` drives both from ``TrainerState.global_step`` (which gradient accumulation and
skipped fp16 steps cannot desynchronise); the trainer puts it first in line, so a user's callbacks see the
anchor at a cycle start and the member at a cycle end. The state (anchor, members written, cycles started)
is stored in each Trainer checkpoint by :mod:`trainers.checkpoints` (:meth:`MemberCycles.state_dict`), not
through transformers' ``ExportableState``: the anchor is a tensor dict (``trainer_state.json`` holds JSON
only), and ``restore_callback_states_from_checkpoint`` defaults to False, while a resume must always bring
the cycles back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_utils import set_seed

from hf_ens import adapters
from hf_ens._io import atomic_directory
from hf_ens.checks import assert_finite, raise_nonfinite
from hf_ens.heads import reinit_task_head

from . import sharded
from .checkpoints import ANCHOR_NAME

if TYPE_CHECKING:
    from .starsse_trainer import StarSSETrainer

__all__ = ["CycleCallback", "MemberCycles", "branch_seed", "derived_seed", "probe_seed"]


def derived_seed(seed: int, purpose: str, i: int) -> int:
    """THE seed hash: a seed for the i-th member / probe / ... of a run seeded `seed`.

    A hash, not ``seed + i``: replicates with seeds s and s + i would otherwise share draws. Four bytes,
    because numpy's global seed must be below 2**32.
    """
    return int.from_bytes(hashlib.sha256(f"hf-ens/{purpose}/{seed}/{i}".encode()).digest()[:4], "little")


def branch_seed(seed: int, k: int) -> int:
    """The seed of member k: the run's own seed for model 1 (k = 0), else a ``derived_seed``."""
    return seed if k == 0 else derived_seed(seed, "member", k)


def probe_seed(seed: int, i: int) -> int:
    """The seed of probe i of ``cycle_learning_rate="auto"`` (data order, dropout, augmentation)."""
    return derived_seed(seed, "probe", i)


class MemberCycles:
    """The cycles of one trainer: the anchor, how many members are written and cycles started, timings."""

    def __init__(self, trainer: StarSSETrainer):
        self.trainer = trainer
        self.anchor: dict[str, torch.Tensor] | None = None
        self.members_written = 0  # members 0..n-1 are on disk
        self.cycles_started = 0  # cycle 0 starts with training; cycle k >= 1 once its start was applied
        self.written_members: list[int] = []  # members this process wrote (the main one, or its branches')
        self.snapshot_seconds = 0.0  # time spent writing members (and copying the StarSSE anchor)
        self.cycle_start_seconds = 0.0  # time spent reloading anchors / resetting the optimizer

    # ------------------------------------------------------------------ anchors
    def copy_weights(self) -> dict[str, torch.Tensor]:
        """The member's weights: every tensor, or the adapter's only for a peft model. Sharded (FSDP2): a
        collective; the full tensors on the main process's CPU, ``{}`` on the others (`trainers.sharded`)."""
        if sharded.is_sharded(self.trainer.model):
            return sharded.full_state_dict(self.trainer.model)
        return adapters.member_weights(self.trainer.model)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Put :meth:`copy_weights`' `weights` back into the model (sharded: scattered from process 0)."""
        if sharded.is_sharded(self.trainer.model):
            sharded.load_full_state_dict(self.trainer.model, weights)
        else:
            adapters.load_member_weights(self.trainer.model, weights)

    def reset(self, state: dict[str, Any] | None) -> None:
        """At train begin: a fresh run's cycles, or those a checkpoint stored (:meth:`state_dict`)."""
        if state is None:
            self.members_written, self.cycles_started, self.anchor = 0, 0, None
            if self.trainer.args.method == "local_de":
                self.anchor = self.copy_weights()  # the original (pre-trained) weights
        else:
            self.members_written = state["members_written"]
            self.cycles_started = state["cycles_started"]
            self.anchor = state.get("anchor")

    def anchor_from_model1(self) -> None:
        """Under ``parallel_members``, before the branches: the anchor of cycles 2..K (Local DE: the original
        weights; StarSSE: model 1, read back from its member directory after a resumed launch)."""
        trainer = self.trainer
        if trainer.args.method == "local_de":
            self.anchor = self.copy_weights()
        elif self.anchor is None and trainer.is_peft:
            adapters.load_adapter_weights(trainer.model, trainer.member_paths[0])
            self.anchor = self.copy_weights()
        elif self.anchor is None:
            loaded = type(trainer.model).from_pretrained(trainer.member_paths[0], dtype=trainer.model.dtype)
            self.anchor = {k: v.to(trainer.args.device) for k, v in loaded.state_dict().items()}
            del loaded

    # ------------------------------------------------------------------ cycle start and end
    def start(self, k: int) -> None:
        """Where member k starts, for the one loop and for a branch alike: its anchor's weights, every global
        RNG reseeded from ``(seed, k)`` (dropout, augmentation: the same draws however the run is split into
        processes), and for Local DE (k >= 1) a new task head drawn under that seed."""
        began, trainer = time.perf_counter(), self.trainer
        if self.anchor is not None:
            self.load_weights(self.anchor)
        set_seed(branch_seed(trainer.args.seed, k))
        if trainer.args.method == "local_de" and k > 0:
            if trainer.is_peft:
                adapters.reinit_adapter(trainer.model)  # new LoRA factors and head, the base stays
            else:
                reinit_task_head(trainer.model)
        self.cycle_start_seconds += time.perf_counter() - began

    def maybe_start(self, global_step: int) -> None:
        """In the loop: apply the start of the cycle `global_step` belongs to, once."""
        trainer = self.trainer
        k = trainer.plan.cycle_of_step(global_step)
        if k <= self.cycles_started:
            return
        self.start(k)
        if trainer.args.reset_optimizer:
            trainer.optimizer.state.clear()
        self.cycles_started = k

    def maybe_snapshot(self, global_step: int) -> bool:
        """In the loop: write member k if `global_step` ends cycle k; whether it did."""
        k = self.members_written
        if k >= self.trainer.args.num_members or global_step != self.trainer.plan.boundaries[k]:
            return False
        self.trainer.check_losses()
        began = time.perf_counter()
        self.save_member(k, global_step, write=self.trainer.args.should_save)
        if k == 0 and self.trainer.args.method == "starsse":
            self.anchor = self.copy_weights()
        self.members_written = k + 1
        self.trainer.accelerator.wait_for_everyone()
        self.snapshot_seconds += time.perf_counter() - began
        return True

    def save_member(self, k: int, global_step: int, write: bool = True) -> None:
        """Refuse non-finite weights, then write member k (``write``: this process writes it)."""
        trainer = self.trainer
        what = f"member {k:02d} (end of cycle {k + 1}, step {global_step})"
        full = None
        if sharded.is_sharded(trainer.model):  # collectives: every process checks and gathers
            raise_nonfinite(sharded.nonfinite_tensors(trainer.model), what)
            full = sharded.full_state_dict(trainer.model)
        else:
            assert_finite(trainer.model, what)
        if not write:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        processor = trainer.processing_class
        # save_pretrained through atomic_directory: a kill leaves no member or a whole one
        with atomic_directory(trainer.member_paths[k]) as tmp, _saves_on_this_process(model):
            if adapters.is_peft_model(model):
                adapters.save_adapter(model, model.active_adapter, tmp)
            else:
                model.save_pretrained(tmp, state_dict=full)  # sharded: the gathered full weights
            if processor is not None and hasattr(processor, "save_pretrained"):
                processor.save_pretrained(tmp)
            if not any(Path(tmp).glob("*.safetensors")) and not any(Path(tmp).glob("*.bin")):
                raise RuntimeError(f"save_pretrained wrote no weights for member {k:02d} on this process.")
        self.written_members.append(k)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint's cycle state records (the anchor goes beside it: :meth:`save_anchor`)."""
        return {
            "members_written": self.members_written,
            "cycles_started": self.cycles_started,
            "has_anchor": self.anchor is not None,
        }

    def save_anchor(self, checkpoint: str) -> None:
        if self.anchor is not None:
            anchor = {k: v.detach().to("cpu").contiguous() for k, v in self.anchor.items()}
            safetensors.torch.save_file(anchor, os.path.join(checkpoint, ANCHOR_NAME))


def load_anchor(checkpoint: str, state: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """`state` (a checkpoint's cycle state) with its anchor loaded onto `model`'s device, if it has one.
    Sharded (FSDP2): onto the main process's CPU, ``{}`` on the others (as `MemberCycles.copy_weights`)."""
    if state.get("has_anchor") and sharded.is_sharded(model):
        path = os.path.join(checkpoint, ANCHOR_NAME)
        state["anchor"] = safetensors.torch.load_file(path) if torch.distributed.get_rank() == 0 else {}
    elif state.get("has_anchor"):
        device = next(model.parameters()).device
        state["anchor"] = safetensors.torch.load_file(
            os.path.join(checkpoint, ANCHOR_NAME), device=str(device)
        )
    return state


class CycleCallback(TrainerCallback):
    """Starts cycles and snapshots members at the exact optimizer steps of the plan (first in line)."""

    def __init__(self, trainer: StarSSETrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.on_cycles_begin()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.on_epoch_begin(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.cycles.maybe_start(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.cycles.maybe_snapshot(state.global_step):
            self.trainer.on_member_written(self.trainer.cycles.members_written - 1)
        # after the snapshot: the probes that follow model 1 choose the LR of the next step
        self.trainer.lr_scheduler.sync(state.global_step)  # skipped fp16 steps must not shift the schedule

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.accelerator.wait_for_everyone()


@contextlib.contextmanager
def _saves_on_this_process(model):
    """Let ``save_pretrained`` write on the process that calls it.

    transformers 5.24's ``save_pretrained`` silently writes nothing on a rank other than 0 once
    ``torch.distributed`` is initialized (``PreTrainedModel.should_save_on_this_rank``), while under
    ``parallel_members`` every process writes the members it trained (the caller decides who writes).
    """
    if not isinstance(model, PreTrainedModel):
        yield
        return
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        yield
    finally:
        del model.should_save_on_this_rank
