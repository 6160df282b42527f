"""The local test Hub (tests/hub_server.py) against the REAL clients: huggingface_hub, transformers, datasets.

If these pass, other tests can trust the `hub` fixture to behave like the Hub for what hf-ens does with it.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx2
import pytest
import torch
from huggingface_hub import (
    HfApi,
    HfFileSystem,
    ModelCard,
    ModelCardData,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session
from safetensors.torch import save_file

from hf_ens.testing_utils import tiny_vit


def _tiny_vit(seed: int = 0):
    return tiny_vit(seed, patch_size=8)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_create_repo_upload_regular_and_lfs_download_back(hub, tmp_path):
    api = HfApi()
    assert api.whoami()["name"] == "test-user"
    url = api.create_repo("test-user/files", private=True)
    assert url.repo_id == "test-user/files"
    api.create_repo("test-user/files", exist_ok=True)  # idempotent
    with pytest.raises(HfHubHTTPError):
        api.create_repo("test-user/files")  # 409 without exist_ok

    folder = tmp_path / "up"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("hello hub\n")
    weights = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    save_file(weights, folder / "sub" / "model.safetensors")
    info = api.upload_folder(repo_id="test-user/files", folder_path=folder, commit_message="add files")
    assert len(info.oid) == 40

    # The safetensors file took the LFS route (batch + PUT), the text file went inline in the commit.
    assert any(r.endswith(".git/info/lfs/objects/batch") for r in hub.requests)
    assert any(r.startswith("PUT /lfs-upload/") for r in hub.requests)
    files = {f.path: f for f in api.list_repo_tree("test-user/files", recursive=True) if hasattr(f, "size")}
    assert files["sub/model.safetensors"].lfs is not None and files["notes.txt"].lfs is None

    for name in ("notes.txt", "sub/model.safetensors"):
        local = hf_hub_download("test-user/files", name)
        assert open(local, "rb").read() == (folder / name).read_bytes()

    model_info = api.model_info("test-user/files", files_metadata=True)
    assert model_info.private is True and model_info.sha == info.oid
    siblings = {s.rfilename: s for s in model_info.siblings}
    assert siblings["sub/model.safetensors"].lfs.size == (folder / "sub" / "model.safetensors").stat().st_size
    assert [p.path for p in api.get_paths_info("test-user/files", ["sub", "notes.txt", "nope"])] == [
        "sub",
        "notes.txt",
    ]
    assert api.file_exists("test-user/files", "notes.txt") and not api.file_exists("test-user/files", "x.txt")

    # Private repo: anonymous access is refused as "not found", like the Hub.
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("test-user/files", token=False)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("test-user/files", "missing.txt")


def test_revisions_branches_and_tags(hub, tmp_path):
    api = HfApi()
    api.create_repo("test-user/revs")
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id="test-user/revs").oid
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id="test-user/revs").oid
    assert first != second

    def read(revision):
        return open(hf_hub_download("test-user/revs", "f.txt", revision=revision), "rb").read()

    assert read(None) == b"v2"
    assert read(first) == b"v1"
    assert read(second) == b"v2"
    api.create_tag("test-user/revs", tag="v1.0", revision=first)
    api.create_branch("test-user/revs", branch="dev", revision=first)
    api.create_branch("test-user/revs", branch="dev", exist_ok=True)
    assert read("v1.0") == b"v1" and read("dev") == b"v1"
    refs = api.list_repo_refs("test-user/revs")
    assert {b.name for b in refs.branches} == {"main", "dev"} and refs.tags[0].target_commit == first
    assert [c.commit_id for c in api.list_repo_commits("test-user/revs")][:2] == [second, first]
    with pytest.raises(RevisionNotFoundError):
        read("no-such-branch")

    # snapshot_download and HfFileSystem (ranged reads) honour the revision too
    snapshot = snapshot_download("test-user/revs", revision=first)
    assert (tmp_path / snapshot / "f.txt").read_bytes() == b"v1"
    fs = HfFileSystem()
    assert fs.cat_file("test-user/revs/f.txt") == b"v2"
    assert fs.cat_file(f"test-user/revs@{first}/f.txt") == b"v1"
    with fs.open("test-user/revs/f.txt", "rb", block_size=1) as f:
        f.seek(1)
        assert f.read(1) == b"2"

    api.update_repo_settings("test-user/revs", private=True)
    assert api.model_info("test-user/revs").private is True
    api.delete_repo("test-user/revs")
    assert not api.repo_exists("test-user/revs")


def test_transformers_from_pretrained_with_revision_and_subfolder(hub, tmp_path):
    from transformers import ViTForImageClassification

    api = HfApi()
    repo_id = "test-user/tiny-vit"
    api.create_repo(repo_id)
    old, new = _tiny_vit(seed=0), _tiny_vit(seed=1)
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new")
    first = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "old").oid
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "new")
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "old", path_in_repo="member_00")

    _assert_same_weights(ViTForImageClassification.from_pretrained(repo_id), new)
    _assert_same_weights(ViTForImageClassification.from_pretrained(repo_id, revision=first), old)
    _assert_same_weights(ViTForImageClassification.from_pretrained(repo_id, subfolder="member_00"), old)

    # push_to_hub (transformers' own upload path) round-trips as well
    new.push_to_hub("test-user/pushed")
    _assert_same_weights(ViTForImageClassification.from_pretrained("test-user/pushed"), new)


def test_model_card_push_validates_yaml(hub):
    HfApi().create_repo("test-user/carded")
    card = ModelCard.from_template(ModelCardData(library_name="transformers", tags=["hf-ens"], license="mit"))
    card.validate()
    card.push_to_hub("test-user/carded")
    assert ModelCard.load("test-user/carded").data.tags == ["hf-ens"]
    assert HfApi().model_info("test-user/carded").card_data.license == "mit"
    # Metadata that is not a mapping is rejected by the server's validate-yaml (HTTP 400).
    response = get_session().post(
        f"{hub.endpoint}/api/validate-yaml",
        json={"content": "---\n- a\n- b\n---\n# card", "repoType": "model"},
    )
    assert response.status_code == 400


def test_load_dataset_by_name_from_parquet(hub, tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    # CIFAR-shaped: `img` (datasets.Image) and `label` (ClassLabel) columns
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(4)]
    labels = [0, 1, 1, 0]
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}
    )
    ds = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)

    # a parquet file uploaded with HfApi...
    api = HfApi()
    api.create_repo("test-user/tiny-cifar", repo_type="dataset")
    (tmp_path / "data").mkdir()
    ds.to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    api.upload_folder(
        repo_id="test-user/tiny-cifar",
        repo_type="dataset",
        folder_path=tmp_path / "data",
        path_in_repo="data",
    )
    loaded = datasets.load_dataset("test-user/tiny-cifar", split="train")
    assert loaded["label"] == labels and loaded.features["label"].names == ["cat", "dog"]
    assert [np.asarray(im).tolist() for im in loaded["img"]] == [np.asarray(im).tolist() for im in images]

    # ... and datasets' own upload path (push_to_hub, with a dataset card), loaded by name and revision
    ds.push_to_hub("test-user/pushed-ds")
    first = HfApi().dataset_info("test-user/pushed-ds").sha
    ds.select(range(2)).push_to_hub("test-user/pushed-ds")
    assert datasets.load_dataset("test-user/pushed-ds", split="train").num_rows == 2
    assert datasets.load_dataset("test-user/pushed-ds", split="train", revision=first)["label"] == labels


def test_stopped_server_fails_fast_and_restarts(hub):
    api = HfApi()
    api.create_repo("test-user/outage")
    api.upload_file(path_or_fileobj=b"data", path_in_repo="f.txt", repo_id="test-user/outage")
    hub.stop()
    start = time.monotonic()
    with pytest.raises((httpx2.ConnectError, LocalEntryNotFoundError)):
        hf_hub_download("test-user/outage", "f.txt")
    with pytest.raises(httpx2.ConnectError):
        api.upload_file(path_or_fileobj=b"more", path_in_repo="g.txt", repo_id="test-user/outage")
    assert time.monotonic() - start < 5
    hub.start()  # same port, repos kept
    assert open(hf_hub_download("test-user/outage", "f.txt"), "rb").read() == b"data"


def test_subprocesses_reach_the_hub_through_the_environment(hub):
    """Recipes run under `accelerate launch`: a child process must find the same Hub, token and settings."""
    HfApi().create_repo("test-user/env")
    HfApi().upload_file(path_or_fileobj=b"from env", path_in_repo="f.txt", repo_id="test-user/env")
    code = "import huggingface_hub as h; print(open(h.hf_hub_download('test-user/env', 'f.txt')).read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "from env"


def test_crash_midway_and_tampered_files(hub, tmp_path):
    api = HfApi()
    api.create_repo("test-user/broken")
    (tmp_path / "a.txt").write_text("a")
    save_file({"w": torch.ones(4)}, tmp_path / "model.safetensors")
    hub.crash_on(r"POST /api/models/.*/commit/")
    with pytest.raises((httpx2.HTTPError, HfHubHTTPError)):
        api.upload_folder(repo_id="test-user/broken", folder_path=tmp_path)
    assert not hub.running
    hub.start()
    assert not api.file_exists("test-user/broken", "a.txt")  # nothing committed
    api.upload_folder(repo_id="test-user/broken", folder_path=tmp_path)

    hub.corrupt_file("test-user/broken", "model.safetensors")
    with pytest.raises(OSError, match="model.safetensors"):  # the client notices the size mismatch
        hf_hub_download("test-user/broken", "model.safetensors")
    hub.delete_file("test-user/broken", "a.txt")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("test-user/broken", "a.txt")


def test_fixture_patches_are_undone(hub):
    """The session's offline settings come back after a `hub` test (checked on a second, nested patch)."""
    from tests.hub_server import connect_clients

    assert constants.ENDPOINT == hub.endpoint and not constants.HF_HUB_OFFLINE
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "ENDPOINT", "http://elsewhere")
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.MonkeyPatch.context() as inner:
            connect_clients(hub, "/tmp/unused-hf-home", inner)
            assert constants.ENDPOINT == hub.endpoint and not constants.HF_HUB_OFFLINE
        assert constants.ENDPOINT == "http://elsewhere" and constants.HF_HUB_OFFLINE


def test_transformers_push_after_an_offline_lookup_reaches_the_test_hub(request, tmp_path):
    """transformers makes its shared HfApi on first use: an offline Hub lookup before the fixture (as
    transformers' own ConfigTester does) must not freeze huggingface.co into later pushes."""
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.utils import hub as transformers_hub

    with pytest.raises(OSError):
        ViTConfig.from_pretrained("./no/such-local-dir-or-repo")  # offline: a Hub lookup that fails
    transformers_hub.hf_api()  # made now, with the session's endpoint
    hub = request.getfixturevalue("hub")
    model = _tiny_vit(seed=0)
    model.push_to_hub("test-user/after-offline")
    assert transformers_hub.hf_api().endpoint == hub.endpoint
    _assert_same_weights(ViTForImageClassification.from_pretrained("test-user/after-offline"), model)
