"""parallel_members (issue 11): StarSSE branches / Local DE members trained one per process, alone.

Two real processes (torchrun, gloo, CPU, one thread each) must give the members of one process training every
branch in turn, every member is written exactly once by the process that trained it, and a process killed
mid-branch resumes each branch from its last checkpoint to the same members.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hf_ens.trainers.branches import BRANCHES_DIR, MemberSeededSampler, branch_config, branch_seed
from hf_ens.trainers.checkpoints import CYCLE_STATE_NAME
from hf_ens.trainers.parallel import assigned_members

from hf_ens.members import load_member as hf_load_member
from hf_ens.testing_utils import free_port, one_torch_thread
from tests._trainer_parallel_run import main as run_here
from tests._trainer_utils import StopAfter, load_member, make_trainer, max_diff, starsse_config, weights

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)

ROOT = Path(__file__).resolve().parent.parent
K = 5
# Two processes x batch 4 = a member batch of 8; one process reaches it with 2 accumulated micro-batches.
TWO = dict(num_members=K, parallel_members=True)
ONE = dict(TWO, gradient_accumulation_steps=2)
LOCAL_DE = dict(method="local_de", num_train_epochs=1)


def torchrun(*runs: tuple[Path, dict]) -> list[str]:
    """Command running tests/_trainer_parallel_run.py for each (out, options), in one 2-process launch."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
    ]
    cmd += ["--master_port", str(free_port()), str(ROOT / "tests" / "_trainer_parallel_run.py")]
    for out, options in runs:
        cmd += [str(out), json.dumps(options)]
    return cmd


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def members(out: Path) -> list[dict]:
    return [load_member(str(out / "members" / f"member_{k:02d}")) for k in range(K)]


def ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


# ------------------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_processes_give_the_members_of_one_process(tmp_path):
    two_starsse, two_local_de = tmp_path / "two_starsse", tmp_path / "two_local_de"
    proc = subprocess.run(
        torchrun((two_starsse, TWO), (two_local_de, {**TWO, **LOCAL_DE})),
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # Each member written exactly once, by the process that trained it (round-robin after model 1).
    starsse_ranks, local_de_ranks = ranks(two_starsse), ranks(two_local_de)
    assert all(r["world_size"] == r["torch_world_size"] == 2 for r in starsse_ranks + local_de_ranks)
    assert [r["written"] for r in starsse_ranks] == [[0, 1, 3], [2, 4]]
    assert [r["written"] for r in local_de_ranks] == [[0, 2, 4], [1, 3]]
    for out in (two_starsse, two_local_de):
        assert sorted(os.listdir(out / "members")) == [f"member_{k:02d}" for k in range(K)]
        assert not (out / BRANCHES_DIR).exists()  # a member replaces its branch checkpoints

    # One process, same member batch (4 x 2 accumulated), every branch in turn: the same members. Model 1 is
    # data-parallel in the 2-process run (an all-reduce mean of two gradients) and accumulated here: float
    # noise could separate them, on this CPU it does not (measured 0.0), so the bound is the 1e-6.
    one_starsse, one_local_de = tmp_path / "one_starsse", tmp_path / "one_local_de"
    run_here(str(one_starsse), ONE)
    run_here(str(one_local_de), {**ONE, **LOCAL_DE})
    assert ranks_written(one_starsse) == ranks_written(one_local_de) == list(range(K))
    for two, one in ((two_starsse, one_starsse), (two_local_de, one_local_de)):
        for k, (a, b) in enumerate(zip(members(two), members(one), strict=True)):
            assert max_diff(a, b) <= 1e-6, (two.name, k)
    # StarSSE branches differ from each other (each its own data order), all start from model 1.
    star = members(two_starsse)
    assert min(max_diff(star[i], star[j]) for i in range(1, K) for j in range(i + 1, K)) > 1e-4


@pytest.mark.slow
def test_two_processes_with_lora_members_give_the_adapters_of_one_process(tmp_path):
    """Issue 12 under a real 2-process launch: StarSSE branches over LoRA adapters, one per process."""
    import safetensors.torch

    lora = {
        "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    }
    two, one = tmp_path / "two", tmp_path / "one"
    proc = subprocess.run(
        torchrun((two, {**TWO, **lora})), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert [r["written"] for r in ranks(two)] == [[0, 1, 3], [2, 4]]
    run_here(str(one), {**ONE, **lora})

    def adapter(out: Path, k: int) -> dict:
        directory = out / "members" / f"member_{k:02d}"
        assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]
        return safetensors.torch.load_file(str(directory / "adapter_model.safetensors"))

    def diff(a: dict, b: dict) -> float:
        assert a.keys() == b.keys()
        return max((a[n] - b[n]).abs().max().item() for n in a)

    twos = [adapter(two, k) for k in range(K)]
    for k in range(K):
        assert diff(twos[k], adapter(one, k)) <= 1e-6, k
    assert diff(twos[1], twos[2]) > 1e-4


def ranks_written(out: Path) -> list[int]:
    return json.loads((out / "rank0.json").read_text())["written"]


def test_local_de_parallel_equals_the_sequential_trainer_loop(tmp_path):
    """One mechanism: the branch loop and the Trainer's own loop give the same Local DE members (same seeds
    from (seed, k), same data order, same batch), one process each."""
    branch, _, _ = make_trainer(tmp_path / "branch", **ONE, **LOCAL_DE)
    branch.train()
    loop, _, _ = make_trainer(tmp_path / "loop", **{**ONE, "parallel_members": False}, **LOCAL_DE)
    loop.train()
    assert branch.written_members == loop.written_members == list(range(K))
    for k, (a, b) in enumerate(zip(branch.member_paths, loop.member_paths, strict=True)):
        assert max_diff(load_member(a), load_member(b)) <= 1e-6, k


# ------------------------------------------------------------------------------------------------- resume
def test_a_stopped_branch_resumes_from_its_checkpoint_to_the_same_members(tmp_path):
    save = dict(ONE, save_strategy="steps", save_steps=1, cycle_epochs=2)
    reference, _, _ = make_trainer(tmp_path / "reference", **save)
    reference.train()

    out = tmp_path / "stopped"
    # model 1: 6 steps of 2 batches; member 1: 6 steps; stop in member 2 step 3 (batch 12 + 6 * 2 + 5).
    stopped, _, _ = make_trainer(out, **save)
    stopped.data_collator = StopAfter(12 + 12 + 5)
    with pytest.raises(RuntimeError, match="stopped at batch 29"):
        stopped.train()
    assert sorted(os.listdir(out / "members")) == ["member_00", "member_01"]
    assert sorted(os.listdir(out / BRANCHES_DIR / "member_02")) == ["checkpoint-2"]
    assert (out / BRANCHES_DIR / "member_02" / "checkpoint-2" / CYCLE_STATE_NAME).is_file()

    resumed, _, _ = make_trainer(out, model_seed=5, **save)  # weights come from model 1 and the checkpoint
    resumed.train(resume_from_checkpoint=True)
    assert resumed.branches_resumed == {2: 2}
    assert resumed.written_members == [2, 3, 4]
    for k, (a, b) in enumerate(zip(reference.member_paths, resumed.member_paths, strict=True)):
        assert max_diff(load_member(a), load_member(b)) <= 1e-6, k
    assert not (out / BRANCHES_DIR).exists()


def test_a_branch_checkpoint_of_another_run_is_refused(tmp_path):
    save = dict(ONE, save_strategy="steps", save_steps=1)
    stopped, _, _ = make_trainer(tmp_path, **save)
    stopped.data_collator = StopAfter(12 + 3)  # inside member 1
    with pytest.raises(RuntimeError, match="stopped"):
        stopped.train()
    other, _, _ = make_trainer(tmp_path, **{**save, "cycle_learning_rate": 1e-4})
    with pytest.raises(ValueError, match=r"checkpoint-6: .*cycle_learning_rate"):  # model 1's last checkpoint
        other.train(resume_from_checkpoint=True)
    for path in tmp_path.glob("checkpoint-*"):  # without it, the branch's own checkpoint refuses
        shutil.rmtree(path)
    with pytest.raises(ValueError, match=r"member_01/checkpoint-1: .*cycle_learning_rate"):
        other.train(resume_from_checkpoint=True)


@pytest.mark.slow
def test_sigkill_one_process_mid_branch_and_relaunch_gives_the_same_members(tmp_path):
    """A real SIGKILL of process 1 while it trains member 2 (torchrun then stops process 0, wherever it is);
    relaunching with resume_from_checkpoint=True resumes every unfinished branch from its last checkpoint."""
    options = dict(TWO, save_strategy="steps", save_steps=1, save_total_limit=1, cycle_epochs=2)
    out = tmp_path / "killed"
    launch = subprocess.Popen(
        torchrun((out, {**options, "slow": 0.15})),
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = out / BRANCHES_DIR / "member_02" / "checkpoint-2" / CYCLE_STATE_NAME
    deadline = time.monotonic() + 240
    while not marker.exists() and launch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), launch.stderr.read()[-3000:] if launch.poll() is not None else "timed out"
    os.kill(int((out / "pid1").read_text()), signal.SIGKILL)
    assert launch.wait(timeout=120) != 0
    launch.stderr.close()
    assert not (out / "members" / "member_02").exists()

    proc = subprocess.run(
        torchrun((out, {**options, "resume": True})),
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    after = ranks(out)
    assert after[1]["resumed"].get("2", 0) >= 2  # member 2 continued from its checkpoint, not from step 0
    written = sorted(k for r in after for k in r["written"])
    assert len(written) == len(set(written))  # nothing written twice by the relaunch
    reference = tmp_path / "reference"
    run_here(str(reference), {**ONE, **{k: v for k, v in options.items() if k not in TWO}})
    for k, (a, b) in enumerate(zip(members(out), members(reference), strict=True)):
        assert max_diff(a, b) <= 1e-6, k


# ------------------------------------------------------------------------------------------ config, seeds
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(method="sse"), "sequential by nature"),
        (dict(reset_optimizer=False), "fresh optimizer"),
    ],
)
def test_what_a_parallel_member_cannot_honour_is_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        starsse_config(tmp_path, parallel_members=True, **overrides)
    starsse_config(tmp_path, **overrides)  # fine without parallel_members


def test_parallel_members_reaches_argparse():
    from hf_ens.trainers import StarSSEConfig
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(StarSSEConfig).parse_args_into_dataclasses(
        ["--output_dir", "x", "--parallel_members", "true", "--use_cpu", "true"]
    )
    assert args.parallel_members is True


def test_round_robin_assignment():
    assert [assigned_members(range(1, 5), r, 2) for r in range(2)] == [[1, 3], [2, 4]]
    assert [assigned_members(range(5), r, 3) for r in range(3)] == [[0, 3], [1, 4], [2]]
    assert assigned_members(range(1, 5), 0, 1) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="process_index=2"):
        assigned_members(range(5), 2, 2)


def test_member_seeds_are_a_hash_of_seed_and_member():
    assert branch_seed(42, 0) == 42  # model 1 keeps the run's seed
    seeds = {branch_seed(s, k) for s in range(50) for k in range(1, 20)}
    assert len(seeds) == 50 * 19  # no two (seed, k) share a member seed...
    assert not seeds & set(range(1000))  # ...nor the model 1 of a replicate with a small seed (not seed + k)
    assert all(0 <= s < 2**32 for s in seeds)
    # Local DE's data order per member comes from the same seeds in both loops.
    sampler = MemberSeededSampler(24, 7, epochs_per_member=2)
    assert sampler.seed_of_epoch(5) == (branch_seed(7, 2), 1)


def test_members_and_probes_share_one_seed_hash_with_the_values_of_earlier_releases():
    """One hash (`trainers.cycles.derived_seed`) for members and probes; its values are pinned, since a
    changed seed silently changes every member of a resumed or replicated run."""
    from hf_ens.trainers.cycles import derived_seed, probe_seed

    assert branch_seed(0, 1) == derived_seed(0, "member", 1) == 3216615607
    assert branch_seed(42, 3) == 2770460523
    assert probe_seed(0, 0) == derived_seed(0, "probe", 0) == 1413217473
    assert probe_seed(7, 2) == 149235716
    assert probe_seed(5, 1) != branch_seed(5, 1)  # a probe never replays a member's draws


def test_a_branch_checkpoint_does_not_depend_on_the_number_of_processes(tmp_path):
    one = branch_config(starsse_config(tmp_path, **ONE))
    assert one["member_accumulation"] == 2  # gradient_accumulation_steps x processes, not each alone
    assert "world_size" not in one and "gradient_accumulation_steps" not in one


@pytest.mark.slow
def test_two_processes_give_the_members_of_one_process_on_padded_text(tmp_path):
    """Padded text batches, a short last batch (30 samples, batches of 4), BERT (its own mean loss) and Llama
    (num_items_in_batch): with accelerate's even_batches off, one process x 2 accumulated micro-batches and
    two processes give the same StarSSE members bit for bit; Local DE with dropout 0.1 too (its members are
    trained alone, dropout drawn from (seed, k)). With even_batches on (accelerate's default) the last
    data-parallel batch is refilled with samples from the start of the epoch: other data, other members."""
    no_dropout = {"hidden_dropout_prob": 0, "attention_probs_dropout_prob": 0}
    uneven = {"accelerator_config": {"even_batches": False}}
    runs = {
        "bert": {**TWO, **uneven, "samples": 30, "text": {"family": "bert", **no_dropout}},
        "llama": {**TWO, **uneven, "samples": 30, "text": {"family": "llama"}},
        "local_de": {
            **TWO,
            **LOCAL_DE,
            "samples": 30,
            "text": {"family": "bert", "hidden_dropout_prob": 0.1},
        },
    }
    proc = subprocess.run(
        torchrun(*((tmp_path / f"two_{name}", options) for name, options in runs.items())),
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name, options in runs.items():
        run_here(
            str(tmp_path / f"one_{name}"),
            {**json.loads(json.dumps(options)), "gradient_accumulation_steps": 2},
        )
        for k in range(K):
            two, one = (
                weights(hf_load_member(tmp_path / f"{n}_{name}" / "members" / f"member_{k:02d}"))
                for n in ("two", "one")
            )
            assert max_diff(two, one) == 0.0, (name, k)
