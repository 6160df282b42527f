"""LoRA causal-LM members on one base (issue 23): the adapter ensemble scores and generates like the ensemble
of its merged members, with one KV cache per member, and round-trips through save/load."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hf_ens import EnsembleModel, EnsembleModelForCausalLM
from hf_ens.adapters import AdapterEnsembleModel, save_adapter
from hf_ens.adapters_lm import AdapterEnsembleModelForCausalLM
from tests._lm import tiny_gpt2, tiny_llama, word_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
PROMPTS = ["the cat sat on the", "a dog", "the small red bird saw"]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def adapters(request, tmp_path_factory):
    """Three LoRA CAUSAL_LM adapters of one tiny base, with random non-zero B (as after training)."""
    family, folder = request.param, tmp_path_factory.mktemp("lm-adapters")
    paths = []
    for seed in range(3):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], task_type="CAUSAL_LM")
        model = get_peft_model(BUILDERS[family](0), config)
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.5)
        save_adapter(model, "default", folder / f"adapter_{seed}")
        paths.append(folder / f"adapter_{seed}")
    return family, paths


def _merged(family, path):
    return PeftModel.from_pretrained(BUILDERS[family](0), str(path)).merge_and_unload().eval()


def _batch(tokenizer=None):
    return (tokenizer or word_tokenizer())(PROMPTS, return_tensors="pt", padding=True)


def test_adapter_ensemble_equals_the_ensemble_of_merged_members(adapters):
    family, paths = adapters
    ens = AdapterEnsembleModel.from_adapters(BUILDERS[family](0), paths)
    assert type(ens) is AdapterEnsembleModelForCausalLM
    full = EnsembleModel.from_members([_merged(family, p) for p in paths])
    assert type(full) is EnsembleModelForCausalLM
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        a, b = ens(**batch, labels=labels), full(**batch, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-5)
    assert (a.member_logits[0] - a.member_logits[1]).abs().max() > 1e-2  # the adapters really differ
    for kwargs in (dict(do_sample=False), dict(num_beams=2, do_sample=False)):
        torch.testing.assert_close(
            ens.generate(**batch, max_new_tokens=6, **kwargs),
            full.generate(**batch, max_new_tokens=6, **kwargs),
            atol=0,
            rtol=0,
        )


def test_adapter_members_keep_their_own_kv_cache(adapters):
    family, paths = adapters
    ens = AdapterEnsembleModel.from_adapters(BUILDERS[family](0), paths)
    assert ens.batch_members  # the default; this test is about the member loop
    ens.batch_members = False
    lengths = []
    ens.peft_model.get_base_model().register_forward_pre_hook(
        lambda _m, _a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    batch = _batch()
    out = ens.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    prompt = batch["input_ids"].shape[1]
    assert lengths == [prompt] * 3 + [1] * 9  # three members on one base, one new token per step after
    caches = out.cache.caches
    assert len({id(c) for c in caches}) == 3 and all(c.get_seq_length() == prompt + 3 for c in caches)
    static = ens.generate(
        **batch,
        max_new_tokens=4,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
    )
    assert len({id(c) for c in static.cache.caches}) == 3  # one base, yet three static caches
    torch.testing.assert_close(static.sequences, out.sequences, atol=0, rtol=0)


def test_adapter_lm_ensemble_save_load_generate(adapters, tmp_path):
    family, paths = adapters
    tokenizer = word_tokenizer()
    ens = AdapterEnsembleModel.from_adapters(BUILDERS[family](0), paths, processor=tokenizer)
    batch = _batch(tokenizer)
    before = ens.generate(**batch, max_new_tokens=5, do_sample=False)
    ens.save_pretrained(tmp_path / "ens")
    loaded = EnsembleModel.from_pretrained(tmp_path / "ens", base_model=BUILDERS[family](0))
    assert type(loaded) is AdapterEnsembleModelForCausalLM
    torch.testing.assert_close(
        loaded.generate(**batch, max_new_tokens=5, do_sample=False), before, atol=0, rtol=0
    )
    soup = AutoModelForCausalLM.from_pretrained(tmp_path / "ens").eval()
    assert type(soup) is type(BUILDERS[family](0))
    with torch.no_grad():
        torch.testing.assert_close(soup(**batch).logits, ens.soup()(**batch).logits, atol=1e-5, rtol=0)
    assert "pipeline_tag: text-generation" in (tmp_path / "ens" / "README.md").read_text()


def test_members_batched_on_the_base_equal_the_member_loop(adapters):
    """batch_members=True: ONE base forward per step over the K members' rows (peft's adapter_names=), the
    same numbers as one forward per member, within 1e-5, and the same tokens (greedy, beams, static cache)."""
    family, paths = adapters
    ens = AdapterEnsembleModel.from_adapters(BUILDERS[family](0), paths)
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        ens.batch_members = False
        loop = ens(**batch, labels=labels)
        ens.batch_members = True
        batched = ens(**batch, labels=labels)
    torch.testing.assert_close(batched.member_logits, loop.member_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.logits, loop.logits, atol=1e-5, rtol=0)
    assert batched.loss.item() == pytest.approx(loop.loss.item(), abs=1e-5)
    with torch.no_grad():  # hidden states: each member's rows of the batched forward, as in the loop
        ens.batch_members = False
        loop = ens(**batch, output_hidden_states=True).hidden_states
        ens.batch_members = True
        batched = ens(**batch, output_hidden_states=True).hidden_states
    assert len(batched) == len(loop) == 3 and len(batched[2]) == len(loop[2])
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)
    calls = []
    ens.peft_model.get_base_model().register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    for kwargs in (
        dict(do_sample=False),
        dict(num_beams=2, num_return_sequences=2, do_sample=False),
        dict(do_sample=False, cache_implementation="static"),
    ):
        ens.batch_members = False
        expected = ens.generate(**batch, max_new_tokens=5, **kwargs)
        ens.batch_members, calls[:] = True, []
        out = ens.generate(**batch, max_new_tokens=5, return_dict_in_generate=True, **kwargs)
        torch.testing.assert_close(out.sequences, expected, atol=0, rtol=0, msg=f"{kwargs}")
        rows = 3 * 3 * kwargs.get("num_beams", 1)  # 3 members x 3 prompts (x beams)
        assert calls == [(rows, batch["input_ids"].shape[1])] + [(rows, 1)] * 4, kwargs
        assert out.cache.members_in_batch == 3 and len(out.cache.caches) == 1
    # continuing from a returned batched cache: only the uncached token goes in, same tokens as one call
    ens.generation_config.eos_token_id = None
    first = ens.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    mask = torch.cat([batch["attention_mask"], torch.ones(3, 3, dtype=torch.long)], 1)
    calls[:] = []
    more = ens.generate(
        input_ids=first.sequences, attention_mask=mask, cache=first.cache, max_new_tokens=2, do_sample=False
    )
    assert calls == [(9, 1), (9, 1)]
    torch.testing.assert_close(more, ens.generate(**batch, max_new_tokens=5, do_sample=False), atol=0, rtol=0)
    ens.train()  # peft refuses mixed-adapter batches in train mode: the member loop runs
    calls[:] = []
    with torch.no_grad():
        ens(**batch)
    assert calls == [tuple(batch["input_ids"].shape)] * 3
    ens.eval()
    with pytest.raises(ValueError, match="built with members run one by one"):
        ens.batch_members = False
        cache = ens.generate(**batch, max_new_tokens=2, return_dict_in_generate=True).cache
        ens.batch_members = True
        ens(**batch, cache=cache)
