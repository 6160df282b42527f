"""Merges from the pre-trained base (issue 23): task arithmetic, TIES, DARE for full and LoRA LM members.

Known answers: task arithmetic with weights 1/K is the uniform soup, DARE with drop rate 0 is task arithmetic,
TIES of one member is its top-magnitude task vector scaled; LoRA merges equal the same merge of the merged
members; a rank-r merge adapter is the truncated SVD of the merged delta; every merge loads with plain
transformers / peft. Members are the base plus seeded perturbations (fine-tuning stand-ins, real models).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hf_ens import uniform_soup
from hf_ens.adapters import AdapterEnsembleModel, lora_uniform_soup, save_adapter
from hf_ens.merges import MERGE_METHODS, lora_merge, merge_models, task_arithmetic
from hf_ens.testing_utils import one_torch_thread
from tests._lm import tiny_gpt2, tiny_llama, word_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
_one_thread = pytest.fixture(autouse=True)(one_torch_thread)
BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def _members(family: str, k: int = 3):
    base, members = BUILDERS[family](0), []
    for i in range(k):
        m = BUILDERS[family](0)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        members.append(m)
    return base, members


def _assert_same(a, b, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=atol, rtol=0, msg=name)


def _tasks(base, member):
    b = base.state_dict()
    return {n: t - b[n] for n, t in member.state_dict().items() if t.is_floating_point()}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_task_arithmetic_with_weights_one_over_k_is_the_uniform_soup(family):
    base, members = _members(family)
    merged = merge_models(base, members, "task_arithmetic")
    _assert_same(merged, uniform_soup(members))
    _assert_same(task_arithmetic(base, members), merged)
    if family == "gpt2":  # tied embeddings stay tied
        assert merged.lm_head.weight is merged.transformer.wte.weight


def test_task_arithmetic_weights_and_scale_give_base_plus_scaled_sum():
    base, members = _members("llama", 2)
    merged = task_arithmetic(base, members, weights=[0.5, 2.0], scale=0.3)
    t0, t1 = _tasks(base, members[0]), _tasks(base, members[1])
    got = merged.state_dict()
    for name, value in base.state_dict().items():
        expected = value + 0.3 * (0.5 * t0[name] + 2.0 * t1[name])
        torch.testing.assert_close(got[name], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_drop_rate_zero_equals_its_undropped_merge(method):
    base, members = _members("gpt2")
    undropped = "task_arithmetic" if method == "dare_linear" else "ties"
    _assert_same(merge_models(base, members, method, density=1.0), merge_models(base, members, undropped))


def test_ties_of_one_member_is_its_top_magnitude_task_vector_scaled():
    base, (member,) = _members("llama", 1)
    merged = merge_models(base, [member], "ties", weights=[0.7], density=0.25, scale=2.0).state_dict()
    for name, value in base.state_dict().items():
        tau = member.state_dict()[name] - value
        k = int(0.25 * tau.numel())
        keep = torch.zeros(tau.numel(), dtype=torch.bool)
        keep[tau.abs().flatten().topk(k).indices] = True
        expected = value + 2.0 * 0.7 * tau * keep.view_as(tau)
        torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=0, msg=name)


def test_ties_elects_a_sign_and_averages_the_agreeing_entries():
    base, members = _members("gpt2")
    merged = merge_models(base, members, "ties", density=1.0).state_dict()
    for name, value in base.state_dict().items():
        taus = torch.stack([_tasks(base, m)[name] for m in members])
        sign = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
        agree = taus.sign() == sign
        expected = value + (taus * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=0, msg=name)


def test_dare_drops_at_rate_one_minus_density_rescales_and_is_seeded():
    base, (member,) = _members("llama", 1)
    merged = merge_models(base, [member], "dare_linear", weights=[1.0], density=0.4, seed=3)
    again = merge_models(base, [member], "dare_linear", weights=[1.0], density=0.4, seed=3)
    _assert_same(merged, again, atol=0)
    kept = total = 0
    for name, value in base.state_dict().items():
        tau, delta = _tasks(base, member)[name], merged.state_dict()[name] - value
        on = delta != 0
        torch.testing.assert_close(delta[on], tau[on] / 0.4, atol=1e-5, rtol=1e-5)
        kept, total = kept + int(on.sum()), total + tau.numel()
    assert 0.35 < kept / total < 0.45
    other = merge_models(base, [member], "dare_linear", weights=[1.0], density=0.4, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(merged.parameters(), other.parameters(), strict=True))


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("method", MERGE_METHODS)
def test_every_merge_loads_with_plain_transformers(tmp_path, family, method):
    base, members = _members(family)
    merged = merge_models(base, members, method, density=1.0 if method == "task_arithmetic" else 0.5)
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = word_tokenizer()(["the cat sat on the", "a dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, merged.eval()(**batch).logits)
    assert not torch.equal(merged.lm_head.weight, base.lm_head.weight)
    if family == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_merge_arguments_are_checked_before_any_work():
    base, members = _members("gpt2", 2)
    with pytest.raises(ValueError, match="Unknown merge method 'slerp'"):
        merge_models(base, members, "slerp")
    with pytest.raises(ValueError, match="density must be in"):
        merge_models(base, members, "ties", density=0.0)
    with pytest.raises(ValueError, match="one finite weight per member"):
        merge_models(base, members, "ties", weights=[1.0])
    with pytest.raises(ValueError, match="different architectures"):
        merge_models(base, [tiny_llama(0)], "ties")


# ------------------------------------------------------------------------------------------------------ LoRA
def _lora(k: int = 3, modules_to_save=None, targets=("q_proj", "v_proj")):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), modules_to_save=modules_to_save)
    model = get_peft_model(tiny_llama(0), config, adapter_name="member_00")
    for i in range(1, k):
        model.add_adapter(f"member_{i:02d}", config)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval(), [f"member_{i:02d}" for i in range(k)]


def test_lora_task_arithmetic_default_is_the_exact_lora_soup():
    model, names = _lora()
    _assert_same(lora_merge(model, names), lora_uniform_soup(model, names))


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_lora_merge_equals_the_same_merge_of_the_merged_members(method):
    model, names = _lora(modules_to_save=["lm_head"])
    merged = [lora_uniform_soup(model, [n]) for n in names]
    base = tiny_llama(0)
    expected = merge_models(base, merged, method, density=0.5, seed=1)
    got = lora_merge(model, names, method, density=0.5, seed=1)
    if method == "ties":  # magnitude trimming is deterministic: the two paths agree entry for entry
        _assert_same(got, expected, atol=1e-5)
    assert not torch.equal(got.lm_head.weight, base.lm_head.weight)


def test_lora_merge_adapter_of_rank_r_is_the_truncated_svd_and_loads_with_peft(tmp_path):
    model, names = _lora(targets=("q_proj", "o_proj"))  # 16 x 16 weights: rank 16 truncates nothing
    exact = lora_merge(model, names, "ties", density=0.5)
    full = lora_merge(model, names, "ties", density=0.5, rank=16)
    batch = word_tokenizer()(["the cat sat on the", "a dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(full(**batch).logits, exact(**batch).logits, atol=1e-5, rtol=0)
    low = lora_merge(model, names, "task_arithmetic", rank=2, name="soup_r2")
    assert list(low.peft_config) == ["soup_r2"] and low.peft_config["soup_r2"].r == 2
    soup = lora_uniform_soup(model, names)
    layer = low.base_model.model.model.layers[0].self_attn.q_proj
    w0 = tiny_llama(0).model.layers[0].self_attn.q_proj.weight
    u, s, vh = torch.linalg.svd(soup.model.layers[0].self_attn.q_proj.weight - w0)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(layer.get_delta_weight("soup_r2"), best, atol=1e-5, rtol=0)
    low.save_pretrained(tmp_path / "r2", selected_adapters=["soup_r2"])
    loaded = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "r2" / "soup_r2")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, low.eval()(**batch).logits, atol=1e-5, rtol=0)
    assert set(model.peft_config) == set(names)  # the members' model is untouched


def test_adapter_ensemble_soup_adapter_of_rank_r(tmp_path):
    model, names = _lora(2)
    for n in names:
        save_adapter(model, n, tmp_path / n)
    ens = AdapterEnsembleModel.from_adapters(tiny_llama(0), [tmp_path / n for n in names])
    exact, low = ens.soup_adapter(), ens.soup_adapter(rank=3)
    assert exact.peft_config["default"].r == 8 and low.peft_config["default"].r == 3
    batch = word_tokenizer()(["the cat sat on the"], return_tensors="pt")
    with torch.no_grad():
        target = exact(**batch).logits
        gap = (low(**batch).logits - target).abs().max()
        base_gap = (tiny_llama(0)(**batch).logits - target).abs().max()
    assert 0 < gap < base_gap  # rank 3 of 8 approximates the soup, closer than the base


def test_lora_merge_refusals():
    model, names = _lora(2, modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="cannot hold modules_to_save"):
        lora_merge(model, names, rank=2)
    model, names = _lora(2)  # v_proj is 8 x 16 (one key/value head)
    with pytest.raises(ValueError, match="exceeds the smallest adapted layer"):
        lora_merge(model, names, rank=9)
    with pytest.raises(ValueError, match="already holds an adapter named 'member_00'"):
        lora_merge(model, names, rank=2, name="member_00")
    with pytest.raises(ValueError, match="Unknown adapters"):
        lora_merge(model, ["nope"])


def test_docs_merges_snippet_runs(tmp_path):
    """The merges snippet of docs/language_models.md as a user runs it, on tiny full and LoRA members."""
    import re
    from pathlib import Path

    base, members = _members("gpt2", 2)
    member_dirs = []
    for k, member in enumerate(members):
        member.save_pretrained(tmp_path / f"m{k}")
        member_dirs.append(tmp_path / f"m{k}")
    model, names = _lora(2, targets=("q_proj", "o_proj"))
    for n in names:
        save_adapter(model, n, tmp_path / n)
    ens = AdapterEnsembleModel.from_adapters(tiny_llama(0), [tmp_path / n for n in names])
    text = (Path(__file__).parents[1] / "docs" / "language_models.md").read_text()
    snippet = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)[1]
    namespace = {"base": base, "member_dirs": member_dirs, "ens": ens}
    exec(compile(snippet, "docs/language_models.md", "exec"), namespace)
    assert namespace["merged"].lm_head.weight is namespace["merged"].transformer.wte.weight
    assert namespace["adapter_model"].peft_config["merge"].r == 8
    assert namespace["soup_r8"].peft_config["default"].r == 8
