"""LoRA members (hf_ens.adapters): exact soups, the adapter ensemble, its repo layout, the Hub round trip."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import HfApi
from peft import LoraConfig, PeftModel
from transformers import AutoModelForImageClassification, ViTForImageClassification, ViTImageProcessor

from hf_ens import EnsembleConfig, EnsembleLoadError, EnsembleModel, uniform_soup
from hf_ens.adapters import (
    AdapterEnsembleModel,
    check_lora,
    lora_uniform_soup,
    member_weights,
    save_adapter,
)
from hf_ens.testing_utils import TINY_LORA as LORA
from hf_ens.testing_utils import one_torch_thread, random_images, tiny_lora_vit, tiny_vit
from tests._safety import make_hostile
from tests._safety import rehash as _rehash

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
_one_thread = pytest.fixture(autouse=True)(one_torch_thread)

X = random_images(4, seed=5)[0]
REPO, BASE_REPO = "test-user/tiny-vit-lora", "test-user/tiny-vit-base"


def lora_model(**overrides) -> PeftModel:
    return tiny_lora_vit(0, **overrides)


def train_adapters(folder, k: int = 3, steps: int = 3, **overrides) -> list:
    """K adapters of the same tiny base, each trained a few SGD steps on its own data (B != 0 afterwards)."""
    paths = []
    for seed in range(k):
        model = lora_model(**overrides).train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x, y = random_images(8, generator=g)
            model(pixel_values=x, labels=y).loss.backward()
            opt.step()
            opt.zero_grad()
        save_adapter(model, "default", folder / f"adapter_{seed}")
        paths.append(folder / f"adapter_{seed}")
    return paths


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return train_adapters(tmp_path_factory.mktemp("adapters"))


def merged(path) -> ViTForImageClassification:
    """peft's own merge of one member: the reference the exact soup is checked against."""
    return PeftModel.from_pretrained(tiny_vit(0), str(path)).merge_and_unload().eval()


def logits(model, x=X) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).logits


def max_diff(a, b) -> float:
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_members_are_adapters_and_forward_averages_member_probabilities(adapters):
    ens = AdapterEnsembleModel.from_adapters(tiny_vit(0), adapters)
    assert isinstance(ens, EnsembleModel) and ens.num_members == 3
    assert ens.config.member_format == "peft_lora" and ens.config.members == [
        "member_00",
        "member_01",
        "member_02",
    ]
    bases = [m for m in ens.modules() if isinstance(m, ViTForImageClassification)]
    assert len(bases) == 1  # one base, K adapters
    out = ens(pixel_values=X)
    for k, path in enumerate(adapters):
        assert torch.allclose(out.member_logits[k], logits(merged(path)), atol=1e-5)
    probs = out.member_logits.softmax(-1).mean(0)
    assert torch.allclose(out.logits.exp(), probs, atol=1e-6)
    assert not any(
        p.requires_grad for n, p in ens.named_parameters() if "lora_" in n
    )  # views change no flags


def test_exact_soup_is_the_average_of_the_merged_members(adapters):
    ens = AdapterEnsembleModel.from_adapters(tiny_vit(0), adapters)
    soup = ens.soup()
    assert type(soup) is ViTForImageClassification  # a plain model: no peft layers left
    reference = uniform_soup([merged(p) for p in adapters])
    assert max_diff(soup, reference) <= 1e-6
    # what the soup is NOT: averaging A and B separately (mean(B A) != mean(B) mean(A))
    naive = PeftModel.from_pretrained(tiny_vit(0), str(adapters[0]))
    states = [PeftModel.from_pretrained(tiny_vit(0), str(p)).state_dict() for p in adapters]
    naive.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    assert max_diff(naive.merge_and_unload(), reference) > 1e-3
    # the soup as ONE adapter of rank sum r_k is exact too
    assert torch.allclose(logits(ens.soup_adapter()), logits(soup), atol=1e-5)
    weighted = lora_uniform_soup(ens.peft_model, ["member_00", "member_01"], weights=[3.0, 1.0])
    expected = {
        k: (3 * a + b) / 4
        for (k, a), b in zip(
            merged(adapters[0]).state_dict().items(), merged(adapters[1]).state_dict().values(), strict=True
        )
    }
    assert max(float((weighted.state_dict()[k] - v).abs().max()) for k, v in expected.items()) <= 1e-6


def test_unsupported_adapters_are_refused():
    with pytest.raises(ValueError, match="use_dora"):
        check_lora(LoraConfig(**LORA, use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        check_lora(LoraConfig(**LORA, init_lora_weights="pissa"))


def test_save_load_roundtrip_and_repo_layout(adapters, tmp_path):
    base_dir = tmp_path / "base"
    tiny_vit(0).save_pretrained(base_dir)
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    ens = AdapterEnsembleModel.from_adapters(
        tiny_vit(0), adapters, processor=processor, metadata={"method": "sse"}
    )
    saved = ens.save_pretrained(tmp_path / "repo")
    files = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert {
        "member_00/adapter_config.json",
        "member_00/adapter_model.safetensors",
        "config.json",
        "model.safetensors",
        "ensemble_config.json",
        "README.md",
        "preprocessor_config.json",
    } <= files
    assert not any(f.startswith("member_") and f.endswith("/model.safetensors") for f in files)
    cfg = json.loads((saved / "ensemble_config.json").read_text())
    assert (
        cfg["member_format"] == "peft_lora" and cfg["base_model"] == "local:base" or cfg["base_model"] is None
    )
    # size: one model (the root soup) plus K small adapters, not K models
    root = (saved / "model.safetensors").stat().st_size
    adapter = (saved / "member_00" / "adapter_model.safetensors").stat().st_size
    assert adapter < root / 4

    with pytest.raises(EnsembleLoadError, match="base_model="):  # a local base cannot be found by name
        EnsembleModel.from_pretrained(saved)
    loaded = EnsembleModel.from_pretrained(saved, base_model=base_dir)
    assert isinstance(loaded, AdapterEnsembleModel) and loaded.processor is not None
    assert torch.equal(logits(loaded), logits(ens))
    assert loaded.metadata["method"] == "sse"
    soup = AutoModelForImageClassification.from_pretrained(saved)
    assert type(soup) is ViTForImageClassification and torch.equal(logits(soup), logits(ens.soup()))
    with pytest.raises(EnsembleLoadError, match="does not hold the weights"):
        EnsembleModel.from_pretrained(
            saved, base_model=tiny_vit(1)
        )  # another base: refused, not silently used
    with pytest.raises(ValueError, match="from_pretrained"):
        AutoModelForImageClassification.from_config(EnsembleConfig.from_pretrained(saved))


@pytest.mark.usefixtures("closed_stdin")
def test_tampered_or_hostile_adapters_are_refused(adapters, tmp_path):
    base = tiny_vit(0)
    saved = AdapterEnsembleModel.from_adapters(base, adapters).save_pretrained(tmp_path / "repo")
    weights = saved / "member_01" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(EnsembleLoadError, match=r"member_01[/\\]adapter_model\.safetensors.*SHA-256"):
        EnsembleModel.from_pretrained(saved, base_model=base)
    weights.write_bytes(data)
    marker = tmp_path / "marker"
    make_hostile(saved / "member_02", "adapter_config.json", marker)
    _rehash(saved)
    with pytest.raises(EnsembleLoadError, match=r"member_02[/\\]adapter_config\.json.*auto_map"):
        EnsembleModel.from_pretrained(saved, base_model=base)
    assert not marker.exists()


def test_hub_roundtrip_identical_predictions_and_plain_root(hub, adapters, tmp_path):
    api = HfApi()
    api.create_repo(BASE_REPO)
    tiny_vit(0).push_to_hub(BASE_REPO)
    base = ViTForImageClassification.from_pretrained(BASE_REPO)
    ens = AdapterEnsembleModel.from_adapters(
        base,
        adapters,
        processor=ViTImageProcessor(size={"height": 16, "width": 16}),
        metadata={"method": "starsse", "base_model": BASE_REPO},
    )
    assert ens.config.base_model == BASE_REPO
    ens.push_to_hub(REPO)
    files = set(api.list_repo_files(REPO))
    assert {"member_02/adapter_model.safetensors", "model.safetensors", "ensemble_config.json"} <= files
    loaded = EnsembleModel.from_pretrained(REPO)  # the base comes from the Hub by the name recorded
    assert isinstance(loaded, AdapterEnsembleModel)
    assert torch.equal(logits(loaded), logits(ens))
    assert torch.equal(loaded(pixel_values=X).member_logits, ens(pixel_values=X).member_logits)
    card = hub.read_file(REPO, "README.md").decode()
    assert "LoRA adapter" in card and "PeftModel.from_pretrained" in card

    # the root is a plain transformers model: no adapter file there (transformers would hand one to peft)
    assert "adapter_config.json" not in files and "adapter_model.safetensors" not in files
    assert json.loads(hub.read_file(REPO, "config.json"))["architectures"] == ["ViTForImageClassification"]
    soup = AutoModelForImageClassification.from_pretrained(REPO)
    assert type(soup) is ViTForImageClassification and torch.equal(logits(soup), logits(ens.soup()))


def test_member_weights_of_a_peft_model_are_the_adapter_only():
    model = lora_model()
    names = set(member_weights(model))
    assert names and all(".lora_" in n or ".modules_to_save." in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= names


def test_a_local_base_checkpoint_is_not_saved_again_beside_the_adapters(adapters, tmp_path):
    """transformers 5 loads ViT's ``attention.attention.query`` as ``attention.q_proj`` and saves it back
    under the old name: the base's checkpoint names are not the model's. Compared as they were, every renamed
    weight looked missing from the checkpoint and ``base_extra.safetensors`` held a second copy of the base
    (benchmarks/lora_ensemble.py: a LoRA repo of 2.01x one model on disk, 1.99x in memory)."""
    base_dir = tmp_path / "base"
    tiny_vit(0).save_pretrained(base_dir)
    base = ViTForImageClassification.from_pretrained(base_dir)
    ens = AdapterEnsembleModel.from_adapters(base, adapters)
    assert ens.config.base_model == str(base_dir)  # a local checkpoint: its names are read
    saved = ens.save_pretrained(tmp_path / "repo")
    assert not (saved / "base_extra.safetensors").exists()
    root = (saved / "model.safetensors").stat().st_size
    total = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
    assert total < 1.5 * root  # the soup plus K adapters, not a second base
    loaded = EnsembleModel.from_pretrained(saved, base_model=base_dir)
    assert torch.equal(logits(loaded), logits(ens))
