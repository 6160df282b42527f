"""The study behind the claims table (recipes/study.py, recipes/corruptions.py, recipes/report_study.py): the
corrupted test split, the second target's real digits, the task queue and a whole (tiny) study end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from recipes.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from recipes.study import StudyArguments, Task, all_tasks


@pytest.fixture(scope="module")
def digits():
    from recipes.image_datasets import load_mnist_digits

    return load_mnist_digits(train_size=1000, seed=0)


@pytest.fixture(scope="module")
def pixels(digits) -> torch.Tensor:
    images = np.stack([np.asarray(im) for im in digits["test"][:64]["image"]])
    return torch.from_numpy(images).unsqueeze(1).repeat(1, 3, 1, 1)  # uint8 [64, 3, 28, 28]


def test_digits_are_real_balanced_and_train_and_test_are_disjoint(digits):
    train, test = digits["train"], digits["test"]
    assert (len(train), len(test)) == (1000, 4000)
    assert np.bincount(train["label"]).tolist() == [100] * 10
    assert np.bincount(test["label"]).tolist() == [400] * 10
    assert train.features["label"].names == [str(d) for d in range(10)]
    first = np.asarray(train[0]["image"])
    assert first.shape == (28, 28) and first.dtype == np.uint8 and first.max() > 200  # real ink, not zeros
    seen = {np.asarray(im).tobytes() for im in train["image"]}
    assert not any(np.asarray(im).tobytes() in seen for im in test[:500]["image"])


def test_the_draw_depends_on_the_seed(digits):
    from recipes.image_datasets import load_mnist_digits

    other = load_mnist_digits(train_size=1000, seed=1)["train"]
    assert {np.asarray(im).tobytes() for im in other[:50]["image"]} != {
        np.asarray(im).tobytes() for im in digits["train"][:50]["image"]
    }


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_are_uint8_seeded_and_grow_with_severity(pixels, name):
    distances = []
    for sev in SEVERITIES:
        out = corrupt(pixels, name, sev, seed=0)
        assert out.dtype == torch.uint8 and out.shape == pixels.shape
        assert torch.equal(out, corrupt(pixels, name, sev, seed=0))  # the same images for every method
        distances.append((out.float() - pixels.float()).abs().mean().item())
    assert distances[0] > 0
    assert distances == sorted(distances), distances  # a higher severity moves the images further


def test_noise_differs_between_seeds_and_channels_stay_grey(pixels):
    a, b = corrupt(pixels, "gaussian_noise", 3, seed=0), corrupt(pixels, "gaussian_noise", 3, seed=1)
    assert not torch.equal(a, b)
    assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 0], a[:, 2])


def test_bad_corruption_input_is_refused(pixels):
    with pytest.raises(ValueError, match="Unknown corruption"):
        corrupt(pixels, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(pixels, "contrast", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(pixels.float(), "contrast", 1)


def test_queue_runs_every_replicate_of_an_entry_before_the_next():
    study = StudyArguments(
        targets=["fmnist", "digits"],
        pretrain_seeds=[0, 1],
        finetune_seeds=[0, 1],
        runs=["model1", "starsse/x2"],
    )
    tasks = all_tasks(study)
    assert len(tasks) == 2 * 2 * 2 * 2 and len({t.key for t in tasks}) == len(tasks)
    assert [t.method for t in tasks[:8]] == ["model1"] * 8
    assert tasks[8] == Task("fmnist", 0, 0, "starsse", 2.0) and tasks[8].key == "fmnist/c0/s0/starsse/x2"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": ["cifar"]}, "Unknown targets"),
        ({"runs": ["starsse"]}, "Unknown run"),
        ({"runs": ["model1", "local_de/x2"]}, "Unknown run"),
        ({"runs": ["model1", "net"]}, "Unknown run"),  # the safety net needs the LR it guards: net/xM
        ({"runs": ["starsse/x1", "model1"]}, "start with model1"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_study_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StudyArguments(**kwargs)


@pytest.mark.slow
def test_a_tiny_study_records_every_method_and_the_report_reads_them(tmp_path):
    """One checkpoint (the shipped one) twice over, 1-epoch members, K=2: every record holds member, ensemble,
    soup, shifted and basin metrics; the guard's member 2 is the fixed-LR run's at the LR it chose."""
    from recipes.report_study import load, write_report
    from recipes.study import main

    results = tmp_path / "results"
    ckpts = tmp_path / "ckpts"
    main(
        [
            "--config", "recipes/configs/study.yaml", "--results_dir", str(results),
            "--checkpoints_dir", str(ckpts), "--targets", "fmnist", "--pretrain_seeds", "0",
            "--finetune_seeds", "0", "--num_members", "2", "--shift_samples", "64",
            "--runs", "model1", "starsse/x1", "guard", "net/x1", "local_de", "sse/x1",
            "--num_train_epochs", "1", "--cycle_epochs", "1", "--workers", "1",
        ]
    )  # fmt: skip
    records = {r["key"]: r for r in load(results)}
    assert set(records) == {
        f"fmnist/c0/s0/{m}" for m in ("model1", "starsse/x1", "guard", "net/x1", "local_de", "sse/x1")
    }
    star = records["fmnist/c0/s0/starsse/x1"]
    assert star["steps_per_member"] == [16, 16] and star["checkpoint_id"].startswith("ckpt-seed0:")
    test = star["metrics"]["test"]
    assert set(test) >= {"members", "ensemble", "soup", "disagreement"}
    assert set(test["ensemble"]) == {"2"} and 0.2 < test["ensemble"]["2"]["accuracy"] <= 1.0
    assert len(star["metrics"]) == 2 + len(CORRUPTIONS) * len(SEVERITIES) + 1  # held_out, test, shift, basin
    assert star["metrics"]["basin"]["loss_barrier"] >= 0.0
    assert "basin" in records["fmnist/c0/s0/local_de"]["metrics"]  # P2: Local DE gets a barrier too
    assert records["fmnist/c0/s0/sse/x1"]["model1_max_abs_diff"] == 0.0  # SSE re-trains the same model 1
    guard = records["fmnist/c0/s0/guard"]
    assert guard["basin_probe"]["chosen_multiplier"] == guard["mult"]
    if guard["mult"] == 1.0:  # the probes put everything back: member 2 is the hand-set run's
        assert guard["metrics"]["test"]["members"][1] == star["metrics"]["test"]["members"][1]
    net = records["fmnist/c0/s0/net/x1"]  # the safety net set at 1x: its key keeps the set LR
    assert net["mult"] == 1.0 and net["basin_probe"]["mode"] == "guard"
    assert net["chosen_mult"] == net["basin_probe"]["chosen_multiplier"] <= 1.0
    if net["chosen_mult"] == 1.0:
        assert net["metrics"]["test"]["members"][1] == star["metrics"]["test"]["members"][1]
    # model 1's weights lost (a cleaned results dir): a re-run trains it again instead of failing
    shutil.rmtree(results / ".work" / "fmnist" / "c0" / "s0")
    main(
        [
            "--config", "recipes/configs/study.yaml", "--results_dir", str(results),
            "--checkpoints_dir", str(ckpts), "--targets", "fmnist", "--pretrain_seeds", "0",
            "--finetune_seeds", "0", "--num_members", "2", "--shift_samples", "64",
            "--runs", "model1", "starsse/x2", "--num_train_epochs", "1", "--cycle_epochs", "1",
            "--workers", "1",
        ]
    )  # fmt: skip
    again = {r["key"]: r for r in load(results)}
    assert again["fmnist/c0/s0/model1"]["metrics"] == records["fmnist/c0/s0/model1"]["metrics"]  # the same
    assert again["fmnist/c0/s0/starsse/x2"]["steps_per_member"] == [16, 16]
    out = tmp_path / "report"
    write_report(load(results), out)
    assert (out / "tables.md").read_text().count("|") > 10
    assert json.loads((out / "summary.json").read_text())["replicates"]["fmnist"] == 1


@pytest.mark.parametrize(
    ("diffs", "key", "expected"),
    [
        ([0.01, 0.02, 0.015, 0.012], "accuracy", "holds"),  # a is more accurate in every replicate
        ([-0.01, -0.02, -0.015, -0.012], "accuracy", "does not hold"),
        ([0.01, -0.02, 0.015, -0.012], "accuracy", "not shown"),
        ([-0.1, -0.2, -0.15, -0.12], "nll", "holds"),  # lower NLL is better
        ([0.1, 0.2, 0.15, 0.12], "nll", "does not hold"),
    ],
)
def test_verdicts_read_the_interval_on_the_claimed_side(diffs, key, expected):
    from recipes.report_results import mean_ci
    from recipes.report_study import verdict

    mean, half = mean_ci(diffs)
    assert verdict({"mean": mean, "half": half, "n": len(diffs)}, key) == expected


def test_the_guard_is_judged_on_the_fixed_run_of_the_lr_it_chose():
    """The guard's record holds member 2 only; its K members are the starsse/xM record of the chosen M."""
    from recipes.report_study import Study

    def rec(method, mult, acc):
        members = [{"accuracy": 0.5, "nll": 1.0, "ece": 0.1}] * 3
        metrics = {"test": {"members": members, "ensemble": {"3": {"accuracy": acc, "nll": 1.0, "ece": 0.1}}}}
        where = {"target": "t", "pretrain_seed": 0, "seed": 0}
        return {**where, "method": method, "mult": mult, "metrics": metrics}

    runs = [rec("model1", 0, 0.5), rec("starsse", 1, 0.61), rec("starsse", 2, 0.62), rec("guard", 2, 0)]
    study = Study(runs)
    assert study.value("t", (0, 0), "guard", "test", "ensemble", "accuracy") == 0.62
    assert study.replicates("t", "guard") == [(0, 0)]
    lone = Study([rec("model1", 0, 0.5), rec("guard", 4, 0)])  # chose an LR the grid did not run: no figure
    assert lone.replicates("t", "guard") == []


def test_the_critical_path_with_parallel_members_follows_each_methods_dependencies():
    """Member trainings one after another with one device per branch: Local / Global DE all at once, StarSSE's
    cycles after model 1, SSE's one after another; the guard's probes are not priced."""
    from recipes.report_study import critical_path

    assert [critical_path("local_de", k) for k in (1, 5)] == [1, 1]
    assert [critical_path("global_de", k) for k in (1, 5)] == [1, 1]
    assert [critical_path("starsse/x2", k) for k in (1, 2, 5)] == [1, 2, 2]
    assert [critical_path("sse/x4", k) for k in (1, 2, 5)] == [1, 2, 5]
    with pytest.raises(ValueError, match="probes"):
        critical_path("guard", 5)
