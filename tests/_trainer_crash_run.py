"""Run by tests/test_trainer_crash.py: SIGKILL real StarSSE training processes at seeded random moments.

Usage: ``python tests/_trainer_crash_run.py WORKDIR SEED KILLS``. This process imports torch and transformers
once and forks every training run from itself (a fork starts in milliseconds, a fresh interpreter in seconds
on a busy box); each forked run is an ordinary process that is SIGKILLed, either

* at a random wall-clock moment: a random delay after the run began to save a random checkpoint, or
* by itself at a named point (``HOOKS``) inside a checkpoint write, a member write or a checkpoint rotation,
  at its n-th pass there (n drawn at random): the moments a wall-clock kill rarely hits exactly.

``WORKDIR/reference`` is an uninterrupted run. Every chain ``WORKDIR/chain_XX`` starts fresh and is killed
again and again; each run after a kill calls ``train(resume_from_checkpoint=True)`` until one finishes.
``WORKDIR/report.json`` records every attempt; the test compares the members and looks for leftovers.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable

import torch
from hf_ens.trainers import StarSSETrainer  # noqa: E402
from hf_ens.trainers.checkpoints import TRASH_PREFIX, checkpoint_step, newest_complete_checkpoint  # noqa: E402
from transformers import PreTrainedModel, Trainer, TrainerState

import hf_ens._io  # noqa: E402
from tests._trainer_utils import RecordingCollator, TinyImages, starsse_config, tiny_vit  # noqa: E402

NUM_SAMPLES, TOTAL_STEPS = 8, 8
CONFIG = dict(
    num_train_epochs=2,  # 8 samples / batch 4: model 1 = 4 steps, then 2 cycles of 2 steps (8 in all)
    cycle_epochs=1,
    num_members=3,
    save_strategy="steps",
    save_steps=1,
    save_total_limit=3,  # rotation runs at every save
    logging_strategy="no",
)
HOOKS = (
    "checkpoint_model",  # model files written, optimizer not yet
    "checkpoint_rng",  # optimizer written, RNG state and trainer_state.json not yet
    "trainer_state_half",  # trainer_state.json half written
    "marker",  # the completion marker written to its temp file, not yet renamed
    "member_half",  # a member's temp directory holds config.json, no weights
    "member_install",  # a member's temp directory complete, not yet renamed into place
    "rotate",  # an old checkpoint moved into the trash, not yet deleted
)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_hook(point: str, n: int, counts: dict[str, int] | None = None) -> None:
    """Patch this (forked) process so that its n-th pass through `point` SIGKILLs it (or just count)."""
    calls = itertools.count(1)

    def hit() -> bool:
        k = next(calls)
        if counts is not None:  # the reference run: count the passes, note when the first one came
            counts[point] = k
            counts.setdefault(f"{point}_first_at", time.time())
            return False
        return k == n

    def before(owner, name: str, when=lambda *a, **kw: True) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if when(*args, **kwargs) and hit():
                _die()
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    if point == "checkpoint_model":
        before(Trainer, "_save_optimizer_and_scheduler")
    elif point == "checkpoint_rng":
        before(Trainer, "_save_rng_state")
    elif point == "trainer_state_half":
        original = TrainerState.save_to_json

        def save_to_json(self, json_path):
            if hit():
                original(self, json_path)
                with open(json_path, "r+") as f:
                    f.truncate(os.path.getsize(json_path) // 2)
                _die()
            original(self, json_path)

        TrainerState.save_to_json = save_to_json
    elif point == "marker":
        before(os, "fsync")  # only hf_ens._io.atomic_file syncs: after the data, before the rename
    elif point == "member_half":
        original_save = PreTrainedModel.save_pretrained

        def save_pretrained(self, save_directory, *args, **kwargs):
            if os.path.basename(str(save_directory)).startswith(".member_") and hit():
                self.config.save_pretrained(save_directory)
                _die()
            return original_save(self, save_directory, *args, **kwargs)

        PreTrainedModel.save_pretrained = save_pretrained
    elif point == "member_install":
        before(hf_ens._io, "_install", when=lambda tmp, target: target.parent.name == "members")
    elif point == "rotate":
        before(shutil, "rmtree", when=lambda path, *a, **kw: os.path.basename(path).startswith(TRASH_PREFIX))
    else:
        raise ValueError(point)


def train(out: str, resume: bool) -> None:
    trainer = StarSSETrainer(
        model=tiny_vit(0),
        args=starsse_config(out, overwrite_output_dir=not resume, **CONFIG),
        train_dataset=TinyImages(NUM_SAMPLES),
        data_collator=RecordingCollator(),
    )
    trainer.train(resume_from_checkpoint=True if resume else None)


def fork_run(
    out: str, resume: bool, hook: tuple[str, int] | None = None, counts_file: str | None = None
) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        counts: dict[str, int] = {}
        if counts_file:
            for point in HOOKS:
                install_hook(point, 0, counts)
        elif hook:
            install_hook(*hook)
        train(out, resume)
        if counts_file:
            with open(counts_file, "w") as f:
                json.dump(counts, f)
    except BaseException:  # noqa: BLE001 - report anything, exit without running the parent's handlers
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int, kill_when: Callable[[], bool] = lambda: False) -> str:
    """'finished', 'failed' or 'killed' (SIGKILLed by itself, or by us once `kill_when()` is true)."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if kill_when():
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.001)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    return "finished" if os.waitstatus_to_exitcode(status) == 0 else "failed"


def after_step(out: str, step: int, jitter: float) -> Callable[[], bool]:
    """True `jitter` seconds after this run began to save ``checkpoint-{step}``: a random moment inside that
    save or the next step (timed from progress, not from the start, so that kills land on a busy box too)."""
    started, seen = time.time(), []

    def due() -> bool:
        if not seen:
            path = os.path.join(out, f"checkpoint-{step}")
            try:
                if os.stat(path).st_mtime >= started:  # not a directory an earlier, killed run left
                    seen.append(time.monotonic())
            except FileNotFoundError:
                return False
        return bool(seen) and time.monotonic() - seen[0] >= jitter

    return due


def main(workdir: str, seed: int, target_kills: int) -> None:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    start = time.monotonic()
    reference = os.path.join(workdir, "reference")
    counts_file = os.path.join(workdir, "counts.json")
    assert wait(fork_run(reference, resume=False, counts_file=counts_file)) == "finished"
    run_seconds = time.monotonic() - start
    with open(counts_file) as f:
        counts = json.load(f)
    step_seconds = (time.time() - counts["checkpoint_model_first_at"]) / TOTAL_STEPS
    attempts, chains = [], []

    def enough() -> bool:  # `target_kills` kills, and as many runs resumed after one
        kills = sum(a["outcome"] == "killed" for a in attempts)
        return min(kills, sum(a["resume"] for a in attempts)) >= target_kills

    while not enough():
        out = os.path.join(workdir, f"chain_{len(chains):02d}")
        chains.append(out)
        for attempt in itertools.count():
            checkpoint = newest_complete_checkpoint(out)[0]
            resume = checkpoint is not None
            record = {"chain": len(chains) - 1, "resume": resume, "from": checkpoint and checkpoint.name}
            # Kill moments are drawn over what is left of the run, so that most attempts hit.
            done = checkpoint_step(checkpoint) if resume else 0
            left = 1 - done / TOTAL_STEPS
            if attempt >= 6 or done == TOTAL_STEPS:  # enough kills for one chain, or nothing left: finish
                record.update(mode="none", outcome=wait(fork_run(out, resume)))
            elif rng.random() < 0.5:
                step, jitter = rng.randint(done + 1, TOTAL_STEPS), rng.uniform(0, 1.5 * step_seconds)
                record.update(mode="timed", step=step, jitter=round(jitter, 4))
                record["outcome"] = wait(fork_run(out, resume), after_step(out, step, jitter))
            else:
                point = rng.choice(HOOKS)
                n = rng.randint(1, max(1, round(counts[point] * left)))
                record.update(mode="hook", point=point, n=n)
                record["outcome"] = wait(fork_run(out, resume, hook=(point, n)))
            attempts.append(record)
            if record["outcome"] == "failed":
                raise SystemExit(f"a run failed: {record}")
            if record["outcome"] == "finished":
                break
    report = {
        "run_seconds": run_seconds,
        "counts": counts,
        "attempts": attempts,
        "chains": chains,
        "reference": reference,
        "seconds": time.monotonic() - start,
    }
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
