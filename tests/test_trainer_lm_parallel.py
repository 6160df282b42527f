"""StarSSETrainer on causal LMs (issue 23): what the image path guarantees, on tiny GPT2 (tied embeddings,
full members) and Llama (untied; full and LoRA members), padded text batches: a crash after member 1 or
inside a cycle resumes to the members of an uninterrupted run; parallel branches equal the sequential loop
(Local DE; the branch step is the Trainer's per-token mean over its micro-batches), a stopped branch resumes
from its checkpoint, and two processes give the members of one (StarSSE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from datasets import Dataset
from hf_ens.trainers import StarSSETrainer
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling

from hf_ens.testing_utils import free_port, one_torch_thread
from tests._lm import lm_texts, tiny_gpt2, tiny_llama, word_tokenizer
from tests._trainer_utils import starsse_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
_one_thread = pytest.fixture(autouse=True)(one_torch_thread)

ROOT = Path(__file__).resolve().parent.parent
K, SAMPLES = 3, 24  # batches of 4: 6 per epoch; model 1 = 2 epochs, cycles of 1 epoch
NO_DROPOUT = dict(
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)  # GPT2's default 0.1: see parallel_members.md
FAMILIES = {"gpt2": dict(NO_DROPOUT), "llama": {}}
LORA = {
    "gpt2": dict(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM", fan_in_fan_out=True),
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
}
CASES = [("gpt2", False), ("llama", True)]  # full members with tied embeddings; LoRA members on an untied LM
ONE = dict(parallel_members=True, gradient_accumulation_steps=2)  # the member batch of 2 processes x 4
LOCAL_DE = dict(method="local_de", num_train_epochs=1)


class CrashAt:
    """The causal-LM collator, raising at its n-th call: a crash at a chosen batch."""

    def __init__(self, n: int | None = None):
        self.inner = DataCollatorForLanguageModeling(word_tokenizer(padding_side="right"), mlm=False)
        self.n, self.calls = n, 0

    def __call__(self, features):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError(f"crash at batch {self.n}")
        return self.inner(features)


def lm_trainer(out, family: str, lora: bool, model_seed: int = 0, crash_at=None, held_out=False, **overrides):
    tokenizer = word_tokenizer(padding_side="right")
    build = tiny_gpt2 if family == "gpt2" else tiny_llama
    model = build(0 if lora else model_seed, **FAMILIES[family]).train()  # LoRA: one pre-trained base
    if lora:
        model = get_peft_model(model, LoraConfig(**LORA[family]))
        if model_seed:  # another adapter than the run's: resume must restore it
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.5)
    lrs = (
        dict(learning_rate=5e-2, cycle_learning_rate=2e-2)
        if lora
        else dict(learning_rate=1e-2, cycle_learning_rate=5e-3)
    )
    return StarSSETrainer(
        model=model,
        args=starsse_config(out, **{"num_members": K, **lrs, **overrides}),
        train_dataset=Dataset.from_dict(dict(tokenizer(lm_texts(SAMPLES)))),
        eval_dataset=Dataset.from_dict(dict(tokenizer(lm_texts(8, seed=1)))) if held_out else None,
        data_collator=CrashAt(crash_at),
        processing_class=tokenizer,
    )


def member(path) -> dict[str, torch.Tensor]:
    """A member's tensors as written: the whole LM (model.safetensors) or the adapter."""
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if os.path.isfile(os.path.join(path, name)):
            return safetensors.torch.load_file(os.path.join(path, name))
    raise FileNotFoundError(path)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_same_members(paths_a, paths_b) -> None:
    for k, (a, b) in enumerate(zip(paths_a, paths_b, strict=True)):
        assert max_diff(member(a), member(b)) <= 1e-6, k


# ------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("family,lora", CASES)
def test_a_crash_after_model_1_or_inside_a_cycle_resumes_to_the_same_members(tmp_path, family, lora):
    save = dict(save_strategy="steps", save_steps=1, save_total_limit=2)
    reference = lm_trainer(tmp_path / "reference", family, lora, **save)
    reference.train()
    ref = [member(p) for p in reference.member_paths]
    assert min(max_diff(ref[0], ref[k]) for k in (1, 2)) > 1e-4  # the cycles moved: the test can fail
    # batches 1-12: model 1, 13-18: cycle 1, 19-24: cycle 2 (a new epoch's first batch is drawn only then)
    for crash_at, written in ((13, ["member_00"]), (21, ["member_00", "member_01"])):
        out = tmp_path / f"crash_{crash_at}"
        crashed = lm_trainer(out, family, lora, crash_at=crash_at, **save)
        with pytest.raises(RuntimeError, match=f"crash at batch {crash_at}"):
            crashed.train()
        assert sorted(os.listdir(out / "members")) == written
        resumed = lm_trainer(out, family, lora, model_seed=5, **save)  # weights come from the checkpoint
        resumed.train(resume_from_checkpoint=True)
        assert_same_members(resumed.member_paths, reference.member_paths)


# ---------------------------------------------------------------------------------------- parallel members
@pytest.mark.parametrize("family,lora", [("gpt2", False), ("llama", False), ("llama", True)])
def test_local_de_branches_equal_the_sequential_loop(tmp_path, family, lora):
    """One mechanism: the branch loop (parallel_members, one process) and the Trainer's loop give the same
    Local DE members: the same seeds from (seed, k), data order, batch, and re-drawn head or adapter (GPT2's
    tied head is kept)."""
    branch = lm_trainer(tmp_path / "branch", family, lora, **ONE, **LOCAL_DE)
    branch.train()
    loop = lm_trainer(tmp_path / "loop", family, lora, **{**ONE, "parallel_members": False}, **LOCAL_DE)
    loop.train()
    assert branch.written_members == loop.written_members == list(range(K))
    assert_same_members(branch.member_paths, loop.member_paths)
    assert max_diff(member(branch.member_paths[0]), member(branch.member_paths[1])) > 1e-4


@pytest.mark.parametrize("family,lora", CASES)
def test_a_stopped_branch_resumes_from_its_checkpoint_to_the_same_members(tmp_path, family, lora):
    save = dict(ONE, save_strategy="steps", save_steps=1, cycle_epochs=2)
    reference = lm_trainer(tmp_path / "reference", family, lora, **save)
    reference.train()
    out = tmp_path / "stopped"
    # model 1: 6 steps of 2 batches; member 1: 6 steps; crash in member 2, step 3 (batch 12 + 12 + 5)
    stopped = lm_trainer(out, family, lora, crash_at=29, **save)
    with pytest.raises(RuntimeError, match="crash at batch 29"):
        stopped.train()
    assert sorted(os.listdir(out / "members")) == ["member_00", "member_01"]
    resumed = lm_trainer(out, family, lora, model_seed=5, **save)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.branches_resumed == {2: 2} and resumed.written_members == [2]
    assert_same_members(resumed.member_paths, reference.member_paths)


@pytest.mark.slow
def test_two_processes_give_the_starsse_members_of_one_process(tmp_path):
    """A real 2-process launch (torchrun, gloo): StarSSE's model 1 data-parallel, then one branch per process,
    gives the members of one process training every branch with 2 accumulated micro-batches, bit for bit, for
    full GPT2 members and LoRA Llama members (padded batches, 24 samples: whole data-parallel rounds)."""
    from tests._trainer_parallel_run import main as run_here

    lora = {"lora": {k: v for k, v in LORA["llama"].items()}}
    runs = {
        "gpt2": {"num_members": K, "parallel_members": True, "lm": {"family": "gpt2", **NO_DROPOUT}},
        "llama_lora": {"num_members": K, "parallel_members": True, "lm": {"family": "llama"}, **lora},
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd.append(str(ROOT / "tests" / "_trainer_parallel_run.py"))
    for name, options in runs.items():
        cmd += [str(tmp_path / f"two_{name}"), json.dumps(options)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name, options in runs.items():
        two = tmp_path / f"two_{name}"
        written = [json.loads((two / f"rank{r}.json").read_text())["written"] for r in (0, 1)]
        assert written == [[0, 1], [2]]  # round-robin after model 1, each member written once
        run_here(
            str(tmp_path / f"one_{name}"),
            {**json.loads(json.dumps(options)), "gradient_accumulation_steps": 2},
        )
        paths = [
            [d / "members" / f"member_{k:02d}" for k in range(K)] for d in (two, tmp_path / f"one_{name}")
        ]
        for k, (a, b) in enumerate(zip(*paths, strict=True)):
            assert max_diff(member(a), member(b)) == 0.0, (name, k)
        assert max_diff(member(paths[0][1]), member(paths[0][2])) > 1e-4


def test_auto_on_lora_members_survives_a_crash_in_the_probes_and_probes_the_same_under_parallel_members(
    tmp_path,
):
    """cycle_learning_rate="auto" on LoRA Llama members, as the image path guarantees it: a crash inside the
    probes resumes to the same probe table and members; under parallel_members the probes (run before the
    branches, from the same model 1) give the same table."""
    auto = dict(
        cycle_learning_rate="auto",
        cycle_lr_grid=[0.5, 4.0],
        probe_search="linear",
        cycle_epochs=4,  # cycles of 12 steps: probes of 3 steps (2 micro-batches each)
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=2,
        held_out=True,
    )

    def table(trainer) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in trainer.basin_probe["table"]]

    reference = lm_trainer(tmp_path / "reference", "llama", True, **auto)
    reference.train()
    assert table(reference) and reference.basin_probe["probe_steps"] == 3
    # batches 1-12: model 1 (6 steps of 2); 13-18: the first probe; crash in its second step
    crashed = lm_trainer(tmp_path / "crashed", "llama", True, crash_at=15, **auto)
    with pytest.raises(RuntimeError, match="crash at batch 15"):
        crashed.train()
    assert crashed.basin_probe is None and sorted(os.listdir(tmp_path / "crashed" / "members")) == [
        "member_00"
    ]
    resumed = lm_trainer(tmp_path / "crashed", "llama", True, model_seed=5, **auto)
    resumed.train(resume_from_checkpoint=True)
    assert table(resumed) == table(reference)
    assert_same_members(resumed.member_paths, reference.member_paths)

    parallel = lm_trainer(tmp_path / "parallel", "llama", True, parallel_members=True, **auto)
    parallel.train()
    assert table(parallel) == table(reference)
    assert max_diff(member(parallel.member_paths[0]), member(reference.member_paths[0])) == 0.0
