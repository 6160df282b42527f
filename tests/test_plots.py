"""PNG plots: files are written, are real images with drawn content, and bad input fails before drawing."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from hf_ens.basin import plot_profile
from recipes.plots import plot_lr_schedule, plot_vs_ensemble_size


def _check_png(path, min_width: int = 300) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = PIL.Image.open(path)
    assert image.width >= min_width and image.height >= 200
    pixels = np.asarray(image.convert("RGB"))
    # non-trivial: many colours (anti-aliased lines, text), and not mostly blank
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    assert (pixels < 250).any(axis=-1).mean() > 0.01
    return pixels


def test_lr_schedule_png(tmp_path):
    steps = list(range(0, 300))
    lrs = [3e-4 * (1 - (s % 100) / 100) for s in steps]
    path = plot_lr_schedule(steps, lrs, [100, 200, 300], tmp_path / "sub" / "lr.png")
    assert path == tmp_path / "sub" / "lr.png"
    _check_png(path)
    assert not list((tmp_path / "sub").glob(".*"))  # no temporary file left behind


def test_vs_ensemble_size_png_with_and_without_intervals(tmp_path):
    sizes = [1, 2, 3, 4, 5]
    by_method = {
        "starsse": {"accuracy": [0.90, 0.91, 0.915, 0.918, 0.92], "nll": [0.30, 0.27, 0.26, 0.255, 0.25]},
        "sse": {
            "accuracy": {"mean": [0.90, 0.905, 0.91, 0.912, 0.913], "ci": [0.01] * 5},
            "nll": [0.30, 0.29, 0.28, 0.275, 0.27],
        },
    }
    one = _check_png(plot_vs_ensemble_size(sizes, by_method, tmp_path / "k.png"))
    single = _check_png(
        plot_vs_ensemble_size(sizes, {"starsse": {"accuracy": [0.9] * 5}}, tmp_path / "s.png")
    )
    assert one.shape[1] > single.shape[1]  # one panel per metric


def test_profile_png(tmp_path):
    profile = {"alphas": [0, 0.5, 1], "loss": [0.3, 0.9, 0.35], "error": [0.1, 0.3, 0.12]}
    _check_png(plot_profile(profile, tmp_path / "profile.png"))
    _check_png(plot_profile({"alphas": [0, 1], "error": [0.1, 0.1]}, tmp_path / "error_only.png"))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: plot_lr_schedule([0, 1], [1e-3], [], p), "equal length"),
        (lambda p: plot_lr_schedule([0, "x"], [1e-3, 1e-3], [], p), "sequence of numbers"),
        (lambda p: plot_vs_ensemble_size([1, 2], {"m": {"accuracy": [0.9]}}, p), "2 ensemble sizes"),
        (lambda p: plot_vs_ensemble_size([1, 2], {}, p), "one method"),
        (lambda p: plot_vs_ensemble_size([1], {"m": {"acc": {"ci": [1]}}}, p), "'mean'"),
        (lambda p: plot_profile({"alphas": [0, 1], "loss": [0.1]}, p), "1 values for 2 alphas"),
        (lambda p: plot_profile({"loss": [0.1]}, p), "'alphas'"),
    ],
)
def test_bad_input_fails_before_writing(tmp_path, call, match):
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match=match):
        call(path)
    assert not path.exists()


def test_png_gets_umask_modes_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import os
    import stat

    from matplotlib.figure import Figure

    old_umask = os.umask(0o022)
    try:
        path = plot_lr_schedule([0, 1, 2], [1e-3, 5e-4, 0.0], [2], tmp_path / "lr.png")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(old_umask)
    before = path.read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="disk full"):
        plot_lr_schedule([0, 1], [1e-3, 0.0], [], path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.png"]


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def test_lr_schedule_names_members_as_their_folders(monkeypatch, tmp_path):
    import recipes.plots

    figures = []
    monkeypatch.setattr(recipes.plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    plot_lr_schedule([0, 1, 2, 3], [1e-3, 5e-4, 1e-3, 0.0], [1, 2, 3], tmp_path / "lr.png")
    texts = _texts(figures[0])
    assert {"member_00", "member_01", "member_02"} <= set(texts) and "member 1" not in texts


def test_basin_probe_plot_has_a_legend_for_every_line_and_multiplier_ticks():
    from recipes.plots import basin_probe_figure

    probe = {
        "table": [
            {
                "multiplier": m,
                "loss_barrier": b,
                "eval_loss": 0.6 + b,
                "eval_error": 0.2 + b,
                "chosen": m == 1,
            }
            for m, b in ((0.5, 0.01), (1.0, 0.02), (2.0, 0.3))
        ]
        + [{"multiplier": 4.0, "diverged": True}],
        "model1": {"eval_loss": 0.5, "eval_error": 0.18},
        "basin_tolerance": 0.1,
        "probe_loss_ratio": 2.0,
    }
    fig = basin_probe_figure(probe)
    left, right = fig.axes[:2]
    for ax in (left, right):  # the multipliers, not 2^-1 .. 2^2
        assert [t.get_text() for t in ax.get_xticklabels()] == ["x0.5", "x1", "x2", "x4"]
    legend = [t.get_text() for t in right.get_legend().get_texts()]
    assert "probe" in legend and "model 1" in legend and "chosen: x1" in legend
    assert len(right.get_legend().get_texts()) == len(
        [line for line in right.get_lines() if line.get_label()[0] != "_"]
    )
