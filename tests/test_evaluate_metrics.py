"""The packaged `evaluate` modules: they load offline from their folder, give hf_ens.metrics' numbers to 1e-6
(one implementation, two front doors), combine, and refuse bad input with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import evaluate
import numpy as np
import pytest
import torch
from transformers import EvalPrediction

import hf_ens
from hf_ens import metrics as M
from tests._recipe_utils import ROOT

RNG = np.random.default_rng(0)
MEMBER_LOGITS = (RNG.standard_normal((3, 40, 5)) * 2).astype(np.float32)  # [K, N, C]
LABELS = RNG.integers(0, 5, 40)


@pytest.fixture
def load(tmp_path):
    """`hf_ens.load_metric` with its arrow cache in the test's folder."""
    return lambda name: hf_ens.load_metric(name, cache_dir=str(tmp_path / "metrics"))


def test_calibration_module_matches_library_on_logits_and_probabilities(load):
    calibration = load("calibration")
    expected = M.classification_metrics(MEMBER_LOGITS[0], LABELS)
    got = calibration.compute(predictions=MEMBER_LOGITS[0], references=LABELS)
    assert set(got) == {"accuracy", "nll", "ece", "brier"}
    assert got == pytest.approx(expected, abs=1e-6)
    probs = torch.softmax(torch.from_numpy(MEMBER_LOGITS[0]).double(), -1).numpy()
    from_probs = calibration.compute(predictions=probs, references=LABELS, probabilities=True)
    assert from_probs == pytest.approx(expected, abs=1e-6)
    # batches added one at a time give the same numbers as one call
    for lo in range(0, 40, 16):
        calibration.add_batch(predictions=MEMBER_LOGITS[0][lo : lo + 16], references=LABELS[lo : lo + 16])
    assert calibration.compute() == pytest.approx(expected, abs=1e-6)


def test_calibration_of_member_logits_is_the_ensembles(load):
    """[N, K, C] member logits are scored as the ensemble (mean probability), as ensemble_metrics does."""
    expected = M.ensemble_metrics(MEMBER_LOGITS, LABELS)
    got = load("calibration").compute(predictions=MEMBER_LOGITS.transpose(1, 0, 2), references=LABELS)
    assert got == pytest.approx({k: expected[f"ensemble/{k}"] for k in got}, abs=1e-6)


def test_diversity_module_and_combine_match_ensemble_metrics(load):
    expected = M.ensemble_metrics(MEMBER_LOGITS, LABELS)
    per_sample = MEMBER_LOGITS.transpose(1, 0, 2)  # [N, K, C]
    diversity = load("ensemble_diversity").compute(predictions=per_sample)
    assert diversity == pytest.approx(
        {
            "disagreement": expected["diversity/disagreement"],
            "kl_to_ensemble": expected["diversity/kl_to_ensemble"],
        },
        abs=1e-6,
    )
    assert 0 < diversity["disagreement"] < 1 and diversity["kl_to_ensemble"] > 0
    combined = evaluate.combine([load("calibration"), load("ensemble_diversity")])
    got = combined.compute(predictions=per_sample, references=LABELS)
    want = {k.split("/")[1]: v for k, v in expected.items() if k.startswith(("ensemble/", "diversity/"))}
    assert got == pytest.approx(want, abs=1e-6)


def test_trainer_compute_metrics_agrees_with_the_module(load):
    """The Trainer's `compute_metrics` and the module are two doors to one implementation."""
    ens_logits = M.ensemble_log_probs(MEMBER_LOGITS).numpy()
    trainer_side = M.compute_metrics(EvalPrediction(predictions=ens_logits, label_ids=LABELS))
    assert trainer_side == pytest.approx(
        load("calibration").compute(predictions=ens_logits, references=LABELS), abs=1e-6
    )


def test_load_metric_refuses_unknown_names_and_bad_input(load):
    with pytest.raises(ValueError, match="Unknown hf-ens metric 'accuracy'.*calibration"):
        hf_ens.load_metric("accuracy")
    with pytest.raises(ValueError, match="sum to 1"):
        load("calibration").compute(predictions=MEMBER_LOGITS[0], references=LABELS, probabilities=True)
    with pytest.raises(ValueError, match="Labels must lie"):
        load("calibration").compute(predictions=MEMBER_LOGITS[0], references=LABELS + 5)
    with pytest.raises(ValueError, match="expected format"):  # [N, C] where [N, K, C] belongs
        load("ensemble_diversity").compute(predictions=[[1.0, 2.0]])
    assert sorted(hf_ens.EVALUATE_METRICS) == sorted(
        p.name for p in (ROOT / "hf_ens" / "evaluate_metrics").iterdir() if (p / f"{p.name}.py").is_file()
    )


def test_cards_document_the_conventions():
    for name in hf_ens.EVALUATE_METRICS:
        folder = ROOT / "hf_ens" / "evaluate_metrics" / name
        card = (folder / "README.md").read_text()
        assert card.startswith("---\n") and f"# Metric card: {name}" in card
    calibration = (ROOT / "hf_ens" / "evaluate_metrics" / "calibration" / "calibration.py").read_text()
    for text in (
        calibration,
        (ROOT / "hf_ens" / "evaluate_metrics" / "calibration" / "README.md").read_text(),
    ):
        assert "15 equal-width bins" in text and "maximum probability" in text
        assert "sum over classes" in text and "averaged over samples" in text


def test_modules_load_offline_with_no_network_and_an_empty_cache(tmp_path):
    """A fresh HF home, both offline switches, and every socket connection refused: loading still works."""
    script = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network access attempted")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        import hf_ens

        for name in hf_ens.EVALUATE_METRICS:
            module = hf_ens.load_metric(name, keep_in_memory=True)
            print(name, type(module).__name__)
        calibration = hf_ens.load_metric("calibration")
        print(calibration.compute(predictions=[[2.0, 0.0], [0.0, 1.0]], references=[0, 0]))
        """
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "calibration Calibration" in out.stdout and "ensemble_diversity EnsembleDiversity" in out.stdout
    assert "'accuracy': 0.5" in out.stdout
