"""Tables and figures for docs/results.md from compare_methods' runs (mean and 95% interval over seeds)."""

from __future__ import annotations

import statistics
from pathlib import Path

from hf_ens.plots import new_figure, plot_vs_ensemble_size, save_figure

METRICS = ("accuracy", "nll", "ece")


def _fmt(cell: tuple[float, float] | None, scale: float = 1.0) -> str:
    if cell is None:
        return "-"
    mean, half = cell
    return f"{mean * scale:.2f} ± {half * scale:.2f}" if half == half else f"{mean * scale:.2f}"


def _best_single(summary: dict, init: str) -> tuple[str, dict]:
    """The LR whose single model has the best held-out accuracy (never chosen on test)."""
    cands = {k: v for k, v in summary.items() if k.startswith(f"single/{init}/")}
    name = max(cands, key=lambda k: cands[k]["model1/held_out_accuracy"][0])
    return name, cands[name]


def premise_table(summary: dict) -> str:
    lines = [
        "| init | best LR (held-out) | train acc % | test acc % | test NLL | test ECE % |",
        "|---|---|---|---|---|---|",
    ]
    for init in ("pretrained", "scratch"):
        name, s = _best_single(summary, init)
        lines.append(
            f"| {init} | {name.split('lr=')[1]} | {_fmt(s.get('model1/train_accuracy'), 100)} | "
            f"{_fmt(s.get('ensemble/accuracy'), 100)} | {_fmt(s.get('ensemble/nll'))} | "
            f"{_fmt(s.get('ensemble/ece'), 100)} |"
        )
    return "\n".join(lines)


def methods_table(summary: dict) -> str:
    header = (
        "| run | model 1 train acc % | mean member acc % | ensemble acc % | soup acc % | greedy soup acc % |"
        " member NLL | ensemble NLL | member ECE % | ensemble ECE % | disagreement % | dist. to model 1 |"
        " midpoint acc % |"
    )
    lines = [header, "|" + "---|" * 13]
    names = [k for k in summary if not k.startswith("single/")]
    order = {"local_de": 0, "starsse": 1, "sse": 2}
    names.sort(key=lambda k: (order.get(k.split("/")[0], 9), float(k.split("/x")[1])))
    for name in names:
        s = summary[name]
        cols = [
            ("model1/train_accuracy", 100), ("member_mean/accuracy", 100), ("ensemble/accuracy", 100),
            ("soup/accuracy", 100),
            ("greedy_soup/accuracy", 100), ("member_mean/nll", 1), ("ensemble/nll", 1),
            ("member_mean/ece", 100), ("ensemble/ece", 100), ("diversity/disagreement", 100),
            ("basin/mean_distance_to_model1", 1), ("basin/midpoint_accuracy", 100),
        ]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(_fmt(s.get(key), scale) for key, scale in cols) + " |")
    return "\n".join(lines)


def _by_seed(records: list[dict], name: str) -> dict[int, dict]:
    prefix = "local_de" if name == "local_de/x1" else name  # Local DE runs have no cycle-LR multiplier
    return {r["seed"]: r["metrics"] for r in records if r["key"].startswith(prefix + "/seed=")}


def _paired(records: list[dict], a: str, b: str, metric_a: str, metric_b: str | None = None) -> tuple:
    """Mean and 95% interval over seeds of (a's metric_a - b's metric_b), run by run of the same seed."""
    from recipes.compare_methods import _ci95

    ra, rb = _by_seed(records, a), _by_seed(records, b)
    diffs = [ra[s][metric_a] - rb[s][metric_b or metric_a] for s in sorted(ra) if s in rb]
    wins = sum(d > 0 for d in diffs)
    return (*_ci95(diffs), wins, len(diffs)) if diffs else None


def paired_table(records: list[dict], summary: dict) -> str:
    """The comparisons the claims rest on, paired by seed (the same model 1 within a seed)."""
    best = _best_single(summary, "pretrained")[0]
    rows = [
        ("(b) ensemble - mean member", m, m, f"ensemble/{x}", f"member_mean/{x}", x)
        for m in ("local_de/x1", "starsse/x1", "sse/x1")
        for x in ("accuracy", "nll", "ece")
    ]
    rows += [
        ("(c) StarSSE - SSE", f"starsse/x{k}", f"sse/x{k}", f"ensemble/{x}", None, x)
        for k in (1, 4, 16)
        for x in ("accuracy", "nll")
    ]
    rows += [
        ("(c) Local DE - StarSSE", "local_de/x1", f"starsse/x{k}", f"ensemble/{x}", None, x)
        for k in (1, 4)
        for x in ("accuracy", "nll")
    ]
    rows += [
        ("(e) uniform soup - single model", m, best, "soup/accuracy", "ensemble/accuracy", "accuracy")
        for m in ("starsse/x1", "sse/x1", "local_de/x1", "starsse/x4", "sse/x4")
    ]
    rows += [("P2 Local DE soup - mean member", "local_de/x1", "local_de/x1", "soup/accuracy",
              "member_mean/accuracy", "accuracy")]  # fmt: skip
    lines = ["| claim | a | b | metric | a - b | a > b in |", "|---|---|---|---|---|---|"]
    for claim, a, b, ma, mb, name in rows:
        cell = _paired(records, a, b, ma, mb)
        if cell is None:
            continue
        mean, half, wins, n = cell
        scale = 100 if name in ("accuracy", "ece") else 1
        unit = " pts" if scale == 100 else ""
        diff = f"{mean * scale:+.2f} ± {half * scale:.2f}{unit}"
        lines.append(f"| {claim} | {a} | {b} | {name} | {diff} | {wins}/{n} seeds |")
    return "\n".join(lines)


def _curves(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    by_method: dict[str, list[list[float]]] = {}
    for rec in records:
        if rec["kind"] != "method" or rec["mult"] != 1.0:
            continue
        curve = rec["metrics"].get("ensemble_size_curve")
        if curve:
            by_method.setdefault(rec["method"], []).append(curve["accuracy"])
    return {
        m: (list(range(1, len(c[0]) + 1)), [statistics.fmean(x) for x in zip(*c, strict=True)])
        for m, c in by_method.items()
    }


def write_figures(records: list[dict], summary: dict, out: Path) -> list[str]:
    """accuracy_vs_k.png and cycle_lr_sweep.png, drawn with `hf_ens.plots` (pyplot-free, atomic writes)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    curves = _curves(records)
    if curves:
        sizes = next(iter(curves.values()))[0]
        by_method = {m: {"test accuracy %": [100 * a for a in acc]} for m, (_, acc) in curves.items()}
        plot_vs_ensemble_size(
            sizes, by_method, out / "accuracy_vs_k.png", title="Accuracy vs ensemble size (1x cycle LR)"
        )
        files.append("accuracy_vs_k.png")

    fig, axes = new_figure(ncols=2, height=3.5)
    curves = (("ensemble/accuracy", "-o", "ensemble"), ("soup/accuracy", "--s", "uniform soup"),
              ("basin/midpoint_accuracy", ":^", "midpoint model 1 / member 2"))  # fmt: skip
    for method, color in (("starsse", "tab:blue"), ("sse", "tab:orange")):
        names = sorted(
            (k for k in summary if k.startswith(f"{method}/x")), key=lambda k: float(k.split("/x")[1])
        )
        if not names:
            continue
        mults = [float(k.split("/x")[1]) for k in names]
        for key, style, label in curves:
            vals = [100 * summary[k][key][0] for k in names if key in summary[k]]
            if len(vals) == len(mults):
                axes[0].plot(mults, vals, style, color=color, label=f"{method} {label}")
        key = "basin/mean_distance_to_model1"
        dist = [summary[k][key][0] for k in names if key in summary[k]]
        if len(dist) == len(mults):
            axes[1].plot(mults, dist, "-o", color=color, label=method)
    singles = [k for k in summary if k.startswith("single/pretrained/")]
    if singles:
        _, best = _best_single(summary, "pretrained")
        axes[0].axhline(100 * best["ensemble/accuracy"][0], color="gray", lw=1, label="single model")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cycle LR / fine-tune LR")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test accuracy %")
    axes[1].set_ylabel("L2 distance to model 1")
    fig.suptitle("Cycle-LR sweep: leaving the pre-train basin")
    save_figure(fig, out / "cycle_lr_sweep.png")
    files.append("cycle_lr_sweep.png")
    return files


def write_report(records: list[dict], summary: dict, out: Path) -> None:
    """Write tables.md (the numbers docs/results.md quotes) and the figures beside it."""
    write_figures(records, summary, out)
    seeds = sorted({r["seed"] for r in records})
    text = [
        f"Seeds: {seeds} (mean ± 95% t-interval over seeds).",
        "",
        "## Premise P1: pre-trained vs scratch, single models, each with its best LR",
        premise_table(summary),
        "",
        "## Methods (K members each, equal training budget)",
        methods_table(summary),
        "",
        "## Paired differences (same seed, so the same model 1 and data; mean ± 95% t-interval)",
        paired_table(records, summary),
    ]
    (out / "tables.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
