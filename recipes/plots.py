"""PNG plots of the recipes: the learning-rate schedule, metrics vs ensemble size and the basin probe.

Built on `hf_ens.plots` (pyplot-free figures, atomic PNG files), so a recipe never touches pyplot's backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from hf_ens.plots import new_figure, save_figure


def _floats(name: str, values) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}.") from err
    return out


def plot_lr_schedule(
    steps: Sequence[float],
    lrs: Sequence[float],
    boundaries: Sequence[float] = (),
    path: str | os.PathLike = "lr_schedule.png",
    title: str | None = None,
) -> Path:
    """Learning rate vs optimizer step, with a dashed line where each ensemble member is saved.

    `boundaries` are the steps that end a member (model 1's fine-tuning, then each cycle), the point of the
    plot: it shows at a glance how high and how long each cycle goes compared with the fine-tuning run. They
    are labelled member_00, member_01, ... like the members' folders and the model card.
    """
    steps, lrs = _floats("steps", steps), _floats("lrs", lrs)
    if len(steps) != len(lrs) or not steps:
        raise ValueError(
            f"steps and lrs must be non-empty and of equal length, got {len(steps)} and {len(lrs)}."
        )
    fig, (ax,) = new_figure(width=6.0)
    ax.plot(steps, lrs, color="tab:blue", lw=1.5)
    for k, b in enumerate(_floats("boundaries", boundaries)):
        ax.axvline(b, color="gray", ls="--", lw=0.8)
        ax.annotate(
            f"member_{k:02d}", (b, max(lrs)), rotation=90, ha="right", va="top", fontsize=7, color="gray"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "Learning-rate schedule")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return save_figure(fig, path)


def _series(method: str, metric: str, values, n: int) -> tuple[list[float], list[float] | None]:
    if isinstance(values, Mapping):
        if "mean" not in values:
            raise ValueError(f"{method}/{metric}: a mapping needs a 'mean' list (and optionally 'ci').")
        mean = _floats(f"{method}/{metric} mean", values["mean"])
        ci = _floats(f"{method}/{metric} ci", values["ci"]) if values.get("ci") is not None else None
    else:
        mean, ci = _floats(f"{method}/{metric}", values), None
    if len(mean) != n or (ci is not None and len(ci) != n):
        raise ValueError(f"{method}/{metric} has {len(mean)} values but there are {n} ensemble sizes.")
    return mean, ci


def plot_vs_ensemble_size(
    sizes: Sequence[int],
    metrics_by_method: Mapping[str, Mapping[str, Sequence[float] | Mapping[str, Sequence[float]]]],
    path: str | os.PathLike = "ensemble_size.png",
    title: str | None = None,
) -> Path:
    """One panel per metric (e.g. accuracy, NLL), one line per method, vs the number of members K.

    `metrics_by_method` maps method -> metric -> values (one per size), or -> {"mean": [...], "ci": [...]} to
    draw a shaded interval (e.g. a 95% interval over seeds).
    """
    sizes = _floats("sizes", sizes)
    if not sizes or not metrics_by_method:
        raise ValueError("Need at least one ensemble size and one method to plot.")
    metric_names: list[str] = []
    for per_metric in metrics_by_method.values():
        metric_names += [m for m in per_metric if m not in metric_names]
    if not metric_names:
        raise ValueError("metrics_by_method holds no metrics.")
    fig, axes = new_figure(ncols=len(metric_names))
    for ax, metric in zip(axes, metric_names, strict=True):
        for method, per_metric in metrics_by_method.items():
            if metric not in per_metric:
                continue
            mean, ci = _series(method, metric, per_metric[metric], len(sizes))
            (line,) = ax.plot(sizes, mean, marker="o", ms=4, label=method)
            if ci is not None:
                lo = [m - c for m, c in zip(mean, ci, strict=True)]
                hi = [m + c for m, c in zip(mean, ci, strict=True)]
                ax.fill_between(sizes, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_xlabel("ensemble size K")
        ax.set_ylabel(metric)
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Metrics vs ensemble size")
    return save_figure(fig, path)


def plot_basin_probe(
    probe: Mapping, path: str | os.PathLike = "basin_probe.png", title: str | None = None
) -> Path:
    """Write `basin_probe_figure(probe, title)` as PNG to `path`."""
    return save_figure(basin_probe_figure(probe, title), path)


def basin_probe_figure(probe: Mapping, title: str | None = None):
    """The basin guard's probes (``cycle_learning_rate="auto"``) vs the cycle-LR multiplier, the chosen one
    marked: the loss barrier with its tolerance line (left; the decision), and the eval error with model 1's
    (right); the eval loss / model 1's, with its backstop ``probe_loss_ratio``, on the right panel's own axis.

    `probe` is the JSON-ready probe result the trainer stores (``trainer.basin_probe``, or ``basin_probe`` in
    an ensemble's metadata): ``table`` rows with ``multiplier``, ``loss_barrier``, ``eval_loss``,
    ``eval_error``, ``in_basin``, ``chosen``; ``model1`` with ``eval_loss`` / ``eval_error``;
    ``basin_tolerance`` (and ``probe_loss_ratio``, drawn when present).
    Diverged probes (no numbers) are marked at the top of each panel.
    """
    try:
        table, model1 = list(probe["table"]), probe["model1"]
        tolerance = float(probe["basin_tolerance"])
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"probe must be a basin probe result with 'table', 'model1' and more: {err}"
        ) from err
    if not table:
        raise ValueError("The basin probe table is empty.")
    from matplotlib.ticker import NullLocator

    loss1, error1 = float(model1["eval_loss"]), float(model1["eval_error"])
    fig, (left, right) = new_figure(ncols=2)
    rows = [r for r in table if not r.get("diverged")]
    x = [float(r["multiplier"]) for r in rows]
    left.plot(x, [float(r["loss_barrier"]) for r in rows], marker="o", ms=4, label="loss barrier (path)")
    left.axhline(tolerance * loss1, color="tab:red", ls="--", lw=1, label=f"tolerance ({tolerance:g} x L1)")
    left.set_ylabel("nats (eval cross-entropy)")
    right.plot(
        x, [100 * float(r["eval_error"]) for r in rows], marker="o", ms=4, color="tab:purple", label="probe"
    )
    right.axhline(100 * error1, color="gray", ls=":", lw=1, label="model 1")
    right.set_ylabel("probe eval error (%)")
    ratio_axis = right.twinx()
    ratio_axis.plot(
        x, [float(r["eval_loss"]) / loss1 for r in rows], marker="s", ms=3, color="tab:orange", alpha=0.7
    )
    if "probe_loss_ratio" in probe:
        ratio_axis.axhline(float(probe["probe_loss_ratio"]), color="tab:orange", ls="--", lw=1)
    ratio_axis.set_ylabel("probe eval loss / L1 (orange; dashed: backstop)", color="tab:orange", fontsize=7)
    for ax in (left, right):
        for r in table:
            m = float(r["multiplier"])
            if r.get("chosen"):
                ax.axvline(m, color="tab:green", lw=2, alpha=0.5, label=f"chosen: x{m:g}")
            if r.get("diverged"):
                ax.annotate(
                    "diverged",
                    (m, 1.0),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="top",
                    fontsize=7,
                    color="tab:red",
                )
        ax.set_xscale("log", base=2)
        ticks = sorted({float(r["multiplier"]) for r in table})
        ax.set_xticks(
            ticks, [f"x{m:g}" for m in ticks]
        )  # the grid's multipliers (x0.25 .. x16), not 2^-2 .. 2^4
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("cycle LR / fine-tuning LR")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Choosing the cycle LR: probes from model 1")
    return fig
