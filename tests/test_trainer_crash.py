"""Crash safety of StarSSETrainer (issue 14): overwrite starts clean, resume only continues the same run
from a complete checkpoint, a diverged run stops instead of writing NaN members, leftovers go, and real
SIGKILLs at random moments always resume to the uninterrupted run's members."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_ens.trainers.checkpoints import (
    CYCLE_STATE_NAME,
    checkpoint_problems,
    checkpoint_step,
    list_checkpoints,
)
from transformers import TrainerCallback

from hf_ens.checks import NonFiniteError, nonfinite_tensors
from hf_ens.testing_utils import one_torch_thread
from tests._trainer_utils import load_member, make_trainer, max_diff

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)

REPO = Path(__file__).resolve().parent.parent
SAVE = dict(save_strategy="steps", save_steps=2)


class StopWithError(TrainerCallback):
    """Stands in for a kill: raises at the start of a step (after the previous step's checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"stopped at step {self.step}")


def members_of(trainer) -> list[dict[str, torch.Tensor]]:
    return [load_member(p) for p in trainer.member_paths]


def hidden_entries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    """Members of an uninterrupted default run (3 members, 24 steps)."""
    trainer, _, _ = make_trainer(tmp_path_factory.mktemp("reference"), **SAVE)
    trainer.train()
    return members_of(trainer)


# ---------------------------------------------------------------------------------------- overwrite, resume
def test_overwrite_removes_the_previous_runs_members_and_checkpoints(tmp_path):
    first, _, _ = make_trainer(
        tmp_path, num_members=5, num_train_epochs=1, cycle_epochs=0.5, **{**SAVE, "save_steps": 6}
    )
    first.train()
    assert len(os.listdir(first.members_dir)) == 5 and len(list_checkpoints(tmp_path)) == 3
    (tmp_path / "notes.txt").write_text("mine")  # not the run's: stays
    second, _, _ = make_trainer(tmp_path, num_members=2, overwrite_output_dir=True)
    second.train()
    assert sorted(os.listdir(tmp_path / "members")) == ["member_00", "member_01"]
    assert sorted(os.listdir(tmp_path)) == ["members", "notes.txt"]


def test_resume_after_overwrite_uses_the_new_runs_checkpoint(tmp_path, reference):
    """Issue 14's scenario: run A finishes, run B (other LR) overwrites it and is stopped at step 10; resuming
    B continues B from its checkpoint-10, never from A's newer checkpoints."""
    run_a, _, _ = make_trainer(tmp_path, learning_rate=5e-3, **SAVE)
    run_a.train()
    assert list_checkpoints(tmp_path)[0].name == "checkpoint-24"
    run_b, _, _ = make_trainer(tmp_path, overwrite_output_dir=True, callbacks=[StopWithError(10)], **SAVE)
    with pytest.raises(RuntimeError, match="stopped at step 10"):
        run_b.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in (10, 8, 6, 4, 2)]
    assert not os.path.exists(run_b.members_dir) or os.listdir(run_b.members_dir) == []

    resumed, rec, _ = make_trainer(tmp_path, model_seed=5, **SAVE)
    resumed.train(resume_from_checkpoint=True)
    assert min(rec.lrs) == 10  # continued B at step 10
    for k, member in enumerate(members_of(resumed)):
        assert max_diff(member, reference[k]) <= 1e-6, k


def test_resume_refuses_a_checkpoint_of_another_run_naming_the_fields(tmp_path):
    run_a, _, _ = make_trainer(tmp_path, **SAVE)
    run_a.train()
    run_b, rec, _ = make_trainer(tmp_path, learning_rate=5e-3, seed=3, **SAVE)
    with pytest.raises(ValueError, match="Cannot resume") as err:
        run_b.train(resume_from_checkpoint=True)
    message = str(err.value)
    assert "learning_rate (checkpoint: 0.001, now: 0.005)" in message
    assert "seed (checkpoint: 0, now: 3)" in message and "num_members" not in message
    assert rec.lrs == {} and run_b.state.global_step == 0


# ---------------------------------------------------------------------------------- incomplete checkpoints
def _damaged_checkpoints(out: Path) -> dict[str, str]:
    """Copies of checkpoint-10 damaged as a kill (or a bad disk) leaves them; returns {name: damaged file}."""
    source = out / "checkpoint-10"
    damaged = {}

    def copy(step: int) -> Path:
        target = out / f"checkpoint-{step}"
        shutil.copytree(source, target)
        return target

    (copy(12) / "model.safetensors").unlink()
    damaged["checkpoint-12"] = "model.safetensors"
    (copy(14) / "trainer_state.json").write_bytes(b"")
    damaged["checkpoint-14"] = "trainer_state.json"
    path = copy(16) / "trainer_state.json"
    path.write_bytes(b"X" + path.read_bytes()[1:])  # same size, not JSON
    damaged["checkpoint-16"] = "trainer_state.json"
    path = copy(18) / "model.safetensors"
    path.write_bytes(b"\xff" * 16 + path.read_bytes()[16:])  # same size, header destroyed
    damaged["checkpoint-18"] = "model.safetensors"
    partial = out / "checkpoint-20"  # killed after the model files: no optimizer, no state, no marker
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, partial / name)
    damaged["checkpoint-20"] = CYCLE_STATE_NAME
    return damaged


def test_resume_true_skips_incomplete_checkpoints_with_a_warning(tmp_path, reference):
    run, rec, _ = make_trainer(tmp_path, **SAVE)
    rec.stop_at = 10
    run.train()
    damaged = _damaged_checkpoints(tmp_path)

    resumed, rec, _ = make_trainer(tmp_path, model_seed=5, **SAVE)
    with pytest.warns(UserWarning, match="Skipping incomplete checkpoint") as warned:
        resumed.train(resume_from_checkpoint=True)
    messages = [str(w.message) for w in warned if "incomplete" in str(w.message)]
    assert len(messages) == len(damaged)
    for name, file in damaged.items():
        assert any(f"{name}/{file}" in m for m in messages), name
    assert min(rec.lrs) == 10
    for k, member in enumerate(members_of(resumed)):
        assert max_diff(member, reference[k]) <= 1e-6, k
    # The damaged steps were saved again, complete, by the resumed run.
    assert all(checkpoint_problems(p) == [] for p in list_checkpoints(tmp_path))


def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    run, rec, _ = make_trainer(tmp_path, **SAVE)
    rec.stop_at = 10
    run.train()
    for name, file in _damaged_checkpoints(tmp_path).items():
        victim, rec, _ = make_trainer(tmp_path, **SAVE)
        with pytest.raises(ValueError, match=f"{name}/{file}"):
            victim.train(resume_from_checkpoint=str(tmp_path / name))
        assert rec.lrs == {}


def test_no_complete_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    trainer, _, _ = make_trainer(tmp_path, **SAVE)
    with (
        pytest.warns(UserWarning, match="checkpoint-4"),
        pytest.raises(ValueError, match="No complete checkpoint"),
    ):
        trainer.train(resume_from_checkpoint=True)


# --------------------------------------------------------------------------------------- leftovers, modes
def test_leftovers_of_a_killed_run_are_removed_and_members_get_plain_modes(tmp_path, reference):
    run, rec, _ = make_trainer(tmp_path, **SAVE)
    rec.stop_at = 14
    run.train()
    members = tmp_path / "members"
    planted = [
        members / ".member_01.tmp-k1ll3d",  # hf_ens._io's temp member
        members / ".member_01.a8x2",  # the older writer's temp member
        members / ".old_member_00.q9z/old",  # the older writer's replaced member
        members / ".member_00.old-k1ll",  # a replaced member, the new one in place
        tmp_path / ".starsse-trash-x1/checkpoint-2",  # a discard cut before its delete
    ]
    for path in planted:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"0" * 100)
    (tmp_path / ".write_test.abc").write_text("")
    assert len(hidden_entries(tmp_path)) >= 6

    resumed, _, _ = make_trainer(tmp_path, model_seed=5, **SAVE)
    resumed.train(resume_from_checkpoint=True)
    assert hidden_entries(tmp_path) == []
    for k, member in enumerate(members_of(resumed)):
        assert max_diff(member, reference[k]) <= 1e-6, k
    umask = os.umask(0)
    os.umask(umask)
    for path in resumed.member_paths:  # as a plain save_pretrained would leave them, not tempfile's 0700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o777 & ~umask


# ----------------------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("saves", [False, True], ids=["no-checkpoints", "checkpoint-every-2-steps"])
def test_a_diverging_run_stops_clearly_and_writes_no_nan_member(tmp_path, saves):
    """The loss is watched on the device and read at checkpoint, logging and member steps (no host sync per
    step): the run stops at the first of those after the divergence, naming the first non-finite step, and
    writes no NaN member and no NaN checkpoint."""
    trainer, rec, _ = make_trainer(tmp_path, cycle_learning_rate=1e6, **(SAVE if saves else {}))
    with pytest.raises(NonFiniteError, match=r"optimizer step \d+ \(cycle 2 of 3, member 01\)") as error:
        trainer.train()
    first = int(re.search(r"optimizer step (\d+)", str(error.value)).group(1))
    assert (
        12 < first <= trainer.state.global_step <= (first + 1 if saves else 18)
    )  # model 1 done, cycle 2 diverged
    assert sorted(os.listdir(trainer.members_dir)) == ["member_00"]
    assert nonfinite_tensors(load_member(trainer.member_paths[0])) == []
    checkpoints = list_checkpoints(tmp_path)
    assert bool(checkpoints) == saves
    for checkpoint in checkpoints:  # only steps before the first non-finite loss, all finite
        assert checkpoint_step(checkpoint) < first, checkpoint.name
        assert nonfinite_tensors(load_member(checkpoint)) == [], checkpoint.name


class PoisonAfterOptimizerStep(TrainerCallback):
    """NaN weights with a finite loss: poisoned after the optimizer step that ends member 0."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 11:
            with torch.no_grad():
                model.classifier.bias.fill_(float("nan"))


def test_a_non_finite_member_is_refused_before_it_is_written(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, callbacks=[PoisonAfterOptimizerStep()])
    with pytest.raises(NonFiniteError, match="member 00.*classifier.bias"):
        trainer.train()
    assert not os.path.exists(trainer.member_paths[0])


# ------------------------------------------------------------------------------------------- SIGKILL test
@pytest.mark.slow
def test_sigkill_at_random_moments_always_resumes_to_the_same_members(tmp_path):
    """>= 20 SIGKILLs of real training processes (random delays, and inside checkpoint / member writes and
    checkpoint rotation), each resumed with resume_from_checkpoint=True: members equal an uninterrupted run's,
    nothing is left behind. The runs are forked by tests/_trainer_crash_run.py."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_trainer_crash_run.py"), str(tmp_path), "14", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    attempts = report["attempts"]
    kills = sum(a["outcome"] == "killed" for a in attempts)
    resumes = sum(a["resume"] for a in attempts)
    points = {a["point"] for a in attempts if a["mode"] == "hook" and a["outcome"] == "killed"}
    assert kills >= 20 and resumes >= 20
    assert {"checkpoint_model", "trainer_state_half", "marker", "member_install"} & points

    reference = [
        load_member(str(Path(report["reference"]) / "members" / f"member_{k:02d}")) for k in range(3)
    ]
    worst = 0.0
    for chain in map(Path, report["chains"]):
        assert sorted(os.listdir(chain / "members")) == ["member_00", "member_01", "member_02"]
        for k in range(3):
            worst = max(
                worst, max_diff(load_member(str(chain / "members" / f"member_{k:02d}")), reference[k])
            )
        assert hidden_entries(chain) == [], chain
        assert all(checkpoint_problems(p) == [] for p in list_checkpoints(chain)), chain
    print(
        f"SIGKILL test: {kills} kills ({len(points)} named points), {resumes} resumes, "
        f"{len(report['chains'])} chains, max |member - reference| = {worst:.3g}, {report['seconds']:.1f} s"
    )
    assert worst <= 1e-6


def test_one_refusal_of_another_runs_checkpoint_and_one_earlier_run_policy(tmp_path):
    """`trainers.checkpoints` holds THE refusal (loop, branch, model 1 and probe file all call it) and THE
    answer to "does output_dir hold an earlier run" (the trainer's and the recipe's)."""
    from hf_ens.trainers.checkpoints import earlier_run, refuse_other_run

    refuse_other_run(tmp_path, {"seed": 1, "method": "sse"}, {"seed": 1, "method": "sse"})  # same: passes
    with pytest.raises(
        ValueError,
        match=r"Cannot resume from .*other settings: seed \(checkpoint: 1, now: 2\); method \(checkpoint: "
        r"'not recorded', now: 'sse'\) \(a hint\)\. Resume with the same settings",
    ):
        refuse_other_run(tmp_path, {"seed": 1}, {"seed": 2, "method": "sse"}, hint="a hint")
    assert earlier_run(tmp_path / "absent") == []
    for name in ("checkpoint-12", "checkpoint-6", "members", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    assert earlier_run(tmp_path) == ["checkpoint-6", "checkpoint-12", "members"]
    assert earlier_run(tmp_path, also=("metrics.json", "repo")) == [
        "checkpoint-6",
        "checkpoint-12",
        "members",
        "metrics.json",
    ]
