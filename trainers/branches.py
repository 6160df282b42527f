"""One branch trained alone in this process (``parallel_members=True``): data, loop, checkpoints.

A *branch* is a member trained from its anchor without the rest of the run: a StarSSE cycle after model 1, or
any Local DE member. Under ``parallel_members`` each process trains its branches (``trainers.parallel``) with
no DDP wrapper and no collective: a plain optimizer step after accumulating ``gradient_accumulation_steps x
processes`` micro-batches of ``per_device_train_batch_size``, so a member's batch equals the data-parallel one
of model 1. Everything random in branch k comes from ``(seed, k)`` (:func:`branch_seed`): its data order, the
global RNGs (dropout, augmentation in the collator) and the Local DE head. Hence one process training every
branch in turn and N processes training them at once give the same members.

The branch reuses the trainer's one mechanism for everything that is not "which process, which batches",
through its public interface: the cycle start (``StarSSETrainer.start_cycle``: anchor, seed, head), the LR
schedule (``StarSSETrainer.new_lr_scheduler`` at the branch's global step), the optimizer
(``Trainer.create_optimizer``), the loss (``Trainer.compute_loss``) and the member snapshot
(``StarSSETrainer.save_member``). Checkpoints live in
``{output_dir}/branches/member_XX/checkpoint-<step>`` and are complete once their ``starsse_state.json`` is
written (``trainers.checkpoints``), so a killed process resumes each branch from its newest complete one.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, Sampler
from transformers.trainer_utils import TrainOutput
from transformers.utils import logging

from hf_ens import adapters

from .checkpoints import (
    BRANCHES_DIR,
    TRASH_PREFIX,
    discard,
    list_checkpoints,
    member_run_config,
    newest_complete_checkpoint,
    read_cycle_state,
    refuse_other_run,
    write_cycle_state,
)
from .cycles import branch_seed
from .nonfinite import LossWatch
from .parallel import MemberProgress, assigned_members, wait_for_members
from .schedule import plan_cycles

# In transformers' logger tree: log_level / log_level_replica decide per process, as for the Trainer.
logger = logging.get_logger("transformers.trainer.branches")

__all__ = [
    "BRANCHES_DIR",
    "BranchData",
    "MemberSeededSampler",
    "branch_config",
    "branch_seed",
    "train_branch",
]

BRANCH_MODEL_NAME = "model.safetensors"
BRANCH_OPTIMIZER_NAME = "optimizer.pt"
BRANCH_RNG_NAME = "rng_state.pt"


class MemberSeededSampler(Sampler[int]):
    """Random order per epoch, drawn from ``(seed, epoch)``; with ``epochs_per_member``, from
    ``(branch_seed(seed, member), epoch within member)`` so that each Local DE member shuffles its data with
    its own seed (the same order a branch of that member sees under ``parallel_members``).

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
            return branch_seed(self.seed, member), local_epoch
        return self.seed, epoch

    def __iter__(self):
        seed = np.random.SeedSequence(list(self.seed_of_epoch(self.epoch))).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(seed))
        yield from torch.randperm(self.num_samples, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_samples


def member_accumulation(args) -> int:
    """Micro-batches per optimizer step of a branch: the data-parallel batch of model 1 on one process."""
    return args.gradient_accumulation_steps * args.world_size


def branch_config(args) -> dict[str, Any]:
    """The run settings a branch checkpoint must match: those of the run, but the member's accumulation in
    place of processes x accumulation (a branch does not depend on how many processes share the run)."""
    return {**member_run_config(args), "member_accumulation": member_accumulation(args)}


class BranchData:
    """The micro-batches of a branch: per epoch, the order of ``MemberSeededSampler(branch_seed(data_seed,
    k))``, cut into ``per_device_train_batch_size`` batches and grouped ``member_accumulation`` at a time per
    optimizer step (the last step of an epoch takes what is left, as the Trainer does)."""

    def __init__(self, dataset, collate_fn, args):
        if not hasattr(dataset, "__len__"):
            raise ValueError("parallel_members=True needs a training dataset with a length (not iterable).")
        self.dataset, self.collate_fn, self.args = dataset, collate_fn, args
        self.batch_size = args.per_device_train_batch_size
        self.accumulation = member_accumulation(args)
        n = len(dataset)
        self.batches_per_epoch = (
            n // self.batch_size if args.dataloader_drop_last else -(-n // self.batch_size)
        )
        if self.batches_per_epoch < 1:
            raise ValueError(f"The training set ({n} samples) holds no batch of {self.batch_size}.")
        self.steps_per_epoch = -(-self.batches_per_epoch // self.accumulation)
        self.seed = args.data_seed if args.data_seed is not None else args.seed

    @classmethod
    def from_trainer(cls, trainer) -> BranchData:
        """The Trainer's own training dataset and collator, with its unused columns removed as it does."""
        loader = trainer.get_train_dataloader()
        return cls(loader.dataset, loader.collate_fn, trainer.args)

    def steps(self, k: int, start: int, stop: int, seed: int | None = None) -> Iterator[tuple[int, list]]:
        """(step, micro-batches) for optimizer steps ``start..stop-1`` of member k (data order from
        ``branch_seed(data seed, k)``, or from `seed`: the probes of ``trainers.probe``); resuming at
        ``start`` skips the earlier batches by index, so no skipped batch is collated (no augmentation RNG
        consumed)."""
        seed = branch_seed(self.seed, k) if seed is None else seed
        sampler = MemberSeededSampler(len(self.dataset), seed)
        args, step = self.args, start
        while step < stop:
            epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
            sampler.set_epoch(epoch)
            order = list(sampler)
            batches = [
                order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.batches_per_epoch)
            ]
            loader = DataLoader(
                self.dataset,
                batch_sampler=batches[step_in_epoch * self.accumulation :],
                collate_fn=self.collate_fn,
                num_workers=args.dataloader_num_workers,
                pin_memory=args.dataloader_pin_memory,
                # worker seeds come from this generator, never from the global RNG the branch checkpoints
                generator=torch.Generator().manual_seed(int(sampler.seed_of_epoch(epoch)[0]) + epoch),
            )
            micro_batches = iter(loader)
            for s in range(step_in_epoch, self.steps_per_epoch):
                if step >= stop:
                    return
                count = min(self.accumulation, self.batches_per_epoch - s * self.accumulation)
                yield step, [next(micro_batches) for _ in range(count)]
                step += 1


def branch_dir(trainer, k: int) -> Path:
    return Path(trainer.args.output_dir) / BRANCHES_DIR / f"member_{k:02d}"


def _interval(value: float, total: int) -> int:
    """A Trainer step interval: a count, or a fraction of the branch's steps when < 1."""
    return max(1, math.ceil(value * total)) if value < 1 else int(value)


def _save_interval(args, data: BranchData, total: int) -> int | None:
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    if strategy == "steps":
        return _interval(args.save_steps, total)
    if strategy == "epoch":
        return data.steps_per_epoch
    return None


def train_branch(trainer, k: int, data: BranchData, progress=None) -> float:
    """Train member k from its anchor (or its newest branch checkpoint) to the end and write it.

    Returns the mean training loss of the steps run here.
    """
    args, plan, model = trainer.args, trainer.plan, trainer.model
    total = plan.model1_steps if k == 0 else plan.cycle_steps
    first_global = plan.cycle_start(k)
    directory = branch_dir(trainer, k)
    checkpoint = _checkpoint_to_resume(trainer, directory, k)

    trainer.start_cycle(k)  # anchor weights, the member's seed, the Local DE head
    trainer.optimizer = None
    optimizer = trainer.create_optimizer()
    scheduler = trainer.new_lr_scheduler(optimizer)
    start = 0
    if checkpoint is not None:
        start = _load_branch_checkpoint(checkpoint, model, optimizer)
        trainer.branches_resumed[k] = start
    where = f"process {args.process_index} of {args.world_size}"
    logger.info(
        f"{where}: member {k:02d} starts at step {start} of {total}"
        + (f" (resumed from {checkpoint})" if checkpoint is not None else "")
    )
    began = time.perf_counter()
    save_every = _save_interval(args, data, total)
    log_every = _interval(args.logging_steps, total)
    # losses stay on the device between log lines, checkpoints and the member (trainers.nonfinite)
    watch, loss_sum = LossWatch(), torch.zeros((), device=args.device)

    def check_losses() -> None:
        watch.check(lambda loss, step: trainer.diverged_message(loss, step, k))

    model.train()
    for step, micro_batches in data.steps(k, start, total):
        scheduler.sync(first_global + step)
        loss = accumulate_gradients(trainer, model, micro_batches)
        watch.update(loss, first_global + step)
        apply_update(args, model, optimizer)
        loss_sum += loss
        done = step + 1
        if done % log_every == 0 or done == total:
            check_losses()
            logger.info(
                f"{where}: member {k:02d} step {done}/{total} loss {float(loss):.4f} "
                f"lr {optimizer.param_groups[0]['lr']:.3g}"
            )
        if save_every and done % save_every == 0 and done < total:
            check_losses()
            _save_branch_checkpoint(trainer, directory, k, done, optimizer)
        if progress is not None:
            progress.refresh()
    check_losses()
    trainer.save_member(k, first_global + total)
    discard([directory])  # the member replaces its checkpoints
    logger.info(f"{where}: member {k:02d} written in {time.perf_counter() - began:.1f} s")
    return float(loss_sum) / (total - start) if total > start else 0.0


def accumulate_gradients(trainer, model: torch.nn.Module, micro_batches: list) -> torch.Tensor:
    """Forward and backward every micro-batch of one optimizer step (the Trainer's ``compute_loss`` under its
    autocast); returns the step's loss. The loss is the Trainer loop's: with the ``num_items_in_batch`` it
    passes (``StarSSETrainer.step_num_items``: a causal LM's step loss is per token over all micro-batches,
    padded ones included), else the mean over micro-batches."""
    loss = torch.zeros((), device=trainer.args.device)
    num_items = trainer.step_num_items(micro_batches)
    for inputs in micro_batches:
        inputs = send_to_device(inputs, trainer.args.device)
        with trainer.accelerator.autocast(), trainer.alone():
            micro_loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items)
        if num_items is None:
            micro_loss = micro_loss / len(micro_batches)
        micro_loss.backward()
        loss += micro_loss.detach().float()
    return loss


def apply_update(args, model: torch.nn.Module, optimizer) -> None:
    """Clip (``max_grad_norm``), step, clear the gradients: the end of an optimizer step outside the loop."""
    if args.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _branch_state(trainer, k: int, step: int) -> dict[str, Any]:
    plan = trainer.plan
    return {
        "run": branch_config(trainer.args),
        "member": k,
        "step": step,
        "model1_steps": plan.model1_steps,
        "cycle_steps": plan.cycle_steps,
    }


def _save_branch_checkpoint(trainer, directory: Path, k: int, step: int, optimizer) -> None:
    """Weights, optimizer state and RNG states, then the completion marker; older ones of this branch go."""
    target = directory / f"checkpoint-{step}"
    discard([target])
    target.mkdir(parents=True)
    if adapters.is_peft_model(trainer.model):  # the adapter (and head) only: the base is frozen
        safetensors.torch.save_file(adapters.member_weights(trainer.model), str(target / BRANCH_MODEL_NAME))
    else:
        safetensors.torch.save_model(trainer.model, str(target / BRANCH_MODEL_NAME))
    torch.save(optimizer.state_dict(), target / BRANCH_OPTIMIZER_NAME)
    torch.save(rng_state(), target / BRANCH_RNG_NAME)
    write_cycle_state(target, _branch_state(trainer, k, step))
    discard([p for p in list_checkpoints(directory) if p != target])


def _checkpoint_to_resume(trainer, directory: Path, k: int) -> Path | None:
    """The newest complete checkpoint of branch k (incomplete ones are skipped with a warning), refused when
    another run configuration made it."""
    if directory.is_dir():
        for leftover in directory.glob(f"{TRASH_PREFIX}*"):
            discard([leftover])
    checkpoint, skipped = newest_complete_checkpoint(directory)
    for path, problems in skipped.items():
        warnings.warn(f"Skipping incomplete checkpoint {path}: {'; '.join(problems)}.", stacklevel=3)
    if checkpoint is None:
        return None
    saved = read_cycle_state(checkpoint)
    ours = _branch_state(trainer, k, saved.get("step"))
    flat = {**saved.get("run", {}), **{name: value for name, value in saved.items() if name != "run"}}
    refuse_other_run(checkpoint, flat, {**ours.pop("run"), **ours})
    return checkpoint


def _load_branch_checkpoint(checkpoint: Path, model: torch.nn.Module, optimizer) -> int:
    device = next(model.parameters()).device
    if adapters.is_peft_model(model):
        adapters.load_member_weights(model, safetensors.torch.load_file(str(checkpoint / BRANCH_MODEL_NAME)))
    else:
        safetensors.torch.load_model(model, str(checkpoint / BRANCH_MODEL_NAME), strict=True)
    optimizer.load_state_dict(torch.load(checkpoint / BRANCH_OPTIMIZER_NAME, map_location=device))
    set_rng_state(torch.load(checkpoint / BRANCH_RNG_NAME, weights_only=True))
    return int(read_cycle_state(checkpoint)["step"])


def rng_state() -> dict[str, Any]:
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": (version, list(keys), gauss),
        "numpy": (name, torch.from_numpy(mt.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, mt.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_branches(trainer) -> TrainOutput:
    """The branch phase of ``parallel_members`` (after model 1): each process trains its members alone
    (``trainers.parallel`` assigns them), then all wait for every member."""
    args, began = trainer.args, time.perf_counter()
    data = BranchData.from_trainer(trainer)
    plan = plan_cycles(args, data.steps_per_epoch)
    if trainer.plan is not None and trainer.plan != plan:
        raise ValueError(f"Model 1 was trained with {trainer.plan}, the branches would use {plan}.")
    trainer.plan = plan
    trainer.cycles.anchor_from_model1()
    trainer.model_wrapped = trainer.model  # no DDP wrapper: a branch exchanges nothing with other processes
    trainer.accelerator.free_memory()
    if args.probes_cycle_learning_rate:  # after model 1, before any branch: every process probes
        adapters.load_member_weights(trainer.model, trainer.cycles.anchor)
        trainer.choose_cycle_learning_rate(reuse_probe_file=True)
    members = range(1 if args.method == "starsse" else 0, args.num_members)
    mine = assigned_members(members, args.process_index, args.world_size)
    progress = MemberProgress(
        trainer.member_paths, enabled=trainer.is_world_process_zero() and not args.disable_tqdm
    )
    losses = [
        train_branch(trainer, k, data, progress) for k in mine if not os.path.isdir(trainer.member_paths[k])
    ]
    wait_for_members(progress)
    progress.close()
    trainer.accelerator.wait_for_everyone()
    if args.should_save:  # every branch left with its member
        discard([Path(args.output_dir) / BRANCHES_DIR])
    trainer.branch_seconds = time.perf_counter() - began
    trainer.state.global_step = plan.total_steps
    loss = sum(losses) / len(losses) if losses else 0.0
    return TrainOutput(plan.total_steps, loss, {"branch_runtime": trainer.branch_seconds, "train_loss": loss})
