"""Does ``cycle_learning_rate="auto"`` choose well, and what do its probes cost? (issue 9)

For each seed, the main recipe (`recipes/vit_cifar.py`, so what users get) runs StarSSE with
``cycle_learning_rate=auto`` on the config's task, either whole (default) or, with ``--probe_only``, model 1
plus the probes only (stopped right after the choice). Per seed it prints

* the chosen multiplier (cycle LR / fine-tuning LR) and the probe table;
* probe wall time / whole-run wall time (goal <= 15%). Whole runs measure it; ``--probe_only`` estimates the
  whole run's training as model 1's time x (1 + (K - 1) x cycle_epochs / num_train_epochs) + the probes
  (evaluation excluded, so the estimate errs high);
* against the fair-comparison sweep records, when present (``--records``, JSONL, one run per line:
  ``{"key", "regime", "method", "cycle_factor", "mult", "seed", "metrics": {...}}``, test metrics such as
  ``ensemble/accuracy`` and the same on the held-out split prefixed ``held_out/``): the best swept multiplier
  per seed on HELD-OUT data (StarSSE, this run's cycle_factor; accuracy and NLL separately), whether the auto
  choice's TEST ensemble accuracy / NLL is within the sweep's 95% interval of that best (auto >= best - h for
  accuracy, auto <= best + h for NLL, h the t-interval half-width over seeds of the best's test value), and
  whether the auto choice's uniform soup is more than 2 points below model 1's accuracy. The auto choice's
  test metrics come from its whole run, or (``--probe_only``) from the sweep's record of the chosen
  multiplier when it was swept.

Works on whatever records exist (none, some seeds, some multipliers) and says what it could not compare.

Calibrating ``basin_tolerance``: run with ``--set basin_tolerance=1e9 probe_loss_ratio=1e9
probe_search=linear`` (every candidate is probed, in order; a bisection table is too sparse to re-judge),
``--json calib.json`` and ``--what_if 0.05 0.1 0.2 0.5 [--what_if_loss_ratio 1.5 2]``:
each seed's full probe table is re-judged with each setting and the multiplier it would choose is printed
(the choice rule of ``trainers.probe``, applied to recorded numbers); ``--from_json calib.json`` re-judges a
saved run without training.

    PYTHONPATH=. python benchmarks/basin_guard.py --config recipes/configs/offline.yaml \\
        --seeds 0 1 2 3 4 [--cycle_factor 0.5] [--probe_only] [--records 'docs/results/fair/runs-*.jsonl'] \\
        [--set basin_tolerance=0.1 ...]
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent

from hf_ens.trainers import StarSSEConfig  # noqa: E402
from hf_ens.trainers.probe import PROBE_FILE, choose, format_table, in_basin  # noqa: E402

from benchmarks import _record  # noqa: E402
from recipes._cli import parse_config_and_args  # noqa: E402
from recipes.report_results import mean_ci  # noqa: E402
from recipes.vit_cifar import ScriptArguments, run  # noqa: E402

SOUP_DROP_LIMIT = 0.02  # the issue: never an LR whose uniform soup is > 2 points below model 1


class _ProbesDone(Exception):
    """Raised by :class:`StopAfterProbes` to leave the recipe once the cycle LR is chosen."""

    def __init__(self, result: dict, model1_seconds: float):
        super().__init__("probes done")
        self.result, self.model1_seconds = result, model1_seconds


class StopAfterProbes(TrainerCallback):
    """Ends the run at the step that wrote ``basin_probe.json`` (the trainer's own callback runs first)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / PROBE_FILE
        if path.is_file():
            result = json.loads(path.read_text())
            raise _ProbesDone(result, time.perf_counter() - self.began - result["seconds"])


def one_seed(script, train, seed: int, probe_only: bool) -> dict:
    script, train = copy.deepcopy(script), copy.deepcopy(train)
    train.seed = seed
    with tempfile.TemporaryDirectory(prefix="hfens-basin-guard-") as tmp:
        train.output_dir = tmp
        began = time.perf_counter()
        if probe_only:
            # the stop needs the Trainer's step callbacks, which branches (parallel_members) do not call;
            # model 1 and the probes are the same either way (the probes are branches in both)
            train.parallel_members = False
            try:
                run(script, train, callbacks=[StopAfterProbes()])
            except _ProbesDone as done:
                probe, model1 = done.result, done.model1_seconds
            else:
                raise RuntimeError("the run ended without probing: is cycle_learning_rate 'auto'?")
            cycles = (train.num_members - 1) * train.cycle_epochs / train.num_train_epochs
            whole = model1 * (1 + cycles) + probe["seconds"]
            return {"seed": seed, "probe": probe, "whole_seconds": whole, "estimated": True, "metrics": None}
        metrics = run(script, train)
        whole = time.perf_counter() - began
    return {
        "seed": seed,
        "probe": metrics["basin_probe"],
        "whole_seconds": whole,
        "estimated": False,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)},
    }


def what_if(probe: dict, tolerance: float, loss_ratio: float) -> float:
    """The multiplier the probe table would give with other settings (rows past the recorded ones are
    unknown: a table cut by the run's own settings can only be re-judged up to its cut)."""
    loss1 = probe["model1"]["eval_loss"]
    rows = [{**row, "in_basin": in_basin(row, loss1, tolerance, loss_ratio)} for row in probe["table"]]
    return float(rows[choose(rows)[0]]["multiplier"])


def read_records(pattern: str) -> list[dict]:
    records = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def ci_half(values: list[float]) -> float:
    """Half-width of the 95% t interval for any number of seeds (the report's, not a 1.96 fallback)."""
    return mean_ci(values)[1]


def compare(results: list[dict], records: list[dict], cycle_factor: float) -> list[str]:
    """Lines comparing each seed's auto choice with the sweep (see the module docstring)."""
    swept = [
        r
        for r in records
        if r.get("method") == "starsse"
        and math.isclose(float(r.get("cycle_factor", math.nan)), cycle_factor)
        and r.get("mult") is not None
    ]
    if not swept:
        return [f"no StarSSE sweep records with cycle_factor={cycle_factor:g}: nothing to compare with"]
    by_seed: dict[int, dict[float, dict]] = {}
    for r in swept:
        by_seed.setdefault(int(r["seed"]), {})[float(r["mult"])] = r["metrics"]
    # (test key, held-out key, higher is better)
    criteria = {"accuracy": ("ensemble/accuracy", True), "nll": ("ensemble/nll", False)}
    best: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in criteria}  # seed -> (mult, test)
    for seed, runs in by_seed.items():
        for name, (key, higher) in criteria.items():
            scored = [(m, r) for m, r in runs.items() if f"held_out/{key}" in r and key in r]
            if scored:
                pick = (max if higher else min)(scored, key=lambda mr: mr[1][f"held_out/{key}"])
                best[name][seed] = (pick[0], pick[1][key])
    half = {name: ci_half([test for _, test in per_seed.values()]) for name, per_seed in best.items()}
    lines = [
        f"sweep: {len(swept)} StarSSE runs, seeds {sorted(by_seed)}, multipliers "
        f"{sorted({float(r['mult']) for r in swept})}; 95% half-width of the best's test value: "
        f"accuracy {half['accuracy']:.4f}, NLL {half['nll']:.4f}"
    ]
    passes = {"accuracy": 0, "nll": 0, "soup": 0, "compared": 0}
    for res in results:
        seed, chosen = res["seed"], float(res["probe"]["chosen_multiplier"])
        metrics = res["metrics"] or by_seed.get(seed, {}).get(chosen)
        source = "auto run" if res["metrics"] else "sweep record of the chosen multiplier"
        head = f"seed {seed}: auto x{chosen:g}"
        if metrics is None:
            lines.append(
                f"{head}: no test metrics (x{chosen:g} not swept for this seed; run without --probe_only)"
            )
            continue
        parts, ok = [], {}
        for name, (key, higher) in criteria.items():
            if seed not in best[name] or key not in metrics:
                parts.append(f"{name}: no swept best")
                continue
            mult, test = best[name][seed]
            h = half[name]
            within = (metrics[key] >= test - h) if higher else (metrics[key] <= test + h)
            ok[name] = within and not math.isnan(h)
            parts.append(
                f"{name}: best swept x{mult:g} {test:.4f}, auto {metrics[key]:.4f} "
                f"({'within' if ok[name] else 'OUTSIDE' if not math.isnan(h) else 'n/a: one seed'})"
            )
        drop = metrics.get("member_0/accuracy", math.nan) - metrics.get("soup/accuracy", math.nan)
        soup_ok = not drop > SOUP_DROP_LIMIT
        parts.append(
            f"soup - model 1: {-100 * drop:+.2f} points ({'ok' if soup_ok else 'MORE THAN 2 BELOW'})"
        )
        passes["compared"] += 1
        passes["accuracy"] += ok.get("accuracy", False)
        passes["nll"] += ok.get("nll", False)
        passes["soup"] += soup_ok
        lines.append(f"{head} [{source}]: " + "; ".join(parts))
    n = passes["compared"]
    lines.append(
        f"within the best's 95% interval: accuracy {passes['accuracy']}/{n}, NLL {passes['nll']}/{n} seeds "
        f"(goal: >= 4 of 5 each); soup never > 2 points below model 1: {passes['soup']}/{n}"
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "offline.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--cycle_factor",
        type=float,
        default=None,
        help="cycle_epochs / num_train_epochs (default: the config's)",
    )
    parser.add_argument("--probe_only", action="store_true", help="model 1 + probes only (fast)")
    parser.add_argument("--records", default=str(ROOT / "docs" / "results" / "fair" / "runs-*.jsonl"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    _record.add_arguments(parser)  # the record's figures hold the per-seed results (--from_json reads them)
    parser.add_argument(
        "--what_if", type=float, nargs="*", default=[], help="tolerances to re-judge the probe tables with"
    )
    parser.add_argument(
        "--what_if_loss_ratio",
        type=float,
        nargs="+",
        default=[2.0],
        help="...and these probe_loss_ratio values",
    )
    parser.add_argument(
        "--from_json", default=None, help="re-judge the results of an earlier --json instead of running"
    )
    args = parser.parse_args(argv)

    overrides = []
    for item in args.set:  # key=value, a list as key=a,b,c
        key, _, value = item.partition("=")
        overrides += ["--" + key, *value.split(",")]
    script, train = parse_config_and_args(
        (ScriptArguments, StarSSEConfig),
        ["--config", args.config, "--cycle_learning_rate", "auto", "--method", "starsse", *overrides],
    )
    if args.cycle_factor is None:
        args.cycle_factor = train.cycle_epochs / train.num_train_epochs
    train.cycle_epochs = args.cycle_factor * train.num_train_epochs
    script.interpolation_points = 0  # not needed here
    results = read_results(args.from_json) if args.from_json else []
    for seed in [] if args.from_json else args.seeds:
        res = one_seed(script, train, seed, args.probe_only)
        results.append(res)
        share = res["probe"]["seconds"] / res["whole_seconds"]
        print(format_table(res["probe"]), flush=True)
        print(
            f"[basin_guard] seed {seed}: chosen x{res['probe']['chosen_multiplier']:g}; probes "
            f"{res['probe']['seconds']:.1f} s / whole run {res['whole_seconds']:.1f} s"
            f"{' (estimated)' if res['estimated'] else ''} = {100 * share:.1f}% (goal <= 15%)",
            flush=True,
        )
    for tolerance in args.what_if:
        for ratio in args.what_if_loss_ratio:
            picks = [what_if(r["probe"], tolerance, ratio) for r in results]
            print(
                f"[basin_guard] what if basin_tolerance={tolerance:g}, probe_loss_ratio={ratio:g}: chosen "
                f"multipliers {picks}"
            )
    records = read_records(args.records)
    print(f"[basin_guard] {len(records)} sweep records from {args.records}")
    lines = compare(results, records, args.cycle_factor)
    for line in lines:
        print(f"[basin_guard] {line}")
    shares = [r["probe"]["seconds"] / r["whole_seconds"] for r in results]
    print(
        f"[basin_guard] chosen multipliers {[r['probe']['chosen_multiplier'] for r in results]}; probe share "
        f"of the whole run: mean {100 * statistics.fmean(shares):.1f}%, max {100 * max(shares):.1f}%"
    )
    figures = {
        "chosen_multipliers": [r["probe"]["chosen_multiplier"] for r in results],
        "probe_share_percent": [100 * x for x in shares],
        "probe_share_mean_percent": 100 * statistics.fmean(shares),
        "probe_share_max_percent": 100 * max(shares),
        "comparison": lines,
        "seeds": results,
    }
    _record.write(args.json, "basin_guard", vars(args), figures, args.note)


def read_results(path: str) -> list[dict]:
    """Per-seed results of an earlier run: a record's ``figures.seeds``, or a bare list (older runs)."""
    data = json.loads(Path(path).read_text())
    return data["figures"]["seeds"] if isinstance(data, dict) else data


if __name__ == "__main__":
    main()
