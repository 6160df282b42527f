"""cycle_learning_rate="auto" (issue 9): probes after model 1 choose the largest cycle LR that stays in the
pre-train basin; the choice is deterministic, leaves no trace on the cycles that follow, survives a crash
during or after probing, and is refused where it cannot work."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hf_ens.trainers import StarSSEConfig, StarSSETrainer
from hf_ens.trainers.probe import PROBE_FILE, choose, in_basin, next_probes, probe_steps
from transformers import HfArgumentParser

from hf_ens import EnsembleModel
from hf_ens.testing_utils import TinyImages, one_torch_thread
from recipes.plots import plot_basin_probe
from tests._trainer_utils import LR, RecordingCollator, load_member, max_diff, starsse_config, tiny_vit

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)

# 48 samples / batch 4 = 12 steps per epoch: model 1 = 24 steps, cycles of 24, probes of 6 (1/4 of a cycle)
AUTO = dict(
    cycle_learning_rate="auto",
    cycle_lr_grid=[0.5, 2.0, 100.0],
    num_train_epochs=2,
    cycle_epochs=2,
    num_members=3,
    learning_rate=2e-3,
)
MODEL1_STEPS, CYCLE_STEPS, PROBE_STEPS = 24, 24, 6


class Learnable(TinyImages):
    """TinyImages whose label is the brightest colour channel: a task model 1 learns in a few steps."""

    def __init__(self, n: int, seed: int):
        super().__init__(n, seed)
        self.y = self.x.mean(dim=(2, 3)).argmax(-1)


class FailingCollator(RecordingCollator):
    """Raises at its n-th call: a crash at a chosen moment (here: inside the probes)."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, features):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError(f"crash at collator call {self.calls}")
        return super().__call__(features)


def auto_trainer(out, eval_dataset=True, collator=None, model_seed=0, **overrides) -> StarSSETrainer:
    return StarSSETrainer(
        model=tiny_vit(model_seed),
        args=starsse_config(out, **{**AUTO, **overrides}),
        train_dataset=Learnable(48, 0),
        eval_dataset=Learnable(48, 1) if eval_dataset is True else eval_dataset,
        data_collator=collator or RecordingCollator(),
    )


def table_numbers(probe: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in probe["table"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted auto run (checkpoints every 6 steps): its probe result and members."""
    trainer = auto_trainer(tmp_path_factory.mktemp("reference"), save_strategy="steps", save_steps=6)
    trainer.train()
    return trainer.basin_probe, [load_member(p) for p in trainer.member_paths], trainer


def test_a_grid_that_leaves_the_basin_is_cut_there_and_the_cycles_use_the_choice(reference):
    probe, members, trainer = reference
    rows = {row["multiplier"]: row for row in probe["table"]}
    # bisection: the middle candidate first, then the bracket above it; x0.5 is never needed
    assert [row["multiplier"] for row in probe["table"]] == [2.0, 100.0] and probe["probe_search"] == "bisect"
    assert rows[2.0]["in_basin"]
    assert not rows[100.0]["in_basin"]  # x100 visibly leaves: a large barrier or loss jump, or divergence
    assert rows[100.0]["diverged"] or rows[100.0]["eval_loss"] > 1.5 * probe["model1"]["eval_loss"]
    assert probe["chosen_multiplier"] == 2.0 and rows[2.0]["chosen"] and not rows[100.0]["chosen"]
    assert probe["cycle_learning_rate"] == pytest.approx(2.0 * 2e-3)
    assert probe["probe_steps"] == PROBE_STEPS and all(r["steps"] == PROBE_STEPS for r in probe["table"])

    # cycles 2..K restart at the chosen LR; model 1's schedule is untouched
    steps, lrs, ends = trainer.lr_schedule()
    assert ends == [24, 48, 72]
    assert lrs[MODEL1_STEPS] == pytest.approx(4e-3) and lrs[MODEL1_STEPS + CYCLE_STEPS] == pytest.approx(4e-3)
    meta = trainer.ensemble_metadata()
    assert meta["cycle_learning_rate"] == pytest.approx(4e-3) and meta["cycle_learning_rate_mode"] == "auto"
    assert meta["basin_probe"]["table"] == probe["table"]
    saved = json.loads((Path(trainer.args.output_dir) / PROBE_FILE).read_text())
    assert saved["chosen_multiplier"] == 2.0 and saved["run"]["cycle_learning_rate"] == "auto"
    assert any(entry.get("basin_probe/chosen_multiplier") == 2.0 for entry in trainer.state.log_history)


def test_probes_leave_no_trace_the_run_equals_a_fixed_run_at_the_chosen_lr(tmp_path, reference):
    """Weights, optimizer and RNGs are restored after probing: same members as cycle_learning_rate=chosen."""
    probe, members, _ = reference
    fixed = auto_trainer(tmp_path, eval_dataset=None, cycle_learning_rate=probe["cycle_learning_rate"])
    fixed.train()
    for k, path in enumerate(fixed.member_paths):
        assert max_diff(load_member(path), members[k]) <= 1e-6, k


def test_the_probe_table_is_deterministic_for_a_seed(tmp_path, reference):
    probe, _, _ = reference
    again = auto_trainer(tmp_path / "again", num_members=2)
    again.train()
    assert table_numbers(again.basin_probe) == table_numbers(probe)
    other = auto_trainer(tmp_path / "other", num_members=2, seed=1)
    other.train()
    assert table_numbers(other.basin_probe) != table_numbers(probe)


def test_resume_after_a_crash_inside_the_probes_gives_the_same_choice_and_members(tmp_path, reference):
    probe, members, _ = reference
    # collator calls: 24 for model 1, then the probes' batches; crash in the middle of the second probe
    crashed = auto_trainer(
        tmp_path,
        collator=FailingCollator(fail_at=MODEL1_STEPS + PROBE_STEPS + 3),
        save_strategy="steps",
        save_steps=6,
    )
    with pytest.raises(RuntimeError, match="crash at collator call"):
        crashed.train()
    assert crashed.basin_probe is None and os.path.isdir(crashed.member_paths[0])
    assert not os.path.exists(tmp_path / PROBE_FILE)
    resumed = auto_trainer(tmp_path, model_seed=123, save_strategy="steps", save_steps=6)
    resumed.train(resume_from_checkpoint=True)  # checkpoint-18: model 1 not finished when it was saved
    assert table_numbers(resumed.basin_probe) == table_numbers(probe)
    for k, path in enumerate(resumed.member_paths):
        assert max_diff(load_member(path), members[k]) <= 1e-6, k


def test_resume_after_probing_reuses_the_stored_choice(tmp_path, reference):
    """checkpoint-24 is saved after the probes: it carries the result, and resuming does not probe again."""
    probe, members, trainer = reference
    out = tmp_path / "run"
    shutil.copytree(trainer.args.output_dir, out)
    shutil.rmtree(out / "members" / "member_02")
    state = json.loads((out / "checkpoint-24" / "starsse_state.json").read_text())
    assert state["basin_probe"]["chosen_multiplier"] == probe["chosen_multiplier"]
    collator = FailingCollator()
    resumed = auto_trainer(out, model_seed=123, collator=collator, save_strategy="steps", save_steps=6)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-24"))
    assert collator.calls == 2 * CYCLE_STEPS  # the two cycles, no probe batch
    assert table_numbers(resumed.basin_probe) == table_numbers(probe)
    for k, path in enumerate(resumed.member_paths):
        assert max_diff(load_member(path), members[k]) <= 1e-6, k


def test_parallel_members_probes_before_the_branches_and_a_relaunch_reuses_them(tmp_path, reference):
    """One process with parallel_members=True: model 1 in the loop, the probes at the start of the branch
    phase (the same table as the sequential run), then the branches; a relaunch after the probes reads the
    choice back from basin_probe.json and trains the missing member only, to the same weights."""
    probe, members, _ = reference
    run = auto_trainer(tmp_path, parallel_members=True)
    run.train()
    assert table_numbers(run.basin_probe) == table_numbers(probe)
    assert max_diff(load_member(run.member_paths[0]), members[0]) <= 1e-6  # model 1: the same loop
    last = load_member(run.member_paths[2])
    shutil.rmtree(tmp_path / "members" / "member_02")
    collator = FailingCollator()
    again = auto_trainer(tmp_path, parallel_members=True, collator=collator)
    again.train(resume_from_checkpoint=True)
    assert collator.calls == CYCLE_STEPS  # the missing branch, no probe
    assert table_numbers(again.basin_probe) == table_numbers(probe)
    assert max_diff(load_member(again.member_paths[2]), last) <= 1e-6


def test_the_ensemble_repo_and_card_carry_the_choice(tmp_path, reference):
    probe, _, trainer = reference
    ens = trainer.ensemble()
    ens.save_pretrained(tmp_path / "repo")
    config = json.loads((tmp_path / "repo" / "ensemble_config.json").read_text())
    assert config["metadata"]["cycle_learning_rate"] == pytest.approx(4e-3)
    assert config["metadata"]["cycle_learning_rate_mode"] == "auto"
    assert config["metadata"]["basin_probe"]["chosen_multiplier"] == 2.0
    card = (tmp_path / "repo" / "README.md").read_text()
    assert "Cycle learning rate, chosen automatically" in card and "**chosen**" in card
    assert (
        EnsembleModel.from_pretrained(tmp_path / "repo").metadata["basin_probe"]
        == config["metadata"]["basin_probe"]
    )
    path = plot_basin_probe(probe, tmp_path / "basin_probe.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batchnorm_models_are_probed_with_recomputed_statistics(tmp_path):
    from hf_ens.testing_utils import tiny_resnet

    trainer = StarSSETrainer(
        model=tiny_resnet(0, num_labels=3).train(),
        args=starsse_config(tmp_path, **{**AUTO, "num_members": 2, "cycle_lr_grid": [0.5, 2.0]}),
        train_dataset=Learnable(48, 0),
        eval_dataset=Learnable(48, 1),
        data_collator=RecordingCollator(),
    )
    trainer.train()
    rows = trainer.basin_probe["table"]
    assert len(rows) >= 1 and all(row["loss_barrier"] is not None for row in rows)


def test_lora_members_are_probed_on_their_merged_weights_and_leave_no_trace(tmp_path):
    """LoRA members (issue 23): the probes judge the basin on the merged weights (W0 + scale B A and the
    head), so model 1's probe loss is that of member 0 merged by peft itself; the probes restore the adapter,
    optimizer and RNGs, so the run equals one at the chosen LR set by hand."""
    from peft import PeftModel

    from hf_ens.evaluation import evaluate_loss_error
    from hf_ens.testing_utils import tiny_lora_vit

    def run(out, **overrides):
        trainer = StarSSETrainer(
            model=tiny_lora_vit(0).train(),
            args=starsse_config(out, **{**AUTO, "num_members": 2, "learning_rate": 2e-2, **overrides}),
            train_dataset=Learnable(48, 0),
            eval_dataset=Learnable(48, 1),
            data_collator=RecordingCollator(),
        )
        trainer.train()
        return trainer

    auto = run(tmp_path / "auto")
    probe = auto.basin_probe
    # bisection as for full members: x2 stays, x100 visibly leaves (measured: loss 17.9 vs model 1's 1.07)
    assert [row["multiplier"] for row in probe["table"]] == [2.0, 100.0]
    assert probe["chosen_multiplier"] == 2.0 and not probe["table"][1]["in_basin"]
    assert (
        json.loads((tmp_path / "auto" / PROBE_FILE).read_text())["chosen_multiplier"]
        == probe["chosen_multiplier"]
    )
    model1 = PeftModel.from_pretrained(tiny_vit(0), auto.member_paths[0]).merge_and_unload()
    loader = torch.utils.data.DataLoader(Learnable(48, 1), batch_size=48, collate_fn=RecordingCollator())
    expected = evaluate_loss_error(model1, loader)
    assert probe["model1"]["eval_loss"] == pytest.approx(expected["loss"], abs=1e-5)
    for row in probe["table"]:
        if not row["diverged"]:
            assert len(row["path_loss"]) == 5 and row["path_loss"][0] == probe["model1"]["eval_loss"]
            assert row["loss_barrier"] >= 0.0 and row["eval_loss"] == row["path_loss"][-1]
    assert auto.ensemble_metadata()["cycle_learning_rate_mode"] == "auto"

    fixed = run(tmp_path / "fixed", cycle_learning_rate=probe["cycle_learning_rate"])
    for k, (a, b) in enumerate(zip(auto.member_paths, fixed.member_paths, strict=True)):
        got, ref = (safetensors.torch.load_file(os.path.join(p, "adapter_model.safetensors")) for p in (a, b))
        assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in got), k


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(method="local_de"), "local_de"),
        (dict(cycle_lr_grid=[2.0]), "one point|1 point"),
        (dict(cycle_lr_grid=[]), "0 point"),
        (dict(cycle_lr_grid=[1.0, 1.0]), "repeats"),
        (dict(cycle_lr_grid=[1.0, -2.0]), "cycle_lr_grid"),
        (dict(num_members=1), "num_members=1"),
        (dict(fp16=True), "fp16"),
        (dict(probe_fraction=0.5), "probe_fraction"),
        (dict(probe_fraction=0.0), "probe_fraction"),
        (dict(basin_tolerance=-0.1), "basin_tolerance"),
        (dict(cycle_learning_rate="fast"), "'auto'"),
    ],
)
def test_bad_auto_settings_are_refused_by_the_config(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        starsse_config(tmp_path, **{**AUTO, **overrides})


def test_auto_without_an_eval_dataset_is_refused_before_training(tmp_path):
    trainer = auto_trainer(tmp_path, eval_dataset=None, save_strategy="steps", save_steps=1)
    with pytest.raises(ValueError, match="eval_dataset"):
        trainer.train()
    assert os.listdir(tmp_path) == [] and trainer.state.global_step == 0


def test_a_cycle_too_short_to_probe_is_refused_before_training(tmp_path):
    trainer = auto_trainer(tmp_path, cycle_epochs=0.25)  # 3 steps: no room for 3 probes of <= 1/4 cycle
    with pytest.raises(ValueError, match="too short"):
        trainer.train()
    assert not os.path.exists(trainer.member_paths[0])


def test_probe_sizing_and_choice_rule():
    args = starsse_config("unused", **AUTO)
    assert probe_steps(args, 24) == 6  # 1/4 of the cycle
    args.cycle_lr_grid = [0.25, 0.5, 1, 2, 4, 8, 16]
    assert probe_steps(args, 70) == 10  # 7 probes share one cycle: 1/7 each
    rows = [{"multiplier": m, "in_basin": ok} for m, ok in ((1, True), (2, True), (4, False), (8, True))]
    assert choose(rows)[0] == 1  # cut at the first failure, never stepped over
    assert choose(rows[2:])[0] == 0  # even the smallest failed: the smallest


def _outcomes(*in_basin: bool) -> dict[int, dict]:
    return {i: {"in_basin": ok} for i, ok in enumerate(in_basin)}


def _search(outcome, n: int, world: int, search: str) -> tuple[list[list[int]], int]:
    """Rounds of probes and the chosen index for a grid whose candidate i stays iff outcome(i)."""
    probed, rounds = {}, []
    while todo := next_probes(probed, n, world, search):
        rounds.append(todo)
        probed.update({i: {"in_basin": outcome(i)} for i in todo})
    table = [{"multiplier": i, **probed[i]} for i in sorted(probed)]
    return rounds, table[choose(table)[0]]["multiplier"]


def test_bisection_finds_the_linear_choice_in_fewer_probes_on_monotone_grids():
    for n in (2, 3, 7, 10):
        for edge in range(-1, n):  # candidates 0..edge stay, the rest leave
            stays = lambda i, edge=edge: i <= edge  # noqa: E731
            _, linear = _search(stays, n, 1, "linear")
            for world in (1, 2, 3):
                rounds, choice = _search(stays, n, world, "bisect")
                assert choice == linear == max(edge, 0), (n, edge, world)
                assert all(len(r) <= world for r in rounds)
            assert len(_search(stays, n, 1, "bisect")[0]) <= math.ceil(math.log2(n + 1))
        # worst cases: every candidate probed in order, vs log2
        assert len(_search(lambda i: True, n, 1, "linear")[0]) == n
    # the default grid with 2x staying and 4x leaving (the offline task): 3 probes instead of 5
    assert _search(lambda i: i <= 3, 7, 1, "bisect")[0] == [[3], [5], [4]]
    assert _search(lambda i: i <= 3, 7, 1, "linear")[0] == [[0], [1], [2], [3], [4]]


def test_linear_search_never_steps_over_a_failure_bisection_may():
    holes = lambda i: i != 1  # noqa: E731  (a non-monotone grid: x index 1 leaves, the rest stay)
    assert _search(holes, 7, 1, "linear")[1] == 0
    assert _search(holes, 7, 1, "bisect")[1] == 6  # documented: bisection assumes monotone outcomes
    assert next_probes(_outcomes(True, False), 2, 1, "bisect") == []  # bracket closed: nothing to probe


def test_the_basin_rule_is_the_barrier_with_a_loose_loss_backstop():
    """Numbers of the offline task's seed-0 probes (model 1's held-out loss 0.455): a short probe ends above
    model 1 even at 0.25x, which must not count as leaving; a bump (barrier) does, and so does a path that
    rises without a bump to more than probe_loss_ratio x model 1's loss."""

    def row(barrier, loss):
        return {"diverged": False, "loss_barrier": barrier, "eval_loss": loss}

    loss1 = 0.455
    assert in_basin(row(0.0, 0.502), loss1, 0.1, 2.0)  # 0.25x: +10% loss, no barrier
    assert in_basin(row(0.0, 0.72), loss1, 0.1, 2.0)  # +58%: still only an unconverged probe
    assert not in_basin(row(0.056, 0.72), loss1, 0.1, 2.0)  # 2x: a barrier of 0.12 x L1
    assert in_basin(row(0.056, 0.72), loss1, 0.2, 2.0)
    assert not in_basin(row(0.0, 0.95), loss1, 0.1, 2.0)  # no bump, but the loss more than doubled
    assert in_basin(row(0.0, 0.95), loss1, 0.1, 2.5)
    assert not in_basin({"diverged": True, "loss_barrier": None, "eval_loss": None}, loss1, 1e9, 1e9)


def test_the_command_line_reads_auto_and_numbers():
    parser = HfArgumentParser(StarSSEConfig)
    (auto,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            "x",
            "--cycle_learning_rate",
            "auto",
            "--cycle_lr_grid",
            "1",
            "4",
            "--learning_rate",
            str(LR),
        ]
    )
    assert auto.cycle_learning_rate == "auto" and auto.cycle_lr_grid == [1.0, 4.0]
    (number,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--cycle_learning_rate", "3e-4"])
    assert number.cycle_learning_rate == 3e-4 and isinstance(number.cycle_learning_rate, float)
    help_text = parser.format_help()
    assert "'auto'" in help_text and "basin_tolerance" in help_text
    assert torch.get_num_threads() == 1


# ------------------------------------------------------------------------------- basin_guard: a safety net
BASE = AUTO["learning_rate"]  # the fine-tuning LR the multipliers scale


def test_the_safety_net_keeps_a_set_lr_that_stays_after_one_probe(tmp_path, reference):
    """basin_guard=True with a set cycle LR inside the basin: one probe (the set LR), kept, and the members
    are those of the plain fixed run (the probe leaves no trace)."""
    probe, members, _ = reference
    trainer = auto_trainer(tmp_path, cycle_learning_rate=2.0 * BASE, basin_guard=True)
    assert trainer.chosen_cycle_learning_rate == pytest.approx(2.0 * BASE)  # the set LR before the probe
    trainer.train()
    guard = trainer.basin_probe
    assert guard["mode"] == "guard" and [row["multiplier"] for row in guard["table"]] == [2.0]
    assert guard["cycle_lr_grid"] == [0.5, 2.0] and guard["table"][0]["in_basin"]
    assert guard["chosen_multiplier"] == 2.0 and "kept" in guard["reason"]
    meta = trainer.ensemble_metadata()
    assert meta["cycle_learning_rate_mode"] == "guard" and meta["cycle_learning_rate"] == pytest.approx(4e-3)
    for k, path in enumerate(trainer.member_paths):
        assert max_diff(load_member(path), members[k]) <= 1e-6, k
    trainer.ensemble().save_pretrained(tmp_path / "repo")
    card = (tmp_path / "repo" / "README.md").read_text()
    assert "checked by the basin guard" in card and "chosen automatically" not in card


def test_the_safety_net_steps_down_only_when_the_set_lr_leaves(tmp_path, reference):
    """A set cycle LR that leaves the basin (100x): probed first, then the grid below it is searched; the
    cycles use the largest LR that stays, and the members equal the fixed run at that LR."""
    probe, members, _ = reference
    trainer = auto_trainer(tmp_path, cycle_learning_rate=100.0 * BASE, basin_guard=True)
    trainer.train()
    guard = trainer.basin_probe
    rows = {row["multiplier"]: row for row in guard["table"]}
    assert not rows[100.0]["in_basin"] and rows[2.0]["in_basin"]
    assert guard["chosen_multiplier"] == 2.0 and "left the basin" in guard["reason"]
    assert trainer.chosen_cycle_learning_rate == pytest.approx(2.0 * BASE)
    _, lrs, _ = trainer.lr_schedule()
    assert lrs[MODEL1_STEPS] == pytest.approx(2.0 * BASE)
    for k, path in enumerate(trainer.member_paths):
        assert max_diff(load_member(path), members[k]) <= 1e-6, k


def test_the_safety_net_candidates_end_at_the_set_lr():
    from hf_ens.trainers.probe import candidates

    args = starsse_config("unused", cycle_learning_rate=LR, basin_guard=True)
    assert candidates(args) == [0.25, 0.5, 1.0]  # the default grid below the default 1x, then 1x
    args = starsse_config("unused", cycle_learning_rate=3 * LR, basin_guard=True)
    assert candidates(args) == [0.25, 0.5, 1.0, 2.0, pytest.approx(3.0)]
    args = starsse_config("unused", cycle_learning_rate=None, basin_guard=True)  # unset: learning_rate, 1x
    assert candidates(args)[-1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(cycle_learning_rate="auto"), "one of them"),
        (dict(method="local_de"), "basin_guard=True probes"),
        (dict(num_members=1), "num_members=1"),
        (dict(fp16=True), "fp16"),
    ],
)
def test_bad_safety_net_settings_are_refused_by_the_config(tmp_path, overrides, match):
    settings = {**AUTO, "cycle_learning_rate": BASE, "basin_guard": True, **overrides}
    with pytest.raises(ValueError, match=match):
        starsse_config(tmp_path, **settings)


def test_the_safety_net_without_an_eval_dataset_is_refused_before_training(tmp_path):
    trainer = auto_trainer(tmp_path, eval_dataset=None, cycle_learning_rate=BASE, basin_guard=True)
    with pytest.raises(ValueError, match="eval_dataset"):
        trainer.train()
    assert os.listdir(tmp_path) == [] and trainer.state.global_step == 0
