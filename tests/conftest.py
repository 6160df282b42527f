"""Shared pytest fixtures. Keep this file small: one fixture per idea, each with a comment saying why.

`hub`: a local Hugging Face Hub (tests/hub_server.py) that the in-process huggingface_hub, transformers and
datasets clients talk to for the duration of one test. Usage::

    def test_roundtrip(hub):
        api = HfApi()                                   # endpoint and token come from the fixture
        api.create_repo("test-user/tiny-vit")
        model.push_to_hub("test-user/tiny-vit")         # or api.upload_folder(...)
        ViTForImageClassification.from_pretrained("test-user/tiny-vit", revision=...)
        datasets.load_dataset("test-user/tiny-cifar", split="train")   # dataset repo with parquet files

    hub.endpoint, hub.token, hub.stop(), hub.start()    # outage: stop() then expect a connection error
    hub.crash_on(r"POST /api/models/.*/commit/")         # die midway through a push
    hub.corrupt_file(repo_id, "model.safetensors"); hub.delete_file(repo_id, "member_01/model.safetensors")

Why all the patching: huggingface_hub, transformers and datasets copy HF_ENDPOINT, HF_HUB_OFFLINE,
HF_HUB_DISABLE_XET and the cache paths into module globals at import time, and `make test` runs with
HF_HUB_OFFLINE=1, so environment variables alone would not reach clients that are already imported.
Everything is patched with `monkeypatch`: restored after the test, so offline tests stay offline. Environment
variables are set too, so subprocesses started by a test (e.g. `accelerate launch`) talk to the same server.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.hub_server import HubServer, connect_clients, drop_client_state

# Tiny models run many times slower with 2 intra-op threads on a 2-core box (thread hand-off dominates), and
# a test's numbers must not depend on the thread count: every test runs single-threaded.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_again():
    """An in-process recipe run pins torch threads (offline.yaml: 2); later tests compare runs bit for bit."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def _hub_server():
    """One server process-wide (cheap to keep, ~0 CPU when idle); `hub` resets its state for every test."""
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def hub(_hub_server: HubServer, tmp_path, monkeypatch) -> HubServer:
    """A fresh, empty local Hub with the in-process clients pointed at it (see the module docstring)."""
    _hub_server.start()  # a previous test may have stopped it
    _hub_server.reset()
    connect_clients(_hub_server, str(tmp_path / "hf_home"), monkeypatch)
    yield _hub_server
    _hub_server.start()
    drop_client_state()
    # A 500 means the test Hub lacks something a client needed: surface it instead of a confusing retry error.
    assert not _hub_server.errors, "test Hub internal errors:\n" + "\n".join(_hub_server.errors)


@pytest.fixture
def closed_stdin(monkeypatch):
    """A "run the custom code? [y/N]" prompt would fail on this stdin instead of waiting or being answered."""
    stdin = open(os.devnull)
    stdin.close()
    monkeypatch.setattr(sys, "stdin", stdin)
