"""StarSSETrainer: LR schedule, members, cycle starts, optimizer reset, Local DE, resume, bad input."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import safetensors.torch
import torch
from hf_ens.trainers import StarSSEConfig
from transformers import HfArgumentParser, Trainer, TrainerCallback

from hf_ens.testing_utils import one_torch_thread
from tests._trainer_utils import (
    BATCH,
    CYCLE_LR,
    LR,
    TinyImages,
    load_member,
    make_trainer,
    max_diff,
    starsse_config,
    tiny_vit,
    weights,
)

STEPS_PER_EPOCH = 6  # 24 samples / batch 4


_one_thread = pytest.fixture(autouse=True)(one_torch_thread)


def expected_lr(step, model1_steps, cycle_steps, warmup=0, cycle_warmup=0):
    """Independent restatement of the schedule: linear (with warmup) for model 1, cosine restarts after."""
    if step < model1_steps:
        if step < warmup:
            return LR * step / warmup
        return LR * (model1_steps - step) / (model1_steps - warmup)
    u = (step - model1_steps) % cycle_steps
    if u < cycle_warmup:
        return CYCLE_LR * u / cycle_warmup
    return CYCLE_LR * 0.5 * (1 + math.cos(math.pi * (u - cycle_warmup) / (cycle_steps - cycle_warmup)))


@pytest.mark.parametrize("grad_accum,cycle_warmup", [(1, 0), (2, 2)])
def test_starsse_lr_members_starts_and_reset(tmp_path, grad_accum, cycle_warmup):
    boundaries = [12, 18, 24]
    trainer, rec, _ = make_trainer(
        tmp_path,
        snapshot_steps=boundaries,
        per_device_train_batch_size=BATCH // grad_accum,
        gradient_accumulation_steps=grad_accum,
        warmup_steps=2,
        cycle_warmup_steps=cycle_warmup,
    )
    trainer.train()
    assert trainer.plan.boundaries == boundaries and trainer.state.global_step == 24

    # LR of every optimizer step, exact, including both sides of every boundary.
    for step in range(24):
        assert rec.lrs[step] == pytest.approx(expected_lr(step, 12, 6, 2, cycle_warmup), rel=1e-12, abs=1e-15)
    if cycle_warmup == 0:
        assert rec.lrs[12] == rec.lrs[18] == CYCLE_LR  # restart exactly at the peak
    else:
        assert rec.lrs[12] == rec.lrs[18] == 0.0 and rec.lrs[13] == pytest.approx(CYCLE_LR / 2)
    assert (
        rec.lrs[11] == pytest.approx(LR / 10)
        and rec.lrs[17] < 0.2 * CYCLE_LR
        and rec.lrs[23] < 0.2 * CYCLE_LR
    )
    assert trainer.plan.learning_rates() == pytest.approx([rec.lrs[s] for s in range(24)], rel=1e-12)
    steps, lrs, ends = trainer.lr_schedule()
    assert steps == list(range(24)) and ends == boundaries and lrs == trainer.plan.learning_rates()

    # Member k is exactly the weights at the end of cycle k.
    members = [load_member(p) for p in trainer.member_paths]
    for k, step in enumerate(boundaries):
        assert max_diff(members[k], rec.end[step]) == 0.0
    # StarSSE: cycles 2..K start from model 1 (member 0), not from the previous member.
    assert max_diff(rec.begin[12], members[0]) == 0.0
    assert max_diff(rec.begin[18], members[0]) == 0.0
    assert max_diff(rec.begin[18], members[1]) > 1e-4
    # Optimizer state cleared at each cycle start, populated elsewhere.
    assert rec.opt_state_len[12] == rec.opt_state_len[18] == 0
    assert rec.opt_state_len[11] > 0 and rec.opt_state_len[13] > 0 and rec.opt_state_len[19] > 0
    # Members are plain save_pretrained dirs with safetensors, written atomically (no temp dirs left).
    assert sorted(os.listdir(trainer.members_dir)) == ["member_00", "member_01", "member_02"]
    assert os.path.isfile(os.path.join(trainer.member_paths[0], "model.safetensors"))


def test_sse_continues_from_previous_member_without_reset(tmp_path):
    trainer, rec, _ = make_trainer(tmp_path, snapshot_steps=[12, 18], method="sse", reset_optimizer=False)
    trainer.train()
    members = [load_member(p) for p in trainer.member_paths]
    assert max_diff(rec.begin[12], members[0]) == 0.0
    assert max_diff(rec.begin[18], members[1]) == 0.0
    assert max_diff(rec.begin[18], members[0]) > 1e-4
    assert rec.opt_state_len[12] > 0 and rec.opt_state_len[18] > 0  # reset_optimizer=False keeps the moments
    assert rec.lrs[12] == CYCLE_LR


def test_local_de_members_start_from_pretrained_with_own_head_and_data_order(tmp_path):
    trainer, rec, collator = make_trainer(
        tmp_path, snapshot_steps=[0, 6, 12], method="local_de", num_train_epochs=1
    )
    initial = weights(trainer.model)
    trainer.train()
    assert trainer.plan.boundaries == [6, 12, 18]
    backbone = [k for k in initial if k.startswith("vit.")]
    head = [k for k in initial if k.startswith("classifier.")]
    assert backbone and head
    heads = []
    for step in (0, 6, 12):
        start = rec.begin[step]
        assert max(float((start[k] - initial[k]).abs().max()) for k in backbone) == 0.0  # original weights
        heads.append(torch.cat([start[k].flatten() for k in head]))
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    # Each member replays model 1's full schedule (linear from the peak) with a fresh optimizer.
    assert rec.lrs[0] == rec.lrs[6] == rec.lrs[12] == LR
    assert rec.opt_state_len[6] == rec.opt_state_len[12] == 0
    # Data order: every member sees all samples once, in its own order.
    orders = [collator.seen[i * 24 : (i + 1) * 24] for i in range(3)]
    assert all(sorted(o) == list(range(24)) for o in orders)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    members = [load_member(p) for p in trainer.member_paths]
    assert min(max_diff(members[i], members[j]) for i, j in [(0, 1), (1, 2), (0, 2)]) > 1e-3


def test_ensemble_soup_and_processor(tmp_path):
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    trainer, _, _ = make_trainer(tmp_path, num_members=2, processing_class=processor)
    trainer.train()
    assert all(os.path.isfile(os.path.join(p, "preprocessor_config.json")) for p in trainer.member_paths)
    members = [load_member(p) for p in trainer.member_paths]

    soup = weights(trainer.soup())
    for name in soup:
        assert torch.allclose(soup[name], (members[0][name] + members[1][name]) / 2, atol=1e-7)

    ens = trainer.ensemble()
    assert ens.num_members == 2
    assert ens.metadata["method"] == "starsse" and ens.metadata["num_members"] == 2
    assert ens.metadata["model1_steps"] == 12 and ens.metadata["cycle_steps"] == 6
    pixels = TinyImages()[0]["pixel_values"][None]
    with torch.no_grad():
        out = ens(pixel_values=pixels)
    probs = torch.stack([torch.softmax(out.member_logits[k], -1) for k in range(2)]).mean(0)
    assert torch.allclose(out.logits.exp(), probs, atol=1e-6)


class ReadsModel(TrainerCallback):
    """A user's callback: the weights it sees at the start and at the end of given steps."""

    def __init__(self, steps):
        self.steps, self.begin, self.end = set(steps), {}, {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.begin[state.global_step] = weights(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.end[state.global_step] = weights(model)


@pytest.mark.parametrize("method", ["starsse", "local_de"])
def test_user_callbacks_see_the_anchor_at_a_cycle_start(tmp_path, method):
    """Issue 7: at the first step of cycle 3 a user's on_step_begin sees what the step trains from (StarSSE:
    model 1; Local DE: the original body and the re-drawn head), for callbacks=[...] and add_callback alike;
    on_step_end of the step that ends member 1 (where evaluation and saving happen) still sees member 1."""
    extra = dict(method="local_de", num_train_epochs=1) if method == "local_de" else {}
    step = 18 if method == "starsse" else 12  # member 1 ends (on_step_end), cycle 3 begins (on_step_begin)
    given, added = ReadsModel([step]), ReadsModel([step])
    trainer, rec, _ = make_trainer(tmp_path, snapshot_steps=[step], callbacks=[given], **extra)
    trainer.add_callback(added)
    initial = weights(trainer.model)
    trainer.train()
    members = [load_member(p) for p in trainer.member_paths]
    for user in (given, added):
        assert max_diff(user.end[step], members[1]) == 0.0
        assert max_diff(user.begin[step], rec.begin[step]) == 0.0  # what the step trains from
        if method == "starsse":
            assert max_diff(user.begin[step], members[0]) == 0.0  # model 1, not the end of cycle 2
        else:
            body = [k for k in initial if k.startswith("vit.")]
            assert max(float((user.begin[step][k] - initial[k]).abs().max()) for k in body) == 0.0
            assert not torch.equal(user.begin[step]["classifier.weight"], members[1]["classifier.weight"])
            assert not torch.equal(user.begin[step]["classifier.weight"], initial["classifier.weight"])


@pytest.mark.parametrize(
    "method,stop_at,resume_steps",
    [("starsse", 16, (12, 14)), ("local_de", 10, (6, 8))],
)
def test_resume_gives_identical_members(tmp_path, method, stop_at, resume_steps):
    """Kill mid-cycle / just after a snapshot, resume into a differently initialised model: same members."""
    extra = dict(method=method, save_strategy="steps", save_steps=2)
    if method == "local_de":
        extra["num_train_epochs"] = 1
    full, _, _ = make_trainer(tmp_path / "full", **extra)
    full.train()
    reference = [load_member(p) for p in full.member_paths]

    run, rec, _ = make_trainer(tmp_path / "killed", snapshot_steps=resume_steps, **extra)
    rec.stop_at = stop_at
    run.train()
    assert len(os.listdir(run.members_dir)) < len(reference)  # really interrupted
    for step in resume_steps:
        out = tmp_path / f"resume_{step}"
        shutil.copytree(tmp_path / "killed", out)
        resumed, _, _ = make_trainer(out, model_seed=123, **extra)
        resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{step}"))
        for k, path in enumerate(resumed.member_paths):
            assert max_diff(load_member(path), reference[k]) <= 1e-6, (step, k)


def test_checkpoint_restore_is_exact_and_partial_load_raises(tmp_path):
    run, rec, _ = make_trainer(tmp_path / "run", snapshot_steps=[14], save_strategy="steps", save_steps=14)
    run.train()
    checkpoint = str(tmp_path / "run" / "checkpoint-14")

    ours, _, _ = make_trainer(tmp_path / "a", model_seed=7)
    ours._load_from_checkpoint(checkpoint)
    assert max_diff(weights(ours.model), rec.end[14]) == 0.0

    # The plain transformers Trainer (5.24, upstream #48805) silently keeps wrong ViT weights here.
    plain = Trainer(model=tiny_vit(7), args=starsse_config(tmp_path / "b"), train_dataset=TinyImages())
    Trainer._load_from_checkpoint(plain, checkpoint)
    plain_error = max_diff(weights(plain.model), rec.end[14])
    print(f"plain Trainer resume error: {plain_error:.3g}")

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    tensors = safetensors.torch.load_file(str(broken / "model.safetensors"))
    tensors.pop(sorted(tensors)[3])
    safetensors.torch.save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    victim, _, _ = make_trainer(tmp_path / "c", model_seed=7)
    with pytest.raises(ValueError, match="does not match the model"):
        victim._load_from_checkpoint(str(broken))


def test_bf16_runs(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, bf16=True, num_members=2)
    initial = weights(trainer.model)
    trainer.train()
    members = [load_member(p) for p in trainer.member_paths]
    assert all(torch.isfinite(v).all() for m in members for v in m.values())
    assert max_diff(members[0], initial) > 1e-4 and max_diff(members[1], members[0]) > 1e-4


def test_skipped_fp16_steps_keep_boundaries_exact(tmp_path):
    """A real GradScaler whose first scales overflow: skipped steps must not shift LR or cycles."""
    # Non-fused AdamW: the scaler skips optimizer.step() on inf grads (fused takes found_inf itself).
    trainer, rec, _ = make_trainer(tmp_path, snapshot_steps=[12, 18, 24], optim="adamw_torch")
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126)
    skipped = []
    orig_step_end = rec.on_step_end

    def on_step_end(args, state, control, **kw):
        skipped.append(trainer.accelerator.optimizer_step_was_skipped)
        return orig_step_end(args, state, control, **kw)

    rec.on_step_end = on_step_end
    trainer.train()
    assert sum(skipped) >= 2, "the test needs skipped optimizer steps"
    for step in range(24):
        assert rec.lrs[step] == pytest.approx(expected_lr(step, 12, 6), rel=1e-12, abs=1e-15)
    members = [load_member(p) for p in trainer.member_paths]
    for k, step in enumerate([12, 18, 24]):
        assert max_diff(members[k], rec.end[step]) == 0.0


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(num_members=0), "num_members"),
        (dict(cycle_epochs=0), "cycle_epochs"),
        (dict(cycle_epochs=-1.0), "cycle_epochs"),
        (dict(cycle_learning_rate=0.0), "cycle_learning_rate"),
        (dict(cycle_learning_rate=-1e-3), "cycle_learning_rate"),
        (dict(method="snapshot"), "method"),
        # issue 14: each of these used to pass and fail late, deep inside torch, or not at all
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(cycle_learning_rate=math.inf), "cycle_learning_rate"),
        (dict(cycle_learning_rate=math.nan), "cycle_learning_rate"),
        (dict(num_train_epochs=math.inf), "num_train_epochs"),
        (dict(cycle_epochs=math.nan), "cycle_epochs"),
        (dict(cycle_warmup_steps=math.nan), "cycle_warmup_steps"),
        (dict(per_device_eval_batch_size=0), "per_device_eval_batch_size"),
    ],
)
def test_bad_config_values(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        starsse_config(tmp_path, **overrides)
    assert type(err.value) is ValueError


def test_method_choices_reach_argparse():
    parser = HfArgumentParser(StarSSEConfig)
    action = next(a for a in parser._actions if a.dest == "method")
    assert list(action.choices) == ["starsse", "sse", "local_de"]
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "x", "--method", "snapshot"])


def test_max_steps_that_cuts_cycles_fails_before_training(tmp_path):
    trainer, rec, _ = make_trainer(tmp_path, max_steps=20, save_strategy="steps", save_steps=1)
    with pytest.raises(ValueError, match="max_steps=20"):
        trainer.train()
    assert rec.lrs == {} and not os.path.exists(trainer.member_paths[0])
    assert not [d for d in os.listdir(tmp_path) if d.startswith("checkpoint")]


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot be written"):
        starsse_config(blocker / "out")  # the config already: before any (pre-)training
    assert not (blocker.parent / "out").exists()


def test_existing_members_are_never_overwritten_silently(tmp_path):
    first, _, _ = make_trainer(tmp_path, num_members=2)
    first.train()
    before = os.path.getmtime(os.path.join(first.member_paths[0], "model.safetensors"))
    second, rec, _ = make_trainer(tmp_path, num_members=2)
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        second.train()
    assert rec.lrs == {}
    assert os.path.getmtime(os.path.join(first.member_paths[0], "model.safetensors")) == before
    third, _, _ = make_trainer(tmp_path, num_members=2, overwrite_output_dir=True)
    third.train()


def test_resume_with_different_plan_fails(tmp_path):
    out = tmp_path / "run"
    base = dict(num_members=2, save_strategy="steps", save_steps=6)
    run, _, _ = make_trainer(out, **base)
    run.train()
    for overrides in (dict(num_members=3), dict(method="sse"), dict(cycle_epochs=2)):
        other, rec, _ = make_trainer(out, **{**base, **overrides})
        with pytest.raises(ValueError, match="Cannot resume"):
            other.train(resume_from_checkpoint=str(out / "checkpoint-12"))
        assert rec.lrs == {}
