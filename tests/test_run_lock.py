"""One run per output_dir (issue 25, item 5): a second run, overwrite_output_dir included, is refused with one
line naming the holder; the lock goes when the run ends, however it ends."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from hf_ens.trainers.run_lock import LOCK_NAME, OWNER_NAME, RunLockedError, run_lock
from transformers import TrainerCallback

from hf_ens.testing_utils import one_torch_thread
from tests._trainer_utils import make_trainer

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)


class StartSecondRun(TrainerCallback):
    """At the first step of run A, start run B into the same directory and record what happens."""

    def __init__(self, out, **overrides):
        self.out, self.overrides, self.error = out, overrides, None

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1 and self.error is None:
            second, _, _ = make_trainer(self.out, model_seed=1, seed=1, **self.overrides)
            with pytest.raises(RunLockedError) as err:
                second.train()
            self.error = str(err.value)


@pytest.mark.parametrize("overrides", [{}, {"overwrite_output_dir": True}], ids=["fresh", "overwrite"])
def test_a_second_run_into_a_busy_output_dir_is_refused_naming_the_holder(tmp_path, overrides):
    probe = StartSecondRun(tmp_path, **overrides)
    first, _, _ = make_trainer(
        tmp_path, num_members=2, num_train_epochs=1, cycle_epochs=0.5, callbacks=[probe]
    )
    first.train()
    assert probe.error is not None and "\n" not in probe.error
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in probe.error
    assert sorted(os.listdir(first.members_dir)) == ["member_00", "member_01"]  # A's members, untouched
    assert not {LOCK_NAME, OWNER_NAME} & set(os.listdir(tmp_path))  # released and removed


def test_the_lock_is_released_when_training_fails(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, num_members=2, num_train_epochs=1, cycle_epochs=0.5)
    trainer.train_dataset = None
    with pytest.raises(ValueError):
        trainer.train()
    with run_lock(tmp_path):  # free again in this very process
        pass
    assert os.listdir(tmp_path) == []


HOLD = """
import sys, time
from hf_ens.trainers.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_killed_runs_lock_is_not_stale(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"pid {proc.pid} on host"):
            with run_lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert OWNER_NAME in os.listdir(tmp_path)  # a killed holder leaves its owner file...
    with run_lock(tmp_path):  # ...but no lock: the kernel dropped it
        pass


TWO_RUNS = """
import os, sys, time
from transformers import TrainerCallback
from tests._trainer_utils import make_trainer
from hf_ens.trainers.run_lock import RunLockedError

out, seed, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Slow(TrainerCallback):  # keeps the run busy long enough for the other to start
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1:
            time.sleep(3)

trainer, _, _ = make_trainer(out, model_seed=seed, seed=seed, num_members=2, num_train_epochs=1,
                             cycle_epochs=0.5, callbacks=[Slow()])
while not os.path.exists(go):
    time.sleep(0.01)
try:
    trainer.train()
    import hashlib
    files = sorted(p for p in __import__("pathlib").Path(out, "members").rglob("*") if p.is_file())
    print("trained", seed, hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest())
except RunLockedError as e:
    print("refused", e)
"""


@pytest.mark.slow
def test_two_runs_started_together_one_trains_one_is_refused(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(TWO_RUNS), str(out), str(seed), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1)
    ]
    time.sleep(1)
    go.touch()
    results = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(r.split()[0] for r in results) == ["refused", "trained"], results
    winner = next(r for r in results if r.startswith("trained")).split()[2]
    loser = next(p for p, r in zip(procs, results, strict=True) if r.startswith("refused"))
    holder = procs[1 - procs.index(loser)]
    assert f"pid {holder.pid} on host" in next(r for r in results if r.startswith("refused"))
    assert sorted(os.listdir(out / "members")) == ["member_00", "member_01"]
    files = sorted(p for p in (out / "members").rglob("*") if p.is_file())
    assert hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest() == winner  # its members only


@pytest.mark.slow
def test_a_refused_distributed_run_stops_every_process(tmp_path):
    """torchrun, 2 processes (gloo): the main process is refused; the other stops too instead of hanging."""
    from hf_ens.testing_utils import free_port
    from tests._recipe_utils import ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
    ]
    cmd += [
        "--master_port",
        str(free_port()),
        os.path.join(ROOT, "tests", "_trainer_ddp_run.py"),
        str(tmp_path),
    ]
    with run_lock(tmp_path):
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count(f"RunLockedError: output_dir {str(tmp_path)!r} is in use by another run") == 2
    assert not os.path.exists(tmp_path / "members")
