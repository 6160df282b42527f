"""StarSSE, SSE and Local DE as ONE ``transformers.Trainer`` run.

The whole ensemble is a single training loop of ``model1_steps + (K - 1) * cycle_steps`` optimizer steps with
one LR schedule (:mod:`trainers.schedule`). A callback acts at cycle boundaries, keyed on
``TrainerState.global_step`` (the counter that gradient accumulation and skipped fp16 steps cannot
desynchronise):

* at the end of cycle k (``on_step_end``) the weights are checked for NaN/Inf and written atomically
  to ``members/member_{k:02d}``;
* at the start of cycle k >= 1 (``on_step_begin`` of its first step) the weights are reset to the cycle's
  *anchor* and the optimizer state is cleared. The anchor is the one mechanism behind the three methods:
  ``sse`` has none (continue from the current weights), ``starsse`` anchors at model 1, ``local_de`` at the
  original weights plus a member-seeded new head and data order.

Both live in :mod:`trainers.cycles` (:class:`~trainers.cycles.MemberCycles`, driven by its callback, first
in line, so a user's callbacks see the anchor at a cycle start and the member at a cycle end); the trainer
keeps short hooks only. Its public interface for :mod:`trainers.branches` and :mod:`trainers.probe` is
:attr:`StarSSETrainer.plan`, :attr:`~StarSSETrainer.cycles`, :meth:`~StarSSETrainer.start_cycle`,
:meth:`~StarSSETrainer.save_member`, :meth:`~StarSSETrainer.new_lr_scheduler`,
:meth:`~StarSSETrainer.check_losses` and :meth:`~StarSSETrainer.diverged_message`.

With ``parallel_members`` the loop trains StarSSE's model 1 only (data-parallel, as above) and each process
then trains its share of the remaining members alone (:mod:`trainers.parallel` assigns them,
:mod:`trainers.branches` trains one), through the same cycle start, schedule and member snapshot.

A ``peft`` LoRA model trains adapters instead of whole models: what a member *is* comes from
:func:`hf_ens.adapters.member_weights` (the adapter tensors and the ``modules_to_save`` head), so anchors,
checkpoints and members hold those only, members are peft adapter directories, Local DE re-draws the adapter
and head from ``(seed, k)``, and :meth:`StarSSETrainer.soup` is the exact merged soup.

Everything needed to continue (anchor weights, members written, cycles started, the plan, the run settings)
is stored inside each Trainer checkpoint, so ``train(resume_from_checkpoint=...)`` reproduces an uninterrupted
run; :mod:`trainers.checkpoints` makes checkpoints kill-safe and refuses to resume another run's checkpoint.

With ``cycle_learning_rate="auto"`` the cycle LR is chosen right after model 1 is written
(:mod:`trainers.probe`: in the loop, or before the branches under ``parallel_members``); the choice travels in
the checkpoints too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from hf_ens import adapters
from hf_ens._io import atomic_file, ensure_writable

from .branches import BranchData, MemberSeededSampler, train_branches
from .checkpoints import (
    MEMBERS_DIR,
    PROBE_FILE,
    discard,
    load_model_weights,
    prepare_output_dir,
    read_cycle_state,
    refuse_other_run,
    rotate_checkpoints,
    run_config,
    write_cycle_state,
)
from .cycles import CycleCallback, MemberCycles, load_anchor
from .nonfinite import LossWatch
from .probe import ProbeRun, check_eval_dataset, format_table, probe_steps
from .run_lock import run_lock
from .schedule import CyclePlan, plan_cycles
from .starsse_config import DEEPSPEED_REFUSAL, StarSSEConfig, check_fsdp

__all__ = ["MemberSeededSampler", "StarSSETrainer"]

logger = logging.get_logger(__name__)


class _LossCheckCallback(TrainerCallback):
    """Last in line: once the other callbacks decided whether this step logs, evaluates or stops, read the
    device-side loss watch there (`trainers.nonfinite`) and stop a diverged run."""

    def __init__(self, trainer: StarSSETrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_evaluate or control.should_training_stop:
            self.trainer.check_losses()  # saves check in _save_checkpoint, whoever asked for them


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
            ensure_writable(config.output_dir)  # before Trainer.__init__ tries to create it
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, StarSSEConfig):
            raise ValueError(f"StarSSETrainer needs args=StarSSEConfig(...), got {type(self.args).__name__}.")
        if self.lr_scheduler is not None:
            raise ValueError(
                "StarSSETrainer owns the LR schedule (trainers.schedule); do not pass a lr_scheduler."
            )
        self._refuse_sharding()
        if self.is_peft:
            # members must merge to W0 + scale B A (the soups and the "auto" probes' merged weights), and
            # re-draw exactly
            adapters.check_lora(self.model)
        _say_if_not_ensembled(self.model)
        if self.model_accepts_loss_kwargs and not loss_normalized_by_num_items(self.model):
            # The Trainer would pass num_items_in_batch, skip its division by the accumulation steps, and so
            # SUM the micro-batch means of a step (a gradient N x accumulation too large, unlike the branch
            # loop's mean): told the truth, it averages them, like the branch loop and one big batch.
            self.model_accepts_loss_kwargs = False
        self._plan: CyclePlan | None = None  # sized by train(); the LR of every step and the boundaries
        self.cycles = MemberCycles(self)  # the anchor, members written, cycles started (trainers.cycles)
        self.branch_seconds = 0.0  # parallel_members: wall time of the branch phase
        self.branches_resumed: dict[int, int] = {}  # parallel_members: member -> step its branch resumed at
        # cycle_learning_rate="auto": the probe table and the chosen LR (trainers.probe), once model 1 exists
        self.basin_probe: dict[str, Any] | None = None
        self._resumed_state: dict[str, Any] | None = None
        self._train_sampler: MemberSeededSampler | None = None
        self._steps_per_epoch: int | None = None  # optimizer steps per epoch of the loop (set_initial_...)
        # First in line, before the user's callbacks (``callbacks=[...]`` are registered by Trainer.__init__,
        # ``add_callback`` appends): a user's ``on_step_begin`` sees the weights the step trains from.
        self.callback_handler.callbacks.insert(0, CycleCallback(self))
        self._loss_watch = LossWatch()
        self.add_callback(_LossCheckCallback(self))

    def _refuse_sharding(self) -> None:
        """Under DeepSpeed or FSDP, what the Trainer's accelerator says (an accelerate config file included):
        the config's own refusals again, and LoRA members under FSDP. Before any training."""
        if self.is_deepspeed_enabled:
            raise ValueError(DEEPSPEED_REFUSAL)
        if not self.is_fsdp_enabled:
            return
        check_fsdp(self.args, int(getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)))
        if self.is_peft:
            raise ValueError(
                "LoRA members are not supported under FSDP: the gather/scatter of trainers.sharded holds "
                "whole models, not a peft model's adapter tensors. LoRA members of one base fit where the "
                "base does: train them without FSDP (DDP or parallel_members)."
            )

    # ------------------------------------------------------------------ public API
    @property
    def is_peft(self) -> bool:
        """Whether the members are LoRA adapters on the model's frozen base (a ``peft`` model)."""
        return adapters.is_peft_model(self.accelerator.unwrap_model(self.model))

    @property
    def plan(self) -> CyclePlan | None:
        """The run's :class:`~trainers.schedule.CyclePlan` (boundaries, LR of every step), once sized."""
        return self._plan

    @plan.setter
    def plan(self, plan: CyclePlan) -> None:
        self._plan, self._lr_lambda = plan, plan.lr_lambda()

    @property
    def written_members(self) -> list[int]:
        """Members this process wrote (the main one, or its branches')."""
        return self.cycles.written_members

    @property
    def snapshot_seconds(self) -> float:
        """Time spent writing members (and copying the StarSSE anchor)."""
        return self.cycles.snapshot_seconds

    @property
    def cycle_start_seconds(self) -> float:
        """Time spent reloading anchors / resetting the optimizer."""
        return self.cycles.cycle_start_seconds

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
        """The metadata stored with the ensemble (``ensemble_config.json`` and the model card).

        With ``cycle_learning_rate="auto"``, ``cycle_learning_rate`` is the chosen number, beside
        ``cycle_learning_rate_mode: "auto"`` and the probe table (``basin_probe``).
        """
        args = self.args
        config = getattr(self.model, "config", None)
        auto = {}
        if args.probes_cycle_learning_rate:
            auto = {"cycle_learning_rate_mode": args.guard_mode, "basin_probe": self.basin_probe}
        return {
            "method": args.method,
            "num_members": args.num_members,
            "learning_rate": args.learning_rate,
            "num_train_epochs": args.num_train_epochs,
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps,
            "cycle_epochs": args.cycle_epochs,
            "cycle_learning_rate": self.chosen_cycle_learning_rate,
            **auto,
            "cycle_warmup_steps": args.cycle_warmup_steps,
            "reset_optimizer": args.reset_optimizer,
            "model1_steps": self.plan.model1_steps if self.plan else None,
            "cycle_steps": self.plan.cycle_steps if self.plan else None,
            "base_model": getattr(config, "_name_or_path", None) or None,
            "seed": args.seed,
            **(self._adapter_metadata() if self.is_peft else {}),
        }

    def _adapter_metadata(self) -> dict[str, Any]:
        model = self.accelerator.unwrap_model(self.model)
        lora = model.peft_config[model.active_adapter]
        targets = lora.target_modules
        return {
            "member_format": adapters.PEFT_FORMAT,
            "lora_r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "lora_target_modules": targets if isinstance(targets, str) else ",".join(sorted(targets)),
            "lora_modules_to_save": ",".join(lora.modules_to_save or []),
        }

    @property
    def chosen_cycle_learning_rate(self) -> float | None:
        """The peak LR of cycles 2..K: the configured one, or the one the basin guard chose (``"auto"``: None
        before)."""
        if self.basin_probe is not None:
            return self.basin_probe["cycle_learning_rate"]
        return None if self.args.auto_cycle_learning_rate else self.args.cycle_learning_rate

    def ensemble(self):
        """The trained members as an ``hf_ens.EnsembleModel`` (LoRA members: an
        ``hf_ens.adapters.AdapterEnsembleModel``, the base held once and the K adapters attached by name)."""
        from hf_ens import EnsembleModel

        self._check_members_complete()
        metadata = self.ensemble_metadata()
        if self.is_peft:
            return adapters.AdapterEnsembleModel.from_adapters(
                self.accelerator.unwrap_model(self.model),
                self.member_paths,
                processor=self.processing_class,
                metadata=metadata,
                base_model_name_or_path=metadata["base_model"],
            )
        return EnsembleModel.from_members(
            self.member_paths, processor=self.processing_class, metadata=metadata
        )

    def soup(self):
        """Uniform weight average of the members (``hf_ens.uniform_soup``); for LoRA members the exact average
        of the merged members (``hf_ens.adapters.lora_uniform_soup``). Either way an ordinary model."""
        from hf_ens import uniform_soup

        self._check_members_complete()
        if self.is_peft:
            return self.ensemble().soup()
        return uniform_soup(self.member_paths)

    def _check_members_complete(self) -> None:
        missing = [p for p in self.member_paths if not os.path.isdir(p)]
        if missing:
            raise ValueError(f"Members not trained yet (run trainer.train() first): missing {missing}.")

    # ------------------------------------------------------------------ training set-up
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        # one run per output_dir (trainers.run_lock): a second one is refused before it touches anything
        with run_lock(self.args.output_dir, enabled=self.args.should_save, share=self._main_process_says):
            return self._train_locked(resume_from_checkpoint, trial, **kwargs)

    def _main_process_says(self, message: str | None) -> str | None:
        """The main process's `message`, on every process (a refusal must stop all of them, not hang them)."""
        if self.args.world_size <= 1:
            return message
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([message], from_process=0)[0]

    def _train_locked(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        if self.args.probes_cycle_learning_rate:
            check_eval_dataset(self.eval_dataset)
        self._resumed_state = None
        self.basin_probe = None  # a resumed checkpoint (or, for branches, basin_probe.json) brings it back
        branches_only = self.args.parallel_members and self._model1_done()
        checkpoint = prepare_output_dir(self.args, self.member_paths, resume_from_checkpoint, branches_only)
        self.accelerator.wait_for_everyone()
        if not self.args.parallel_members:
            return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)
        if not self._model1_done():  # StarSSE's model 1: data-parallel, as an ordinary run
            super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)
        return train_branches(self)

    def _model1_done(self) -> bool:
        """Under ``parallel_members``: Local DE has no shared model 1; StarSSE's is done once written."""
        return self.args.method == "local_de" or os.path.isdir(self.member_paths[0])

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
        try:
            values = list(super().set_initial_training_values(args, dataloader))
        except OverflowError as err:  # the Trainer's own ceil(num_train_epochs * steps_per_epoch)
            raise ValueError(
                f"num_train_epochs={args.num_train_epochs} is too large: "
                "more optimizer steps than a float holds."
            ) from err
        num_train_epochs, steps_per_epoch, num_examples, _, total_batch, steps_in_epoch, _ = values
        self._steps_per_epoch = steps_per_epoch
        plan = plan_cycles(args, steps_per_epoch)
        data = self.train_dataset
        if args.parallel_members and data is not None and hasattr(data, "__len__"):
            branch_steps = BranchData(data, None, args).steps_per_epoch
            if branch_steps != steps_per_epoch:  # refused now, not after model 1 (the plans would differ)
                raise ValueError(
                    f"parallel_members: the data-parallel loop makes {steps_per_epoch} steps per epoch, a "
                    f"branch would make {branch_steps} ({len(data)} samples, batches of "
                    f"{args.per_device_train_batch_size}, dataloader_drop_last={args.dataloader_drop_last}, "
                    f"{args.world_size} processes x {args.gradient_accumulation_steps} accumulation). Use a "
                    "training set that splits into whole member batches, or dataloader_drop_last=False."
                )
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
        if args.probes_cycle_learning_rate:
            probe_steps(args, plan.cycle_steps)  # a cycle too short to probe: refused now, not after model 1
        if self._resumed_state is not None:  # the run settings were compared before loading; the plan
            saved = self._resumed_state  # also depends on the dataset's size
            ours = {"model1_steps": plan.model1_steps, "cycle_steps": plan.cycle_steps}
            refuse_other_run(saved["path"], saved, ours, hint="a different training set size?")
        self.plan = plan
        if self._resumed_state is not None and self._resumed_state.get("basin_probe"):
            self._apply_probe_result(self._resumed_state["basin_probe"])  # probed before the checkpoint
        # parallel_members: this loop trains model 1 only; the branches follow, one process each.
        total = plan.model1_steps if args.parallel_members else plan.total_steps
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

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Note a non-finite loss on the device (`trainers.nonfinite`): the run stops at the next logging,
        evaluation, checkpoint or member snapshot (`check_losses`), before it writes NaN weights, without a
        host synchronisation per step."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._loss_watch.update(loss, self.state.global_step)
        return loss

    @contextlib.contextmanager
    def alone(self):
        """For a step this process makes alone (a branch or an LR probe: no collective, no DDP wrapper): the
        Trainer counts and normalises the loss over this process's micro-batches only
        (``average_tokens_across_devices`` off for the block; the run's settings are unchanged after it)."""
        saved = self.args.average_tokens_across_devices
        self.args.average_tokens_across_devices = False
        try:
            yield
        finally:
            self.args.average_tokens_across_devices = saved

    def step_num_items(self, micro_batches: list) -> torch.Tensor | int | None:
        """The ``num_items_in_batch`` the Trainer's loop passes for one optimizer step over `micro_batches`,
        made here alone (`alone`): for a model whose loss divides by it (any causal LM) the step loss is the
        summed loss of every micro-batch over the step's target count, not the mean of micro-batch means,
        which differs when micro-batches hold different numbers of tokens (padded text). None where the
        Trainer passes none. The Trainer's own count (rule and dtype): a branch step is the loop's step."""
        with self.alone():
            return self._get_num_items_in_batch(micro_batches, self.args.device)

    def check_losses(self) -> None:
        """Raise `NonFiniteError` naming the first step whose loss was NaN or Inf (waits for the device)."""
        self._loss_watch.check(
            lambda loss, step: self.diverged_message(loss, step, self.plan.cycle_of_step(step))
        )

    def diverged_message(self, loss: float, global_step: int, k: int) -> str:
        """What a diverged member k says (the loop's and a branch's alike)."""
        return (
            f"The training loss became {loss} at optimizer step {global_step + 1} (cycle {k + 1} of "
            f"{self.args.num_members}, member {k:02d}); training diverged. Lower learning_rate"
            f"{'' if k == 0 else ' / cycle_learning_rate'}. Members written so far: "
            f"{sum(os.path.isdir(p) for p in self.member_paths)}."
        )

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = self.new_lr_scheduler(optimizer if optimizer is not None else self.optimizer)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def new_lr_scheduler(self, optimizer, lr_lambda=None) -> _GlobalStepLR:
        """The run's one schedule (``trainers.schedule``), indexed by the global optimizer step (or
        `lr_lambda`: a probe's own). Looked up at every step: ``"auto"`` sets the cycles' LR after model 1."""
        return _GlobalStepLR(optimizer, lr_lambda or (lambda step: self._lr_lambda(step)))

    # ------------------------------------------------------------------ cycles (trainers.cycles)
    def start_cycle(self, k: int) -> None:
        """Put the model where member k starts: its anchor, its seed, a Local DE head (loop and branches)."""
        self.cycles.start(k)

    def save_member(self, k: int, global_step: int, write: bool = True) -> None:
        """Refuse non-finite weights, then write member k (``write``: this process writes it)."""
        self.cycles.save_member(k, global_step, write)

    def on_cycles_begin(self) -> None:
        """Train begin: the cycles of a fresh run, or those the resumed checkpoint stored."""
        self.cycles.reset(self._resumed_state)
        self.lr_scheduler.sync(self.state.global_step)
        os.makedirs(self.members_dir, exist_ok=True)

    def on_epoch_begin(self, global_step: int) -> None:
        """Before the loop draws an epoch's batches: the data order of the epoch `global_step` belongs to.

        The Trainer sets the sampler's epoch itself, except where a resume starts inside an epoch with more
        than one process: ``skip_first_batches`` wraps accelerate's ``BatchSamplerShard`` in a
        ``SkipBatchSampler``, and neither ``DataLoaderShard.set_epoch`` nor the Trainer reaches the sampler
        under two wrappers, so the resumed epoch would replay epoch 0's order (transformers 5.24, accelerate
        1.16)."""
        if self._train_sampler is not None and self._steps_per_epoch:
            self._train_sampler.set_epoch(global_step // self._steps_per_epoch)

    def on_member_written(self, k: int) -> None:
        """After member k: with ``cycle_learning_rate="auto"``, model 1 chooses the cycles' LR (loop only)."""
        if k == 0 and self.args.probes_cycle_learning_rate and not self.args.parallel_members:
            self.choose_cycle_learning_rate()

    def choose_cycle_learning_rate(self, reuse_probe_file: bool = False) -> None:
        """``cycle_learning_rate="auto"``: probe from the current weights (model 1) on every process and use
        the chosen LR for cycles 2..K; `reuse_probe_file`: take the choice an earlier launch of this run
        wrote (``parallel_members``), if any."""
        result = self._read_probe_file() if reuse_probe_file else None
        self._apply_probe_result(result if result is not None else self._run_probes())

    # ------------------------------------------------------------------ cycle_learning_rate="auto"
    def _run_probes(self) -> dict[str, Any]:
        """Probe from the current weights (model 1) on every process together; write ``basin_probe.json``."""
        result = ProbeRun(self).run()
        if self.args.should_save:
            with atomic_file(os.path.join(self.args.output_dir, PROBE_FILE)) as f:
                json.dump({"run": run_config(self.args), **result}, f, indent=2)
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            print(format_table(result), flush=True)
        self.log(
            {
                "basin_probe/chosen_multiplier": result["chosen_multiplier"],
                "basin_probe/cycle_learning_rate": result["cycle_learning_rate"],
                "basin_probe/seconds": result["seconds"],
            }
        )
        return result

    def _apply_probe_result(self, result: dict[str, Any]) -> None:
        """Cycles 2..K use the chosen LR from now on (the scheduler looks ``_lr_lambda`` up at every step)."""
        self.basin_probe = result
        self.plan = dataclasses.replace(self.plan, cycle_learning_rate=result["cycle_learning_rate"])
        if self.lr_scheduler is not None:  # the Trainer already asked for the next step's LR: NaN until now
            self.lr_scheduler.sync(self.state.global_step, force=True)

    def _read_probe_file(self) -> dict[str, Any] | None:
        """Under ``parallel_members``, the probes an earlier launch of this run finished (None if none)."""
        path = os.path.join(self.args.output_dir, PROBE_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            saved = json.load(f)
        refuse_other_run(path, saved.pop("run", {}), run_config(self.args))
        return saved

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, made kill-safe (see :mod:`trainers.checkpoints`).

        Written into an empty directory (a step saved again after a resume starts from nothing); the cycle
        state, which lists every file, is written last, once every process has written its files; older
        checkpoints are rotated out (``save_total_limit``) only after that, each out of the way in one rename.
        """
        self.check_losses()  # a diverged run keeps its last finite checkpoint
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            discard([Path(output_dir)])
            os.makedirs(output_dir)
            self.cycles.save_anchor(output_dir)
        self.accelerator.wait_for_everyone()
        save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_cycle_state(output_dir, self._cycle_state())
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)

    def _cycle_state(self) -> dict[str, Any]:
        return {
            "run": run_config(self.args),
            "model1_steps": self.plan.model1_steps,
            "cycle_steps": self.plan.cycle_steps,
            **self.cycles.state_dict(),
            "basin_probe": self.basin_probe,
        }

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore weights through ``from_pretrained`` (with its key conversion) and the cycle state.

        transformers 5.24's own ``_load_from_checkpoint`` loads the legacy key names that ``save_pretrained``
        writes without converting them (upstream #48805): for ViT it silently keeps wrong weights. Loading a
        fresh copy with ``from_pretrained`` and copying it in with ``strict=True`` either restores every
        tensor or raises.
        """
        target = model if model is not None else self.model
        plain = not self.is_fsdp_enabled and not self.is_deepspeed_enabled
        if not load_model_weights(target, resume_from_checkpoint, plain):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = {**read_cycle_state(resume_from_checkpoint), "path": str(resume_from_checkpoint)}
        self._resumed_state = load_anchor(resume_from_checkpoint, state, target)


def _say_if_not_ensembled(model: torch.nn.Module) -> None:
    """Before training: a model `EnsembleModel` will not take (masked LM, question answering...) still trains
    K members and soups, but ``trainer.ensemble()`` will refuse it; say so now, not after the run."""
    from hf_ens.members import SUPPORTED_SUFFIXES

    model = model.get_base_model() if adapters.is_peft_model(model) else model
    name = type(model).__name__
    if not name.endswith(SUPPORTED_SUFFIXES):
        logger.warning(
            f"{name}: StarSSETrainer trains its K members (and soup() averages them), but trainer.ensemble() "
            f"will refuse it: hf_ens.EnsembleModel combines {', '.join('*' + s for s in SUPPORTED_SUFFIXES)} "
            "members only."
        )


def loss_normalized_by_num_items(model: torch.nn.Module) -> bool:
    """Whether `model`'s loss divides by the ``num_items_in_batch`` the Trainer passes to any forward with
    ``**kwargs``: a model that says so (``accepts_loss_kwargs``) or whose forward uses transformers'
    ``self.loss_function``. BERT's and GPT2's sequence classifiers compute their own mean per micro-batch
    (and do not set ``accepts_loss_kwargs``), so the Trainer would sum those means over a step."""
    model = model.get_base_model() if adapters.is_peft_model(model) else model
    model = getattr(model, "module", model)  # a DDP wrapper
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    try:
        return "loss_function" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source: keep the Trainer's own judgement
        return True


class _GlobalStepLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose LR is a function of ``TrainerState.global_step``, re-synchronised after every step.

    The Trainer skips ``lr_scheduler.step()`` when fp16 loss scaling skipped the optimizer step, while
    ``global_step`` (which places the cycle boundaries) still advances; ``sync`` makes the LR follow
    global_step. Uses ``LambdaLR``'s public attributes only (``last_epoch``, ``base_lrs``, ``lr_lambdas``;
    pinned by tests/test_private_hooks.py); the LR reported to the Trainer's logs is the optimizer's own.
    """

    def sync(self, global_step: int, force: bool = False) -> None:
        """Set the LR of ``global_step`` (``LambdaLR``'s formula), also before the first optimizer step;
        `force`: also when already there (the LR function changed)."""
        if force or self.last_epoch != global_step:
            self.last_epoch = global_step
            groups = self.optimizer.param_groups
            for group, base, fn in zip(groups, self.base_lrs, self.lr_lambdas, strict=True):
                group["lr"] = base * fn(global_step)

    def get_last_lr(self) -> list[float]:
        """The LR of every parameter group as the optimizer holds it (set by ``step`` or ``sync``)."""
        return [group["lr"] for group in self.optimizer.param_groups]
