"""hf-ens metrics as `evaluate` modules that ship inside the package and load offline.

Each module is a folder ``<name>/<name>.py`` (+ its card, ``README.md``): a thin `evaluate.Metric` wrapper
over `hf_ens.metrics`, so the numbers are the library's, computed once. ``evaluate.load(<folder>)`` reads a
local script and never touches the network; `load_metric` finds the folder for you::

    calibration = hf_ens.load_metric("calibration")
    calibration.compute(predictions=logits, references=labels)   # accuracy, nll, ece, brier
"""

from __future__ import annotations

from pathlib import Path

EVALUATE_METRICS = ("calibration", "ensemble_diversity")


def metric_path(name: str) -> Path:
    """The folder of the module `name` (one of `EVALUATE_METRICS`), for ``evaluate.load(str(path))``."""
    if name not in EVALUATE_METRICS:
        raise ValueError(f"Unknown hf-ens metric {name!r}; choose one of {list(EVALUATE_METRICS)}.")
    return Path(__file__).resolve().parent / name


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of the packaged module `name`, from its local folder (offline; `kwargs` go through,
    e.g. ``keep_in_memory=True`` or ``experiment_id`` for distributed evaluation)."""
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)
