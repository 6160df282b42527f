"""What transformers' common tests check, asserted on the ensemble directly where their check cannot reach it
(issue 27): K fresh heads for a new ``num_labels``, per-member hidden states and attentions, the config round
trip, the attention implementation, the meta-device error, the task classes. The common tests themselves
run in test_transformers_common.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, ViTConfig

from hf_ens import (
    EnsembleConfig,
    EnsembleForImageClassification,
    EnsembleForSequenceClassification,
    EnsembleLoadError,
    EnsembleModel,
)
from hf_ens.testing_utils import random_images, tiny_bert, tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def saved(tmp_path):
    return EnsembleModel.from_members([tiny_vit(0), tiny_vit(1)]).save_pretrained(tmp_path / "ens")


def test_new_num_labels_gives_k_fresh_heads_and_keeps_the_bodies(saved):
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' own error
        EnsembleModel.from_pretrained(saved, num_labels=5)
    old = EnsembleModel.from_pretrained(saved)
    new, info = EnsembleModel.from_pretrained(
        saved, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert new.config.num_labels == new.config.member_config.num_labels == 5
    assert all(m.config.num_labels == 5 for m in new.members)
    assert {k for k, *_ in info["mismatched_keys"]} == {
        f"members.{k}.classifier.{w}" for k in range(2) for w in ("weight", "bias")
    }
    assert info["missing_keys"] == info["unexpected_keys"] == set()
    heads = [m.classifier.weight for m in new.members]
    assert heads[0].shape == (5, 32) and not torch.equal(heads[0], heads[1])  # K fresh heads, not one copy
    for m_old, m_new in zip(old.members, new.members, strict=True):
        body_old, body_new = m_old.vit.state_dict(), m_new.vit.state_dict()
        assert all(torch.equal(body_old[k], body_new[k]) for k in body_old)
    x, _ = random_images(4)
    assert new(pixel_values=x).logits.shape == (4, 5)


def test_hidden_states_and_attentions_are_a_tuple_over_members():
    ens = EnsembleModel.from_members([tiny_vit(s, attn_implementation="eager") for s in (0, 1)]).eval()
    x, _ = random_images(2)
    out = ens(pixel_values=x, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(out.attentions) == 2
    for k, member in enumerate(ens.members):
        own = member(pixel_values=x, output_hidden_states=True, output_attentions=True)
        assert len(out.hidden_states[k]) == 3 and len(out.attentions[k]) == 2  # 2 layers (+ embeddings)
        assert all(torch.equal(a, b) for a, b in zip(out.hidden_states[k], own.hidden_states, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(out.attentions[k], own.attentions, strict=True))
    plain = ens(pixel_values=x)
    assert plain.hidden_states is None and plain.attentions is None
    assert len(ens(pixel_values=x, output_hidden_states=True, return_dict=False)) == 3  # logits, member, hs


def test_config_save_pretrained_round_trip(tmp_path, saved):
    cfg = EnsembleConfig.from_pretrained(saved)  # a saved ensemble: its ensemble_config.json
    cfg.save_pretrained(tmp_path / "cfg")  # a config alone: config.json
    again = EnsembleConfig.from_pretrained(tmp_path / "cfg")
    assert again.members == cfg.members and again.member_config.to_dict() == cfg.member_config.to_dict()
    assert type(AutoConfig.from_pretrained(tmp_path / "cfg")) is EnsembleConfig
    assert type(AutoConfig.from_pretrained(saved)) is ViTConfig  # the repo root is still the soup's


def test_attn_implementation_is_what_the_members_run(saved):
    assert EnsembleModel.from_pretrained(saved).config._attn_implementation == "sdpa"
    eager = EnsembleModel.from_pretrained(saved, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    assert all(m.config._attn_implementation == "eager" for m in eager.members)
    eager.set_attn_implementation("sdpa")
    assert eager.config._attn_implementation == "sdpa"
    assert all(m.config._attn_implementation == "sdpa" for m in eager.members)


def test_meta_device_context_raises_transformers_error(saved):
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta device context manager") as e:
        EnsembleModel.from_pretrained(saved)
    assert not isinstance(e.value, EnsembleLoadError)


def test_fresh_members_share_the_ensemble_sub_config():
    cfg = EnsembleModel.from_members([tiny_vit(0), tiny_vit(1)]).config
    fresh = EnsembleForImageClassification(cfg)
    assert all(m.config is fresh.config.member_config for m in fresh.members)


def test_task_classes(saved):
    image = EnsembleModel.from_pretrained(saved)
    text = EnsembleModel.from_members([tiny_bert(0), tiny_bert(1)])
    assert type(image) is EnsembleForImageClassification and isinstance(image, EnsembleModel)
    assert type(text) is EnsembleForSequenceClassification
    assert EnsembleForImageClassification.main_input_name == image.main_input_name == "pixel_values"
    assert EnsembleForSequenceClassification.main_input_name == text.main_input_name == "input_ids"
    assert type(AutoModel.from_config(text.config)) is EnsembleForSequenceClassification
    with pytest.raises(ValueError, match="ForSequenceClassification members"):
        EnsembleForSequenceClassification(image.config)
    ids = torch.randint(0, 50, (2, 6))
    assert torch.equal(text(ids).logits, text(input_ids=ids).logits)  # token ids first, as for BERT


def test_gradient_checkpointing_reaches_every_member():
    ens = EnsembleModel.from_members([tiny_vit(0), tiny_vit(1)])
    ens.gradient_checkpointing_enable()
    assert ens.is_gradient_checkpointing and all(m.is_gradient_checkpointing for m in ens.members)
    x, y = random_images(4)
    ens.train()(pixel_values=x, labels=y).loss.backward()
    assert all(m.classifier.weight.grad is not None for m in ens.members)


def test_state_dict_and_no_checkpoint(saved):
    ens = EnsembleModel.from_pretrained(saved)
    copy = EnsembleModel.from_pretrained(None, config=ens.config, state_dict=ens.state_dict())
    assert type(copy) is EnsembleForImageClassification
    assert all(torch.equal(v, copy.state_dict()[k]) for k, v in ens.state_dict().items())
    with pytest.raises(ValueError, match="state_dict= with a checkpoint"):
        EnsembleModel.from_pretrained(saved, state_dict=ens.state_dict())


def test_enable_input_require_grads_reaches_every_member():
    """What PEFT with gradient checkpointing needs: the K embedding outputs require grad, weights frozen."""
    ens = EnsembleModel.from_members([tiny_bert(0), tiny_bert(1)])
    ens.requires_grad_(False)
    ens.enable_input_require_grads()
    seen = []
    hooks = [
        m.bert.embeddings.register_forward_hook(lambda *a: seen.append(a[2].requires_grad))
        for m in ens.members
    ]
    ens(torch.randint(0, 50, (2, 6)))
    for h in hooks:
        h.remove()
    assert seen == [True, True]
