"""StarSSETrainer with two real processes on CPU (torchrun, gloo): same members, no hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import ViTForImageClassification

from hf_ens.testing_utils import free_port
from tests._trainer_ddp_run import digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_two_process_starsse_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        os.path.join(ROOT, "tests", "_trainer_ddp_run.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["torch_world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    # Each member written once, by the main process only.
    assert ranks[0]["written"] == [0, 1, 2] and ranks[1]["written"] == []
    assert sorted(os.listdir(tmp_path / "members")) == ["member_00", "member_01", "member_02"]
    # Every rank reloads model 1 identically at each cycle start, and ends identical.
    member0 = digest(ViTForImageClassification.from_pretrained(tmp_path / "members" / "member_00"))
    assert ranks[0]["start_digests"] == ranks[1]["start_digests"] == {"12": member0, "18": member0}
    assert ranks[0]["final_digest"] == ranks[1]["final_digest"]
    last = digest(ViTForImageClassification.from_pretrained(tmp_path / "members" / "member_02"))
    assert ranks[0]["final_digest"] == last
