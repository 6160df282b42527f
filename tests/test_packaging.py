"""One install name: the wheel holds the `hf_ens` package alone (`trainers/` ships as `hf_ens.trainers`), and
no source file reaches the project's other top-level folders by editing `sys.path` or importing `trainers`."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile

import pytest

from tests._recipe_utils import ROOT


def _sources() -> list:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / f for f in out.stdout.split()]


@pytest.mark.slow
def test_the_wheel_installs_hf_ens_alone_with_the_trainers_inside(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path,
            ROOT,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("hf_ens-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"hf_ens"}
    for expected in (
        "hf_ens/trainers/__init__.py",
        "hf_ens/trainers/starsse_trainer.py",
        "hf_ens/testing_utils.py",
        "hf_ens/model_cards/ensemble_card.md",
        "hf_ens/evaluate_metrics/calibration/calibration.py",
        "hf_ens/evaluate_metrics/calibration/README.md",
    ):
        assert expected in names, expected


def test_no_source_edits_sys_path_or_imports_the_top_level_trainers():
    edits, stray = [], []
    for path in _sources():
        text = path.read_text()
        if path.name == "test_packaging.py":
            continue
        if re.search(r"sys\.path\.(insert|append)\(", text):
            edits.append(path.relative_to(ROOT))
        if re.search(r"^\s*(from trainers[\s.]|import trainers\b)", text, re.M):
            stray.append(path.relative_to(ROOT))
    assert not edits, f"sys.path edited in {edits}"
    assert not stray, f"top-level `trainers` imported in {stray} (use hf_ens.trainers)"


def test_benchmarks_and_the_library_never_import_tests():
    for path in _sources():
        top = path.relative_to(ROOT).parts[0]
        if top in ("benchmarks", "hf_ens", "trainers", "recipes"):
            assert not re.search(r"^\s*(from|import) tests\b", path.read_text(), re.M), path
