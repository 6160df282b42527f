"""Reproduce the paper's claims on the embedded offline task, honestly, over several seeds.

Every run goes through the main recipe (`vit_cifar.run`), so what is measured is what users get. Per seed:
  P1  single fine-tune from the pre-trained checkpoint vs from scratch, each with its best LR (held-out)
  (b) ensembles vs their mean member          (c) StarSSE vs SSE vs Local DE of equal size and budget
  (d) a cycle-LR sweep (StarSSE and SSE)      (e) uniform soups of each method vs the single model
Writes runs-seed<N>.jsonl (one line per run, resumable; seeds may run in parallel processes), summary.json,
and the figures + tables for docs/results.md.

    python recipes/compare_methods.py --config recipes/configs/compare_offline.yaml
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from recipes._cli import parse_config_and_args, run_cli
from recipes.vit_cifar import ScriptArguments, run
from trainers import StarSSEConfig

# two-sided 95% Student-t quantiles by degrees of freedom (no scipy dependency)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass
class CompareArguments:
    """What to compare; the per-run settings come from the same YAML as the main recipe."""

    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds (>= 5 for claims)."}
    )
    lr_grid: list[float] = field(
        default_factory=lambda: [1e-4, 3e-4, 1e-3],
        metadata={
            "help": "LRs tried for the single pre-trained and scratch models (P1, chosen on held-out)."
        },
    )
    cycle_lr_multipliers: list[float] = field(
        default_factory=lambda: [1.0, 4.0, 16.0, 32.0],
        metadata={"help": "Cycle LR = multiplier x fine-tune LR."},
    )
    sse_multipliers: list[float] = field(
        default_factory=lambda: [1.0, 4.0, 16.0], metadata={"help": "Cycle-LR multipliers also run with SSE."}
    )
    results_dir: str = field(
        default="docs/results", metadata={"help": "Where runs-seed*.jsonl, summary, figures and tables go."}
    )
    report_only: bool = field(default=False, metadata={"help": "Only rebuild the report from finished runs."})


def _ci95(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    half = _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, half


def _one_run(script: ScriptArguments, train: StarSSEConfig, **changes) -> dict:
    script, train = copy.deepcopy(script), copy.deepcopy(train)
    for key, value in changes.items():
        setattr(script if hasattr(script, key) else train, key, value)
    with tempfile.TemporaryDirectory(prefix="hfens-compare-") as tmp:
        train.output_dir = tmp
        started = time.perf_counter()
        metrics = run(script, train)
        metrics["seconds"] = time.perf_counter() - started
    return metrics


def run_all(cmp: CompareArguments, script: ScriptArguments, train: StarSSEConfig) -> list[dict]:
    """All runs of all seeds; finished runs are read back from runs.jsonl: a crash loses one run at most."""
    out = Path(cmp.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {rec["key"]: rec for rec in read_records(out)}
    records = []

    def record(key: str, meta: dict, **changes) -> dict:
        if key not in done:
            metrics = _one_run(script, train, **changes)
            rec = {"key": key, **meta, "metrics": {k: v for k, v in metrics.items() if k != "summary_table"}}
            with (out / f"runs-seed{meta['seed']}.jsonl").open("a") as f:
                f.write(json.dumps(rec, default=float) + "\n")
            done[key] = rec
            print(
                f"[compare] {key}: {rec['metrics'].get('ensemble/accuracy', float('nan')):.4f} "
                f"({rec['metrics']['seconds']:.0f}s)",
                flush=True,
            )
        records.append(done[key])
        return done[key]

    base_lr = train.learning_rate
    for seed in cmp.seeds:
        for init in ("pretrained", "scratch"):  # P1: single models, each with its own best LR
            for lr in cmp.lr_grid:
                record(
                    f"single/{init}/lr={lr:g}/seed={seed}",
                    {"kind": "single", "init": init, "lr": lr, "seed": seed},
                    seed=seed,
                    learning_rate=lr,
                    num_members=1,
                    init_from_scratch=init == "scratch",
                    interpolation_points=0,
                )
        record(
            f"local_de/seed={seed}",
            {"kind": "method", "method": "local_de", "mult": 1.0, "seed": seed},
            seed=seed,
            method="local_de",
            interpolation_points=3,
        )
        for mult in cmp.cycle_lr_multipliers:
            for method in ("starsse", "sse"):
                if method == "sse" and mult not in cmp.sse_multipliers:
                    continue
                record(
                    f"{method}/x{mult:g}/seed={seed}",
                    {"kind": "method", "method": method, "mult": mult, "seed": seed},
                    seed=seed,
                    method=method,
                    cycle_learning_rate=base_lr * mult,
                    interpolation_points=3,
                )
    return records


def read_records(out: Path) -> list[dict]:
    """Every finished run; one file per seed, so seeds can run in parallel processes."""
    records = []
    for path in sorted(out.glob("runs-seed*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def summarise(records: list[dict]) -> dict:
    """Mean and 95% interval over seeds for every (kind, method, multiplier) group and metric."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        name = (
            f"single/{rec['init']}/lr={rec['lr']:g}"
            if rec["kind"] == "single"
            else f"{rec['method']}/x{rec['mult']:g}"
        )
        groups.setdefault(name, []).append(rec["metrics"])
    summary = {}
    for name, runs in groups.items():
        keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        summary[name] = {k: _ci95([float(r[k]) for r in runs if k in r]) for k in keys}
        summary[name]["n"] = len(runs)
    return summary


def main(argv: list[str] | None = None) -> None:
    cmp, script, train = parse_config_and_args((CompareArguments, ScriptArguments, StarSSEConfig), argv)
    out = Path(cmp.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not cmp.report_only:
        run_all(cmp, script, train)
    records = read_records(out)  # all seeds, also those run by other processes
    summary = summarise(records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    from recipes.report_results import write_report

    write_report(records, summary, out)


if __name__ == "__main__":
    run_cli(main)
