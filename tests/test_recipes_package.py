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

        def rec(method, seed, f=1.0, m=1.0, acc=0.8):
            curve = {{"size_curve/accuracy": [0.7, 0.75, 0.78], "size_curve/nll": [0.9, 0.8, 0.7]}}
            metrics = {{"ensemble/accuracy": acc, "ensemble/nll": 0.5, "soup/accuracy": acc - 0.01, **curve}}
            if method == "model1":
                metrics = {{"member_0/accuracy": 0.7, "member_0/nll": 0.6}}
            return {{"regime": "main", "method": method, "seed": seed, "cycle_factor": f, "mult": m,
                     "metrics": metrics}}

        records = [rec("model1", s) for s in (0, 1)] + [rec("local_de", s) for s in (0, 1)]
        records += [rec(me, s, 1.0, m) for me in ("starsse", "sse") for s in (0, 1) for m in (1.0, 4.0)]
        chosen = {{"starsse": "starsse/F=1E/x1", "sse": "sse/F=1E/x4"}}
        files = recipes.report_results.write_figures(records, chosen, [0, 1], Path({str(tmp_path)!r}))
        assert files == ["cycle_lr_sweep.png", "ensemble_size.png"], files
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
    """BatchNorm detection is one function, hf_ens.soups.has_batchnorm, which the probe uses too."""
    from hf_ens.trainers import probe

    from hf_ens import soups
    from hf_ens.testing_utils import tiny_resnet, tiny_vit

    assert soups.has_batchnorm(tiny_resnet(0)) and not soups.has_batchnorm(tiny_vit(0))
    assert probe.has_batchnorm is soups.has_batchnorm


def test_no_recipe_module_shadows_an_installed_package():
    """A recipe run as a script has recipes/ first on sys.path: a recipes/datasets.py would be what
    ``import datasets`` finds there, so no recipe module may share a name with an installed module."""
    import importlib.util
    import sysconfig

    installed = (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"])
    names = [p.stem for p in (ROOT / "recipes").glob("*.py") if p.stem != "__init__"]
    shadowing = []
    for name in names:
        spec = importlib.util.find_spec(name) if name not in sys.modules else sys.modules[name].__spec__
        origin = getattr(spec, "origin", None) or ""
        if spec is not None and (origin.startswith(installed) or origin in ("built-in", "frozen")):
            shadowing.append(name)
    assert "datasets" not in names and shadowing == []
