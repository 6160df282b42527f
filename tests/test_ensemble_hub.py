"""Ensembles through the local test Hub: one-commit push, load back, revision pinning, failures."""

import copy
import os
import tempfile

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForImageClassification, ViTForImageClassification, ViTImageProcessor

from hf_ens import EnsembleLoadError, EnsembleModel, HubPushError, NonFiniteError
from hf_ens.testing_utils import random_images, tiny_vit_config
from tests._safety import make_hostile
from tests._safety import rehash as _rehash

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO = "test-user/tiny-vit-starsse"


def trained_members(k: int = 3, steps: int = 3) -> list[ViTForImageClassification]:
    """K tiny ViTs, each fine-tuned a few SGD steps from one shared initialisation (like StarSSE branches)."""
    torch.manual_seed(0)
    cfg = tiny_vit_config()
    base = ViTForImageClassification(cfg)
    members = []
    for seed in range(k):
        model = ViTForImageClassification(cfg)
        model.load_state_dict(base.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            x, y = random_images(8, generator=g)
            model(pixel_values=x, labels=y).loss.backward()
            opt.step()
            opt.zero_grad()
        members.append(model.eval())
    return members


@pytest.fixture(scope="module")
def members():
    return trained_members()


@pytest.fixture
def pushed(hub, members):
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    ens = EnsembleModel.from_members(members, processor=processor, metadata={"method": "starsse", "seed": 0})
    api = HfApi()
    ens.push_to_hub(REPO, private=True)
    return ens, api


def _commits(api: HfApi) -> list:
    return api.list_repo_commits(REPO)


def test_push_is_one_commit_and_roundtrips(pushed):
    ens, api = pushed
    commits = _commits(api)
    files = set(api.list_repo_files(REPO))
    assert {"ensemble_config.json", "README.md", "config.json", "model.safetensors"} <= files
    assert {f"member_{k:02d}/model.safetensors" for k in range(3)} <= files
    # everything arrived in one commit (create_repo may add an initial empty one)
    assert len([c for c in commits if "hf-ens" in c.title]) == 1

    x = torch.randn(4, 3, 16, 16)
    loaded = EnsembleModel.from_pretrained(REPO)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, ens(pixel_values=x).logits)
        member = AutoModelForImageClassification.from_pretrained(REPO, subfolder="member_02")
        assert torch.equal(member(pixel_values=x).logits, ens.members[2](pixel_values=x).logits)
        soup = AutoModelForImageClassification.from_pretrained(REPO)
        assert torch.equal(soup(pixel_values=x).logits, ens.soup()(pixel_values=x).logits)
    assert loaded.metadata["method"] == "starsse" and loaded.processor is not None


def test_revision_pinning(pushed, members):
    ens, api = pushed
    first = _commits(api)[0].commit_id
    EnsembleModel.from_members(members[:2]).push_to_hub(REPO, commit_message="two members")
    assert EnsembleModel.from_pretrained(REPO).num_members == 2
    old = EnsembleModel.from_pretrained(REPO, revision=first)
    assert old.num_members == 3
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(old(pixel_values=x).logits, ens(pixel_values=x).logits)


def test_push_failing_midway_commits_nothing_and_keeps_local_dir(hub, members, tmp_path):
    ens = EnsembleModel.from_members(members)
    local = ens.save_pretrained(tmp_path / "local")
    before = {p: p.read_bytes() for p in local.rglob("*") if p.is_file()}
    HfApi().create_repo(REPO)
    hub.crash_on(r"POST /api/models/.*/commit/")
    with pytest.raises(HubPushError, match="Nothing was committed"):
        ens.push_to_hub(REPO)
    assert {p: p.read_bytes() for p in local.rglob("*") if p.is_file()} == before
    hub.start()
    assert "ensemble_config.json" not in HfApi().list_repo_files(REPO)


def test_push_to_stopped_server_raises_clear_error(hub, members):
    hub.stop()
    with pytest.raises(HubPushError, match="test-user/tiny-vit-starsse"):
        EnsembleModel.from_members(members).push_to_hub(REPO)


def test_missing_member_file_on_hub_names_the_file(pushed, hub):
    hub.delete_file(REPO, "member_01/model.safetensors")
    with pytest.raises(EnsembleLoadError, match=r"member_01[/\\]model\.safetensors"):
        EnsembleModel.from_pretrained(REPO)


def test_corrupted_member_file_on_hub_names_the_file(pushed, hub):
    hub.corrupt_file(REPO, "member_02/model.safetensors")
    with pytest.raises(EnsembleLoadError, match=r"member_02[/\\]model\.safetensors"):
        EnsembleModel.from_pretrained(REPO)


@pytest.mark.usefixtures("closed_stdin")
def test_hub_repo_with_auto_map_is_refused_and_no_py_is_downloaded(hub, members, tmp_path):
    saved = EnsembleModel.from_members(members[:2]).save_pretrained(tmp_path / "hostile")
    marker = tmp_path / "marker"
    make_hostile(saved / "member_01", "config.json", marker)
    _rehash(saved)
    api = HfApi()
    api.create_repo("test-user/hostile")
    api.upload_folder(repo_id="test-user/hostile", folder_path=saved)
    assert "member_01/hostile.py" in api.list_repo_files("test-user/hostile")
    with pytest.raises(EnsembleLoadError, match=r"member_01[/\\]config\.json.*auto_map"):
        EnsembleModel.from_pretrained("test-user/hostile")
    assert not marker.exists()
    assert not list((tmp_path / "hf_home").rglob("*.py"))  # the code never reached this machine


def test_same_size_byte_flip_on_hub_names_the_file(pushed, hub):
    original = hub.read_file(REPO, "member_02/model.safetensors")
    flipped = original[:-1] + bytes([original[-1] ^ 1])
    hub.corrupt_file(REPO, "member_02/model.safetensors", data=flipped)
    with pytest.raises(EnsembleLoadError, match=r"member_02[/\\]model\.safetensors.*SHA-256"):
        EnsembleModel.from_pretrained(REPO)


def test_missing_repo_and_missing_revision_are_told_apart(pushed):
    with pytest.raises(EnsembleLoadError, match="Repository 'test-user/no-such-repo' not found"):
        EnsembleModel.from_pretrained("test-user/no-such-repo")
    with pytest.raises(EnsembleLoadError, match=f"Revision 'v9' not found in '{REPO}'"):
        EnsembleModel.from_pretrained(REPO, revision="v9")


def test_nonfinite_member_is_refused_before_anything_is_pushed(hub, members):
    broken = copy.deepcopy(members)
    with torch.no_grad():
        broken[2].classifier.weight[1, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"member 2 \(member_02\)"):
        EnsembleModel.from_members(broken).push_to_hub(REPO)
    assert not HfApi().repo_exists(REPO)


def test_pushed_files_hold_no_local_path(hub, members, tmp_path):
    base = tmp_path / "cache" / "hf_ens" / "pretrained" / "vit-fmnist-0123abcd"
    base.mkdir(parents=True)
    metadata = {"method": "starsse", "base_model": str(base), "dataset": "offline:fashion_mnist"}
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    loaded = [AutoModelForImageClassification.from_pretrained(p) for p in _saved_members(members, base)]
    ens = EnsembleModel.from_members(loaded, processor=processor, metadata=metadata)
    ens.push_to_hub(REPO, metrics={"ensemble/accuracy": 0.5})
    forbidden = {str(tmp_path), str(base), os.path.expanduser("~"), tempfile.gettempdir()}
    files = HfApi().list_repo_files(REPO)
    assert "README.md" in files and "member_00/config.json" in files
    for name in files:
        data = hub.read_file(REPO, name)
        for path in forbidden:
            assert path.encode() not in data, f"{name} holds {path}"
    card = ModelCard(hub.read_file(REPO, "README.md").decode())
    assert card.data.base_model is None and card.data.datasets is None
    assert "a local checkpoint (`vit-fmnist-0123abcd`)" in card.text
    assert "offline copy of `fashion_mnist`" in card.text and "huggingface.co/local" not in card.text


def _saved_members(members, base):
    """Member directories under `base` (so each loaded config remembers an absolute local path)."""
    paths = []
    for k, m in enumerate(members):
        m.save_pretrained(base / f"m{k}")
        paths.append(base / f"m{k}")
    return paths
