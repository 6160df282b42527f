"""Tables, figures and the claims table of the study (recipes/study.py), rebuilt from its raw records alone.

    python recipes/report_study.py docs/results/study [--out docs/results/study]

Every figure is a mean over replicates (pre-trained checkpoint x fine-tune seed) with its 95% t interval;
every contrast is paired by replicate, with the number of replicates where the difference has the claimed
sign. Cycle LRs are chosen on the HELD-OUT split (the mean over replicates of the K-member ensemble's held-out
accuracy, or its held-out NLL: both choices are shown); the test split only reports. A verdict says "holds"
when the 95% interval of the paired difference lies on the claimed side of 0, "does not hold" when it lies on
the other side, "not shown" when it contains 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from recipes.corruptions import CORRUPTIONS, SEVERITIES
from recipes.report_results import mean_ci

GRID_METHODS = ("starsse", "sse")
SELECTIONS = {"accuracy": "held-out accuracy", "nll": "held-out NLL"}
SCALE = {"accuracy": 100.0, "nll": 1.0, "ece": 100.0}  # accuracy and ECE in points


def load(results_dir: str | Path) -> list[dict]:
    records: dict[str, dict] = {}
    for path in sorted(Path(results_dir).glob("runs-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                records[rec["key"]] = rec  # a task run twice (a resumed study): the last record counts
    return list(records.values())


def run_name(rec: dict) -> str:
    return f"{rec['method']}/x{rec['mult']:g}" if rec["method"] in (*GRID_METHODS, "net") else rec["method"]


class Study:
    """Records indexed by target -> replicate (pretrain seed, seed) -> run name."""

    def __init__(self, records: list[dict]):
        self.runs: dict[str, dict[tuple[int, int], dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
        for rec in records:
            self.runs[rec["target"]][(rec["pretrain_seed"], rec["seed"])][run_name(rec)] = rec

    def targets(self) -> list[str]:
        return sorted(self.runs)

    def replicates(self, target: str, *names: str) -> list[tuple[int, int]]:
        """Replicates where every named run exists (the guard needs the fixed-LR run it chose)."""
        out = []
        for rep in sorted(self.runs[target]):
            if all(self.record(target, rep, n) is not None for n in names):
                out.append(rep)
        return out

    def record(self, target: str, rep: tuple[int, int], name: str) -> dict | None:
        runs = self.runs[target][rep]
        if name == "guard" or name.startswith("net/"):
            # members 3..K: the fixed-LR run's at the chosen LR (the probes leave no trace: trainers/probe.py)
            guard = runs.get(name)
            if guard is None:
                return None
            return runs.get(f"starsse/x{guard.get('chosen_mult', guard['mult']):g}")
        return runs.get(name)

    def value(self, target: str, rep, name: str, split: str, what: str, key: str, k: int | None = None):
        """`key` (accuracy, nll, ece) of the `what` (ensemble, soup, mean_member, model1) of run `name`."""
        rec = self.record(target, rep, name)
        m = rec["metrics"][split]
        if what == "model1" or rec["method"] == "model1":
            return m["members"][0][key]
        if what == "mean_member":
            members = m["members"][:k] if k else m["members"]
            return statistics.fmean(x[key] for x in members)
        k = k or len(m["members"])
        return m[what][str(k)][key]

    def size(self, target: str) -> int:
        """K: the members of the study's runs (the guard's own record holds 2)."""
        sizes = [
            len(r["metrics"]["test"]["members"]) for runs in self.runs[target].values() for r in runs.values()
        ]
        return max(sizes)

    def mults(self, target: str, method: str) -> list[float]:
        found = {
            r["mult"] for runs in self.runs[target].values() for r in runs.values() if r["method"] == method
        }
        return sorted(found)

    def choose(self, target: str, method: str, by: str) -> str | None:
        """The cycle LR whose K-ensemble has the best mean HELD-OUT `by` over the replicates that ran every
        candidate (never the test split)."""
        names = [f"{method}/x{m:g}" for m in self.mults(target, method)]
        reps = self.replicates(target, *names)
        if not names or not reps:  # a target the method has not run on yet
            return None
        score = {
            n: statistics.fmean(self.value(target, r, n, "held_out", "ensemble", by) for r in reps)
            for n in names
        }
        return (min if by == "nll" else max)(score, key=score.get)


def _interval(values: list[float], scale: float, digits: int) -> str:
    mean, half = mean_ci(values)
    if half != half:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f}"


def _digits(key: str) -> int:
    return 3 if key == "nll" else 2


def paired(
    study: Study, target: str, a: str, b: str, what_a: str, what_b: str, key: str, split="test"
) -> dict:
    """a - b over the replicates that have both runs."""
    reps = study.replicates(target, a, b)
    diffs = [
        study.value(target, r, a, split, what_a, key) - study.value(target, r, b, split, what_b, key)
        for r in reps
    ]
    if not diffs:
        return {"n": 0}
    mean, half = mean_ci(diffs)
    better = [d < 0 if key in ("nll", "ece") else d > 0 for d in diffs]
    return {"mean": mean, "half": half, "n": len(diffs), "better": sum(better), "diffs": diffs}


def _fmt(p: dict, key: str) -> str:
    if not p.get("n"):
        return "–"
    s, d = SCALE[key], _digits(key)
    half = "" if p["half"] != p["half"] else f" ± {p['half'] * s:.{d}f}"
    return f"{p['mean'] * s:+.{d}f}{half} ({p['better']}/{p['n']})"


def verdict(p: dict, key: str, claim_better: bool = True) -> str:
    """'holds' / 'does not hold' / 'not shown' for "a is better than b" (lower NLL / ECE is better)."""
    if not p.get("n") or p["half"] != p["half"]:
        return "no data"
    lo, hi = p["mean"] - p["half"], p["mean"] + p["half"]
    better_side = (hi < 0) if key in ("nll", "ece") else (lo > 0)
    worse_side = (lo > 0) if key in ("nll", "ece") else (hi < 0)
    if not claim_better:
        better_side, worse_side = worse_side, better_side
    return "holds" if better_side else "does not hold" if worse_side else "not shown"


# ------------------------------------------------------------------------------------------ tables


def method_table(study: Study, target: str, chosen: dict[str, dict[str, str]]) -> str:
    """Test metrics of every run at K = 5: ensemble, soup, mean member; model 1 for reference."""
    names = ["model1", "local_de", "global_de", "guard"]
    names += [f"net/x{x:g}" for x in study.mults(target, "net")]
    names += [f"{m}/x{x:g}" for m in GRID_METHODS for x in study.mults(target, m)]
    lines = [
        "| run | n | ensemble acc | ensemble NLL | ensemble ECE | soup acc | soup NLL | mean member acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        reps = study.replicates(target, name)
        if not reps:
            continue
        label = name + "".join(
            f" ← chosen ({SELECTIONS[by]})"
            for by, c in chosen.get(name.split("/")[0], {}).items()
            if c == name
        )
        cells = []
        for what, key in (
            ("ensemble", "accuracy"), ("ensemble", "nll"), ("ensemble", "ece"),
            ("soup", "accuracy"), ("soup", "nll"), ("mean_member", "accuracy"),
        ):  # fmt: skip
            if name == "model1" and what == "soup":
                cells.append("–")
                continue
            vals = [study.value(target, r, name, "test", what, key) for r in reps]
            cells.append(_interval(vals, SCALE[key], _digits(key)))
        lines.append(f"| {label} | {len(reps)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def at_size(study: Study, target: str, rep, name: str, key: str, k: int) -> float:
    """Test `key` of the ensemble of the first k members of run `name` (k = 1: model 1)."""
    if k == 1:
        return study.value(target, rep, name, "test", "model1", key)
    return study.value(target, rep, name, "test", "ensemble", key, k)


def critical_path(name: str, k: int) -> int:
    """Member trainings (E optimizer epochs each) one after another to get the first k members of `name` with
    parallel members (one device per branch): Local / Global DE train every member at once, StarSSE trains
    model 1 then every cycle at once, SSE's cycles follow each other. Total optimizer steps: k x E for all."""
    method = name.split("/")[0]
    if method in ("local_de", "global_de", "model1"):
        return 1
    if method == "starsse":
        return min(k, 2)
    if method == "sse":
        return k
    raise ValueError(f"no critical path for {name!r} (the guard's probes add a run-dependent share)")


def size_table(study: Study, target: str, names: list[str]) -> str:
    """Test accuracy / NLL / ECE of the ensemble of the first k members, k = 1..K (k x E optimizer epochs),
    and the member trainings on the critical path with parallel members."""
    K = study.size(target)
    lines = [
        "| run | " + " | ".join(f"k={k} acc / NLL / ECE" for k in range(1, K + 1))
        + f" | critical path to k={K} (x E) |",
        "|---" * (K + 2) + "|",
    ]  # fmt: skip
    for name in names:
        reps = study.replicates(target, name)
        if not reps:
            continue
        cells = []
        for k in range(1, K + 1):
            acc, nll, ece = (
                statistics.fmean(at_size(study, target, r, name, key, k) for r in reps)
                for key in ("accuracy", "nll", "ece")
            )
            cells.append(f"{acc * 100:.2f} / {nll:.3f} / {ece * 100:.1f}")
        try:
            cells.append(str(critical_path(name, K)))
        except ValueError:
            cells.append("2 + probes")
        lines.append(f"| {name} (n={len(reps)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shift_table(study: Study, target: str, names: list[str]) -> str:
    """Ensemble (all K members) accuracy / NLL / ECE on the corrupted test copy, mean over the corruptions, by
    severity; model 1 as the first row."""
    lines = ["| run | clean | " + " | ".join(f"severity {s}" for s in SEVERITIES) + " |", "|---" * 7 + "|"]
    for name in ["model1", *names]:
        reps = study.replicates(target, name)
        if not reps:
            continue
        what = "model1" if name == "model1" else "ensemble"
        cells = []
        for split_group in [["test"]] + [[f"shift/{c}/{s}" for c in CORRUPTIONS] for s in SEVERITIES]:
            vals = {
                key: statistics.fmean(
                    statistics.fmean(study.value(target, r, name, sp, what, key) for sp in split_group)
                    for r in reps
                )
                for key in ("accuracy", "nll", "ece")
            }
            cells.append(f"{vals['accuracy'] * 100:.1f} / {vals['nll']:.2f} / {vals['ece'] * 100:.1f}")
        lines.append(f"| {name} (n={len(reps)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def basin_table(study: Study, target: str, names: list[str]) -> str:
    """Held-out loss barrier model 1 -> member 2 and L2 distance model 1 -> members, per run."""
    lines = [
        "| run | n | loss barrier (nats) | error barrier (points) | distance to model 1 "
        "| soup − mean member acc |"
    ]
    lines.append("|---|---|---|---|---|---|")
    for name in names:
        reps = study.replicates(target, name)
        if not reps:
            continue
        recs = [study.record(target, r, name) for r in reps]
        loss = [r["metrics"]["basin"]["loss_barrier"] for r in recs]
        err = [r["metrics"]["basin"]["error_barrier"] for r in recs]
        dist = [statistics.fmean(r["metrics"]["basin"]["distance_to_model1"]) for r in recs]
        gap = [
            study.value(target, r, name, "test", "soup", "accuracy")
            - study.value(target, r, name, "test", "mean_member", "accuracy")
            for r in reps
        ]
        lines.append(
            f"| {name} | {len(reps)} | {_interval(loss, 1, 3)} | {_interval(err, 100, 2)} | "
            f"{_interval(dist, 1, 2)} | {_interval(gap, 100, 2)} |"
        )
    return "\n".join(lines)


def claims(study: Study, target: str, chosen: dict[str, dict[str, str]]) -> tuple[str, list[dict]]:
    """The claims table: each claim's paired test figure (K = 5), its n, selection metric and verdict."""
    rows: list[dict] = []

    def add(claim: str, a: str, b: str, what_a: str, what_b: str, key: str, selection: str, better=True):
        p = paired(study, target, a, b, what_a, what_b, key)
        rows.append(
            {
                "claim": claim,
                "contrast": f"{a} {what_a} − {b} {what_b}",
                "metric": key,
                "selection": selection,
                "figure": _fmt(p, key),
                "verdict": verdict(p, key, better),
                "n": p.get("n", 0),
            }
        )

    for by, label in SELECTIONS.items():
        star, sse = chosen.get("starsse", {}).get(by), chosen.get("sse", {}).get(by)
        if star:
            for key in ("accuracy", "nll"):
                add("(a) StarSSE's ensemble beats model 1", star, "model1", "ensemble", "model1", key, label)
        if star and sse:
            for key in ("accuracy", "nll"):
                add("(b) StarSSE beats SSE (ensembles)", star, sse, "ensemble", "ensemble", key, label)
        if star:
            for key in ("accuracy", "nll"):
                add(
                    "(c) StarSSE vs Local DE (ensembles)",
                    star,
                    "local_de",
                    "ensemble",
                    "ensemble",
                    key,
                    label,
                )
            for key in ("accuracy", "nll"):
                add(
                    "(c') StarSSE vs Global DE (ensembles)",
                    star,
                    "global_de",
                    "ensemble",
                    "ensemble",
                    key,
                    label,
                )
            for key in ("accuracy", "nll"):
                add("(e) StarSSE's soup beats model 1", star, "model1", "soup", "model1", key, label)
            add("(e') StarSSE's soup vs its ensemble", star, star, "soup", "ensemble", "accuracy", label)
    for m in sorted(set(study.mults(target, "starsse")) & set(study.mults(target, "sse"))):
        add("(b) StarSSE vs SSE at equal settings", f"starsse/x{m:g}", f"sse/x{m:g}", "ensemble", "ensemble",
            "accuracy", "none (equal settings)")  # fmt: skip
    for key in ("accuracy", "nll"):
        add("(a) Local DE's ensemble beats model 1", "local_de", "model1", "ensemble", "model1", key, "none")
        add(
            "(a) Global DE's ensemble beats model 1", "global_de", "model1", "ensemble", "model1", key, "none"
        )
    add("P2: Local DE's soup stays within its members (soup − mean member)", "local_de", "local_de", "soup",
        "mean_member", "accuracy", "none")  # fmt: skip
    for fixed in ("starsse/x1", "starsse/x2"):
        for what, key in (
            ("ensemble", "accuracy"),
            ("ensemble", "nll"),
            ("soup", "accuracy"),
            ("soup", "nll"),
        ):
            add(
                f"guard beats fixed {fixed.split('/x')[1]}x",
                "guard",
                fixed,
                what,
                what,
                key,
                "the guard's probes",
            )
    for mult in study.mults(target, "net"):
        net, fixed = f"net/x{mult:g}", f"starsse/x{mult:g}"
        for what, key in (
            ("ensemble", "accuracy"),
            ("ensemble", "nll"),
            ("soup", "accuracy"),
            ("soup", "nll"),
        ):
            add(f"safety net at {mult:g}x beats fixed {mult:g}x", net, fixed, what, what, key, "its probe(s)")
    lines = [
        "| claim | contrast (test, all K members) | metric | selection | paired difference (better/n) "
        "| verdict |"
    ]
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        cells = [r[c] for c in ("claim", "contrast", "metric", "selection", "figure", "verdict")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def size_figure(study: Study, target: str, names: list[str], out: Path) -> Path | None:
    import matplotlib

    from hf_ens.plots import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("accuracy", "nll", "ece")
    labels = {"accuracy": "test accuracy (%)", "nll": "test NLL", "ece": "test ECE (%)"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    drawn = False
    for name in names:
        reps = study.replicates(target, name)
        if not reps:
            continue
        ks = range(1, study.size(target) + 1)
        for ax, key in zip(axes, keys, strict=True):
            ys = [statistics.fmean(at_size(study, target, r, name, key, k) for r in reps) for k in ks]
            ax.plot(list(ks), [y * SCALE[key] for y in ys], marker="o", label=f"{name} (n={len(reps)})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, key in zip(axes, keys, strict=True):
        ax.set(xlabel="members k (total optimizer steps: k x E)", ylabel=labels[key])
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{target}: ensemble of the first k members (mean over replicates)")
    return save_figure(fig, out / f"ensemble_size_{target}.png")


def wall_clock_figure(study: Study, target: str, names: list[str], out: Path) -> Path | None:
    """Test accuracy and NLL against the member trainings on the critical path with parallel members (the wall
    clock with one device per branch, in units of one member's training E); the guard is left out."""
    import matplotlib

    from hf_ens.plots import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    drawn = False
    for name in names:
        reps = study.replicates(target, name)
        if not reps or name == "guard":
            continue
        ks = range(1, study.size(target) + 1)
        xs = [critical_path(name, k) for k in ks]
        for ax, key in zip(axes, ("accuracy", "nll"), strict=True):
            ys = [
                statistics.fmean(at_size(study, target, r, name, key, k) for r in reps) * SCALE[key]
                for k in ks
            ]
            # markers only: with parallel members several k arrive at the same time (a vertical column)
            jitter = 0.04 * (names.index(name) - len(names) / 2)
            ax.plot([x + jitter for x in xs], ys, "o", alpha=0.75, label=f"{name} (k = 1..{len(ys)})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, label in zip(axes, ("test accuracy (%)", "test NLL"), strict=True):
        ax.set(
            xlabel="critical path (member trainings E, one device per branch)",
            ylabel=label,
            xticks=[1, 2, 3, 4, 5],
        )
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{target}: one device per branch (total optimizer steps are k x E for every method)")
    return save_figure(fig, out / f"wall_clock_{target}.png")


def write_report(records: list[dict], out: str | Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = Study(records)
    parts = [
        "# The study's tables (generated by recipes/report_study.py from the raw records; do not edit)\n"
    ]
    summary: dict = {"replicates": {}, "chosen": {}, "claims": {}}
    for target in study.targets():
        reps = study.replicates(target, "model1")
        summary["replicates"][target] = len(reps)
        chosen = {m: {by: study.choose(target, m, by) for by in SELECTIONS} for m in GRID_METHODS}
        chosen = {m: {by: c for by, c in v.items() if c} for m, v in chosen.items()}
        summary["chosen"][target] = chosen
        table, rows = claims(study, target, chosen)
        summary["claims"][target] = [{k: v for k, v in r.items()} for r in rows]
        picks = sorted({c for v in chosen.values() for c in v.values()})
        compared = ["local_de", "global_de", "guard", *picks]
        parts += [
            f"## {target}: {len(reps)} replicates (pre-trained checkpoint x fine-tune seed)\n",
            "Cycle LRs chosen on held-out data: "
            + "; ".join(f"{m}: {by} → {c}" for m, v in chosen.items() for by, c in v.items())
            + "\n",
            "### Claims\n", table + "\n",
            "### Every run (test, all K members; mean ± 95% t interval over replicates)\n",
            method_table(study, target, chosen) + "\n",
            "### Ensemble size (test; the first k members; critical path: member trainings one after another "
            "with parallel members)\n", size_table(study, target, compared) + "\n",
            "### Shift (test images corrupted: mean over 5 corruptions; accuracy / NLL / ECE)\n",
            shift_table(study, target, compared) + "\n",
            "### Basin (held-out; model 1 -> member 2)\n",
            basin_table(study, target, ["local_de", "global_de", *[
                f"{m}/x{x:g}" for m in GRID_METHODS for x in study.mults(target, m)]]) + "\n",
        ]  # fmt: skip
        guards = [study.runs[target][r]["guard"]["mult"] for r in study.replicates(target, "guard")]
        if guards:
            counts = {f"{m:g}x": guards.count(m) for m in sorted(set(guards))}
            parts.append(f"The guard chose: {counts} (n={len(guards)}).\n")
            summary.setdefault("guard_choices", {})[target] = counts
        for mult in study.mults(target, "net"):
            name = f"net/x{mult:g}"
            chosen = [study.runs[target][r][name]["chosen_mult"] for r in study.replicates(target, name)]
            counts = {f"{m:g}x": chosen.count(m) for m in sorted(set(chosen))}
            parts.append(f"The safety net set at {mult:g}x used: {counts} (n={len(chosen)}).\n")
            summary.setdefault("net_choices", {}).setdefault(target, {})[f"{mult:g}x"] = counts
        figure = size_figure(study, target, ["model1", *compared], out)
        if figure is not None:
            parts.append(f"![ensemble size]({figure.name})\n")
        figure = wall_clock_figure(study, target, ["model1", *compared], out)
        if figure is not None:
            parts.append(f"![wall clock with parallel members]({figure.name})\n")
    (out / "tables.md").write_text("\n".join(parts))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="docs/results/study")
    parser.add_argument("--out", default=None, help="Where tables.md, summary.json and figures go.")
    args = parser.parse_args(argv)
    summary = write_report(load(args.results_dir), args.out or args.results_dir)
    print(json.dumps({k: summary[k] for k in ("replicates", "chosen")}, indent=2))


if __name__ == "__main__":
    main()
