"""StarSSETrainer on a peft LoRA model: members, anchors, checkpoints are adapters; resume; ensemble, soup."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import safetensors.torch
import torch
from hf_ens.trainers import StarSSETrainer
from hf_ens.trainers.branches import branch_seed
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import ViTForImageClassification

from hf_ens import uniform_soup
from hf_ens.adapters import AdapterEnsembleModel, member_weights, reinit_adapter
from hf_ens.testing_utils import one_torch_thread
from tests._trainer_utils import Recorder, RecordingCollator, StopAfter, TinyImages, starsse_config, tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
_one_thread = pytest.fixture(autouse=True)(one_torch_thread)

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
LOCAL_DE = dict(method="local_de", num_train_epochs=1)


def lora_vit(seed: int = 0) -> PeftModel:
    return get_peft_model(tiny_vit(seed), LoraConfig(**LORA))


class AdapterRecorder(Recorder):
    """The Recorder of the trainer tests, but recording the adapter (what a member is) at given steps."""

    def on_step_begin(self, args, state, control, **kw):
        super().on_step_begin(args, state, control, **kw)
        if state.global_step in self.snapshot_steps:
            self.begin[state.global_step] = _float(member_weights(self.trainer.model))


def _float(weights: dict) -> dict:
    return {k: v.detach().clone().float() for k, v in weights.items()}


def make_trainer(out, model_seed=0, snapshot_steps=(), **overrides):
    trainer = StarSSETrainer(
        model=lora_vit(model_seed),
        args=starsse_config(out, **overrides),
        train_dataset=TinyImages(),
        data_collator=RecordingCollator(),
    )
    recorder = AdapterRecorder(trainer, snapshot_steps)
    trainer.add_callback(recorder)
    return trainer, recorder


def adapter_file(path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(os.path.join(path, "adapter_model.safetensors"))


def diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if ".lora_" not in k and "modules_to_save" not in k
    }


@pytest.mark.parametrize("method", ["starsse", "sse", "local_de"])
def test_members_anchors_and_checkpoints_are_adapters(tmp_path, method):
    extra = LOCAL_DE if method == "local_de" else {"method": method}
    starts = [6, 12] if method == "local_de" else [12, 18]
    trainer, rec = make_trainer(
        tmp_path, snapshot_steps=[0, *starts], save_strategy="steps", save_steps=starts[0] + 1, **extra
    )
    initial, frozen = _float(member_weights(trainer.model)), base_weights(trainer.model)
    trainer.train()
    for path in trainer.member_paths:  # peft adapter directories, no model weights
        assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    members = [adapter_file(p) for p in trainer.member_paths]
    assert all(k.endswith("weight") or k.endswith("bias") for k in members[0])
    assert any("lora_A" in k for k in members[0]) and any("classifier" in k for k in members[0])
    checkpoint = tmp_path / f"checkpoint-{starts[0] + 1}"
    assert "model.safetensors" not in os.listdir(checkpoint)
    assert set(adapter_file(checkpoint)) == set(members[0])  # the checkpoint holds the adapter only
    if method != "sse":  # the anchor (model 1, or the original adapter) too: adapter tensors only
        anchor = safetensors.torch.load_file(str(checkpoint / "starsse_anchor.safetensors"))
        assert set(anchor) == set(initial)
    assert diff(base_weights(trainer.model), frozen) == 0.0  # the base never moved

    ens = trainer.ensemble()
    assert isinstance(ens, AdapterEnsembleModel) and ens.metadata["member_format"] == "peft_lora"
    if method == "starsse":  # every later cycle starts from model 1's adapter
        for step in starts:
            assert diff(rec.begin[step], ens_member_weights(ens, 0)) == 0.0
    elif method == "sse":  # each cycle starts from the previous member
        assert diff(rec.begin[starts[1]], ens_member_weights(ens, 1)) == 0.0
        assert diff(rec.begin[starts[1]], ens_member_weights(ens, 0)) > 1e-4
    else:  # Local DE: a new adapter and head per member, drawn from (seed, k); B = 0: starts at the base
        assert diff(rec.begin[0], initial) == 0.0
        for k, step in enumerate(starts, start=1):
            expected = lora_vit(0)
            torch.manual_seed(branch_seed(0, k))
            reinit_adapter(expected)
            assert diff(rec.begin[step], _float(member_weights(expected))) == 0.0
            assert all(v.abs().max() == 0 for n, v in rec.begin[step].items() if "lora_B" in n)
        assert diff(rec.begin[starts[0]], rec.begin[starts[1]]) > 1e-3


def ens_member_weights(ens: AdapterEnsembleModel, k: int) -> dict[str, torch.Tensor]:
    """Member k's adapter tensors named as in the training model (adapter 'default')."""
    name = ens.config.members[k]
    out = {}
    for key, value in ens.peft_model.state_dict().items():
        parts = key.split(".")
        if name in parts and (any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts):
            out[".".join("default" if p == name else p for p in parts)] = value.float()
    return out


@pytest.mark.parametrize("method,stop_at,resume_steps", [("starsse", 16, (14,)), ("local_de", 10, (8,))])
def test_resume_mid_cycle_gives_the_same_members(tmp_path, method, stop_at, resume_steps):
    extra = dict(
        LOCAL_DE if method == "local_de" else {"method": method}, save_strategy="steps", save_steps=2
    )
    full, _ = make_trainer(tmp_path / "full", **extra)
    full.train()
    reference = [adapter_file(p) for p in full.member_paths]

    run, rec = make_trainer(tmp_path / "killed", **extra)
    rec.stop_at = stop_at
    run.train()
    assert len(os.listdir(run.members_dir)) < len(reference)  # really interrupted
    for step in resume_steps:
        out = tmp_path / f"resume_{step}"
        shutil.copytree(tmp_path / "killed", out)
        resumed, _ = make_trainer(out, model_seed=0, **extra)
        with torch.no_grad():  # another adapter and head than the run's: resume must restore them
            for p in resumed.model.parameters():
                if p.requires_grad:
                    p.add_(0.5)
        resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{step}"))
        for k, path in enumerate(resumed.member_paths):
            assert diff(adapter_file(path), reference[k]) <= 1e-6, (step, k)


def test_ensemble_and_exact_soup(tmp_path):
    trainer, _ = make_trainer(tmp_path, num_members=3)
    trainer.train()
    ens = trainer.ensemble()
    x = TinyImages()[0]["pixel_values"][None]
    merged = [
        PeftModel.from_pretrained(tiny_vit(0), p).merge_and_unload().eval() for p in trainer.member_paths
    ]
    with torch.no_grad():
        out = ens(pixel_values=x)
        for k, model in enumerate(merged):
            assert torch.allclose(out.member_logits[k], model(pixel_values=x).logits, atol=1e-5)
    assert torch.allclose(out.logits.exp(), out.member_logits.softmax(-1).mean(0), atol=1e-6)
    soup = trainer.soup()
    assert type(soup) is ViTForImageClassification
    reference = uniform_soup(merged).state_dict()
    assert max((soup.state_dict()[k] - v).abs().max().item() for k, v in reference.items()) <= 1e-6
    saved = ens.save_pretrained(tmp_path / "repo")
    cfg = json.loads((saved / "ensemble_config.json").read_text())
    assert cfg["metadata"]["lora_r"] == 4 and cfg["metadata"]["lora_target_modules"] == "q_proj,v_proj"


# ------------------------------------------------------------------------------- parallel members (branches)
ONE_PROCESS = dict(num_members=3, parallel_members=True, gradient_accumulation_steps=2)


def test_local_de_branches_equal_the_sequential_loop(tmp_path):
    """The branch loop (parallel_members, one process here) re-draws and trains the same adapters as the
    Trainer's own loop: one mechanism for both."""
    branch, _ = make_trainer(tmp_path / "branch", **ONE_PROCESS, **LOCAL_DE)
    branch.train()
    loop, _ = make_trainer(tmp_path / "loop", **{**ONE_PROCESS, "parallel_members": False}, **LOCAL_DE)
    loop.train()
    for k, (a, b) in enumerate(zip(branch.member_paths, loop.member_paths, strict=True)):
        assert diff(adapter_file(a), adapter_file(b)) <= 1e-6, k


def test_a_stopped_starsse_branch_resumes_from_its_adapter_checkpoint(tmp_path):
    save = dict(ONE_PROCESS, save_strategy="steps", save_steps=1, cycle_epochs=2)
    reference, _ = make_trainer(tmp_path / "reference", **save)
    reference.train()
    out = tmp_path / "stopped"
    stopped, _ = make_trainer(out, **save)  # model 1: 6 steps of 2 batches; stop in member 2, step 3
    stopped.data_collator = StopAfter(12 + 12 + 5)
    with pytest.raises(RuntimeError, match="stopped at batch 29"):
        stopped.train()
    checkpoint = out / "branches" / "member_02" / "checkpoint-2"
    assert set(safetensors.torch.load_file(str(checkpoint / "model.safetensors"))) == set(
        member_weights(stopped.model)
    )  # the branch checkpoint holds the adapter only
    resumed, _ = make_trainer(out, **save)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.branches_resumed == {2: 2}
    for k, (a, b) in enumerate(zip(reference.member_paths, resumed.member_paths, strict=True)):
        assert diff(adapter_file(a), adapter_file(b)) <= 1e-6, k
