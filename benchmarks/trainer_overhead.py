"""Overhead of StarSSETrainer over a plain transformers Trainer (same model, data and number of steps).

Prints the throughput ratio (plain time / StarSSE time; goal >= 0.98) and the share of a cycle spent writing
members and reloading model 1 (goal <= 1% for cycles of >= 200 steps), for a ~2.7M-parameter ViT on CPU.

Each run is a fresh process and the order alternates (in one process the second run was up to 12% slower,
whichever trainer it was).

    python benchmarks/trainer_overhead.py [--steps-per-cycle 200] [--members 3] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hf_ens.trainers import StarSSEConfig, StarSSETrainer  # noqa: E402
from transformers import (  # noqa: E402
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTForImageClassification,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from benchmarks import _record  # noqa: E402
from hf_ens.testing_utils import TinyImages, tiny_vit  # noqa: E402

# ~2.7M parameters: big enough that per-step work dominates, as in a real run (not the tests' tiny ViT).
VIT = dict(
    image_size=32,
    patch_size=4,
    hidden_size=192,
    num_hidden_layers=6,
    num_attention_heads=3,
    intermediate_size=768,
    num_labels=10,
)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (begin to begin), so load bursts from other processes can be seen."""

    def __init__(self):
        self.times: list[float] = []
        self._last: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def make_model() -> ViTForImageClassification:
    return tiny_vit(0, train=True, **VIT)


def common(out: str) -> dict:
    return dict(
        output_dir=out,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
    )


def run_plain(dataset, batch: int, total_steps: int) -> tuple[float, StepTimer]:
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(per_device_train_batch_size=batch, max_steps=total_steps, **common(out))
        timer = StepTimer()
        trainer = Trainer(model=make_model(), args=args, train_dataset=dataset, callbacks=[timer])
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start, timer


def run_starsse(dataset, batch: int, members: int) -> tuple[float, StarSSETrainer, StepTimer]:
    with tempfile.TemporaryDirectory() as out:
        args = StarSSEConfig(
            per_device_train_batch_size=batch,
            num_train_epochs=1,
            cycle_epochs=1,
            num_members=members,
            method="starsse",
            cycle_learning_rate=5e-4,
            **common(out),
        )
        timer = StepTimer()
        trainer = StarSSETrainer(model=make_model(), args=args, train_dataset=dataset, callbacks=[timer])
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start, trainer, timer


def measure(side: str, steps: int, batch: int, members: int) -> dict:
    """One side's run in THIS process: wall time, median step time, StarSSE's snapshot/cycle-start time."""
    dataset = TinyImages(  # one epoch == one cycle
        steps * batch, with_index=False, image_size=VIT["image_size"], num_labels=VIT["num_labels"]
    )
    total = steps * members
    if side == "plain":
        seconds, timer = run_plain(dataset, batch, total)
        extra = 0.0
    else:
        seconds, trainer, timer = run_starsse(dataset, batch, members)
        extra = trainer.snapshot_seconds + trainer.cycle_start_seconds
    return {"seconds": seconds, "median_step": statistics.median(timer.times), "extra": extra}


def measure_in_subprocess(side: str, opts) -> dict:
    """`measure` in a fresh interpreter, so that neither side inherits the other's allocator or cache state
    (in one process the second run was up to 12% slower, whichever side it was)."""
    cmd = [sys.executable, __file__, "--one", side, "--steps-per-cycle", str(opts.steps_per_cycle)]
    cmd += ["--members", str(opts.members), "--batch-size", str(opts.batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-cycle", type=int, default=200)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--one", choices=["plain", "starsse"], help=argparse.SUPPRESS)  # internal
    _record.add_arguments(parser)
    opts = parser.parse_args()
    hf_logging.set_verbosity_error()
    steps, batch, members = opts.steps_per_cycle, opts.batch_size, opts.members
    if opts.one:
        print(json.dumps(measure(opts.one, steps, batch, members)))
        return

    total = steps * members
    params = sum(p.numel() for p in make_model().parameters())
    print(f"ViT {params / 1e6:.2f}M params, batch {batch}, {members} members x {steps} steps = {total} steps")
    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}, load avg: {os.getloadavg()}")
    print("each run in its own process; the order alternates between repeats")

    ratios, robust, shares, repeats = [], [], [], []
    for r in range(opts.repeats):
        order = ("plain", "starsse") if r % 2 == 0 else ("starsse", "plain")
        res = {side: measure_in_subprocess(side, opts) for side in order}
        plain, ours = res["plain"]["seconds"], res["starsse"]["seconds"]
        extra = res["starsse"]["extra"]
        per_cycle, cycle_time = extra / members, ours / total * steps
        # Load-robust estimate: median step time of each run, plus StarSSE's snapshot/cycle-start time.
        robust_ratio = (res["plain"]["median_step"] * total) / (res["starsse"]["median_step"] * total + extra)
        ratios.append(plain / ours)
        robust.append(robust_ratio)
        shares.append(per_cycle / cycle_time)
        step_plain, step_ours = 1000 * res["plain"]["median_step"], 1000 * res["starsse"]["median_step"]
        repeats.append(
            {
                "first": order[0],
                "plain_steps_per_s": total / plain,
                "starsse_steps_per_s": total / ours,
                "wall_ratio": plain / ours,
                "plain_median_step_ms": step_plain,
                "starsse_median_step_ms": step_ours,
                "load_robust_ratio": robust_ratio,
                "snapshot_and_cycle_start_seconds": extra,
                "snapshot_share_of_cycle_percent": 100 * per_cycle / cycle_time,
            }
        )
        print(
            f"repeat {r} ({order[0]} first): wall plain {total / plain:.2f} steps/s, StarSSE "
            f"{total / ours:.2f} steps/s, ratio {plain / ours:.3f}; median step {step_plain:.1f} ms vs "
            f"{step_ours:.1f} ms, load-robust ratio {robust_ratio:.3f}; snapshots + cycle starts "
            f"{extra:.3f}s = {100 * per_cycle / cycle_time:.2f}% of a cycle",
            flush=True,
        )
    print(
        f"throughput ratio (median over repeats): wall {statistics.median(ratios):.3f}, load-robust "
        f"{statistics.median(robust):.3f} (goal >= 0.98); snapshot share of a cycle "
        f"{100 * statistics.median(shares):.2f}% (goal <= 1%)"
    )
    figures = {
        "model_params_millions": params / 1e6,
        "total_steps": total,
        "wall_ratio_median": statistics.median(ratios),
        "load_robust_ratio_median": statistics.median(robust),
        "snapshot_share_of_cycle_percent_median": 100 * statistics.median(shares),
        "repeats": repeats,
    }
    _record.write(opts.json, "trainer_overhead", vars(opts), figures, opts.note)


if __name__ == "__main__":
    main()
