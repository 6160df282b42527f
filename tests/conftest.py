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

import importlib
import inspect
import os

import pytest

from tests.hub_server import HubServer


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
    _connect_clients(_hub_server, str(tmp_path / "hf_home"), monkeypatch)
    yield _hub_server
    _hub_server.start()
    _drop_client_state()


def _connect_clients(server: HubServer, hf_home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = server.endpoint
    hub_cache = os.path.join(hf_home, "hub")
    datasets_cache = os.path.join(hf_home, "datasets")

    # Environment: read at call time by some code paths and inherited by subprocesses.
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": server.token,
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HF_DATASETS_CACHE": datasets_cache,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",  # the test Hub speaks LFS only
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",  # a local server answers in ms; never wait 10 s on a dead one
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    # huggingface_hub: module-level copies made at import time.
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HUGGINGFACE_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HF_XET_CACHE": os.path.join(hf_home, "xet"),
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),  # never read the developer's stored token
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "HF_HUB_ETAG_TIMEOUT": 5,
        "HF_HUB_DOWNLOAD_TIMEOUT": 5,
    }.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    # The module-level `HfApi()` behind `huggingface_hub.create_repo`, `upload_folder`, ... froze its
    # endpoint.
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # Retries back off 1, 2, 4, 8, 8 s: keep the retries (they are real client behaviour) but not the waiting,
    # so a stopped server fails in well under a second instead of ~25 s.
    for fn in (_http.http_backoff, _http.http_stream_backoff):
        fn = inspect.unwrap(fn)  # http_stream_backoff is a @contextmanager
        monkeypatch.setitem(fn.__kwdefaults__, "base_wait_time", 0.01)
        monkeypatch.setitem(fn.__kwdefaults__, "max_wait_time", 0.02)

    # datasets: its own frozen copies of the endpoint, offline flag and cache paths.
    datasets_config = importlib.import_module("datasets.config")
    for name, value in {
        "HF_ENDPOINT": endpoint,
        "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_CACHE_HOME": hf_home,
        "HF_DATASETS_CACHE": _as_path(datasets_cache),
        "HF_MODULES_CACHE": _as_path(os.path.join(hf_home, "modules")),
        "DOWNLOADED_DATASETS_PATH": _as_path(os.path.join(datasets_cache, "downloads")),
        "EXTRACTED_DATASETS_PATH": _as_path(os.path.join(datasets_cache, "downloads", "extracted")),
        "USE_PARQUET_EXPORT": False,  # would ask the dataset viewer service on the internet
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
    }.items():
        monkeypatch.setattr(datasets_config, name, value)

    # transformers reads the endpoint and offline flag from huggingface_hub at call time; only the remote-code
    # module cache is frozen.
    transformers_hub = importlib.import_module("transformers.utils.hub")
    monkeypatch.setattr(transformers_hub, "HF_MODULES_CACHE", os.path.join(hf_home, "modules"))

    _drop_client_state()


def _as_path(path: str):
    from pathlib import Path

    return Path(path)


def _drop_client_state() -> None:
    """Pooled connections and cached filesystems (with their listing caches) must not leak between tests."""
    from huggingface_hub import HfFileSystem, close_session

    close_session()
    HfFileSystem.clear_instance_cache()
