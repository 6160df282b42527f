"""Ensembles through the local test Hub: one-commit push, load back, revision pinning, failures."""

import pytest
import torch
from huggingface_hub import HfApi
from transformers import AutoModelForImageClassification, ViTForImageClassification, ViTImageProcessor

from hf_ens import EnsembleLoadError, EnsembleModel, HubPushError
from tests._tiny import random_images, tiny_vit_config

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
