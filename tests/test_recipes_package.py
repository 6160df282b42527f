"""The recipes are a package that imports without sys.path edits, still run as scripts, and draw their report
figures with hf_ens.plots (never pyplot)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests._recipe_utils import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_recipes_import_as_a_package_without_touching_sys_path_and_report_without_pyplot(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path

        before = list(sys.path)
        import recipes.compare_methods, recipes.report_results, recipes.vit_cifar
        assert sys.path == before, sorted(set(sys.path) - set(before))

        curve = {{"sizes": [1, 2, 3], "accuracy": [0.7, 0.75, 0.78], "nll": [0.9, 0.8, 0.7]}}
        records = [
            {{"kind": "method", "mult": 1.0, "method": m, "seed": 0, "key": m + "/x1/seed=0",
              "metrics": {{"ensemble_size_curve": curve}}}}
            for m in ("starsse", "sse")
        ]
        cell = lambda v: (v, 0.01)
        summary = {{
            f"{{m}}/x{{k}}": {{"ensemble/accuracy": cell(0.8), "soup/accuracy": cell(0.79),
                             "basin/midpoint_accuracy": cell(0.78), "basin/mean_distance_to_model1": cell(k)}}
            for m in ("starsse", "sse") for k in (1, 4)
        }}
        single = {{"model1/held_out_accuracy": cell(0.7), "ensemble/accuracy": cell(0.7)}}
        summary["single/pretrained/lr=0.001"] = single
        files = recipes.report_results.write_figures(records, summary, Path({str(tmp_path)!r}))
        assert files == ["accuracy_vs_k.png", "cycle_lr_sweep.png"], files
        for name in files:
            assert (Path({str(tmp_path)!r}) / name).read_bytes()[:4] == b"\\x89PNG"
        assert "matplotlib.pyplot" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=ENV, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_vit_cifar_still_runs_as_a_script():
    out = subprocess.run(
        [sys.executable, "recipes/vit_cifar.py", "--help"], env=ENV, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--model_name_or_path" in out.stdout and "--method" in out.stdout


def test_one_has_batchnorm():
    """BatchNorm detection lives in hf_ens.soups only; the library and recipes reuse it."""
    hits = [
        path.relative_to(ROOT)
        for folder in ("hf_ens", "recipes", "trainers")
        for path in (ROOT / folder).rglob("*.py")
        if "isinstance(m, _BatchNorm)" in path.read_text() or "batchnorm._BatchNorm" in path.read_text()
    ]
    assert [str(p) for p in hits] == ["hf_ens/soups.py"], hits
