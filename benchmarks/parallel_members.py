"""Wall time of StarSSE's branch phase (the K-1 cycles after model 1) with ``parallel_members`` (issue 11).

Three runs of the same ensemble (a ~2.7M-parameter ViT on 32x32 synthetic images, K = 5, member batch 16):

* 1 process, ``parallel_members=True``: every branch in turn (batch 8 x 2 accumulated);
* N processes, ``parallel_members=True``: branches round-robin, each alone (batch 8 x N accumulated);
* N processes, ``parallel_members=False``: today's data-parallel branches (batch 8 per process, all-reduce).

Each process runs one torch thread (``OMP_NUM_THREADS=1``). Prints the wall times and, from this one run,
``N processes / 1 process speedup`` (goal >= 1.8 for N = 2) and ``parallel vs data-parallel branches``
(goal > 1). Times are the slowest process's branch phase (model 1 excluded).

    PYTHONPATH=. python benchmarks/parallel_members.py [--nproc 2] [--cycle-epochs 2] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import _record

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "_trainer_parallel_run.py"
# ~2.7M parameters (benchmarks/trainer_overhead.py's ViT): per-step compute dominates, not the launch.
VIT = dict(patch_size=4, hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def branch_seconds(nproc: int, options: dict, out: Path) -> float:
    """Launch one run (torchrun for nproc > 1) and return the slowest process's branch-phase wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, str(RUNNER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(RUNNER)]
    proc = subprocess.run(cmd + [str(out), json.dumps(options)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return max(json.loads((out / f"rank{r}.json").read_text())["branch_seconds"] for r in range(nproc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes (GPUs with --gpu)")
    parser.add_argument("--cycle-epochs", type=float, default=2.0, help="length of each branch in epochs")
    parser.add_argument("--samples", type=int, default=64, help="synthetic training images")
    parser.add_argument("--gpu", action="store_true", help="one GPU per process instead of CPU")
    _record.add_arguments(parser)
    args = parser.parse_args()

    base = dict(
        num_members=5,
        num_train_epochs=1,
        cycle_epochs=args.cycle_epochs,
        per_device_train_batch_size=8,
        samples=args.samples,
        image_size=32,
        model=dict(VIT, num_labels=10),
        use_cpu=not args.gpu,
        dataloader_pin_memory=False,
    )
    n = args.nproc
    runs = {
        "1 process, branches in turn": (1, dict(base, parallel_members=True, gradient_accumulation_steps=n)),
        f"{n} processes, parallel branches": (n, dict(base, parallel_members=True)),
        f"{n} processes, data-parallel branches": (n, dict(base, parallel_members=False)),
    }
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (nproc, options)) in enumerate(runs.items()):
            seconds[name] = branch_seconds(nproc, options, Path(tmp) / str(i))
            print(f"{name:45s} branch phase {seconds[name]:7.2f} s", flush=True)
    one, parallel, data_parallel = seconds.values()
    print(f"{n} processes / 1 process speedup: {one / parallel:.2f}x")
    print(f"parallel vs data-parallel branches: {data_parallel / parallel:.2f}x")
    print(f"load average: {Path('/proc/loadavg').read_text().strip()} ({os.cpu_count()} CPUs)")
    figures = {
        "branch_phase_seconds": seconds,
        "speedup_n_processes_over_1": one / parallel,
        "parallel_over_data_parallel": data_parallel / parallel,
    }
    _record.write(args.json, "parallel_members", vars(args), figures, args.note)


if __name__ == "__main__":
    main()
