"""Causal-LM ensembles (issue 23): loss, greedy/beam/sampled generation with per-member KV caches,
pipelines, save/load round trips and soups, on tiny GPT2 (tied embeddings) and Llama (untied) members."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, pipeline

from hf_ens import (
    EnsembleConfig,
    EnsembleModel,
    EnsembleModelForCausalLM,
    compute_lm_metrics,
    evaluate_lm_ensemble,
    uniform_soup,
)
from hf_ens.ensemble_lm import EnsembleCache
from hf_ens.testing_utils import tiny_bert
from tests._lm import EOS_ID, PAD_ID, tiny_gpt2, tiny_llama, word_tokenizer

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
PROMPTS = ["the cat sat on the", "a dog", "the small red bird saw"]


@pytest.fixture
def transformers_log():
    """Every record transformers logs at WARNING or above during the test (they do not reach caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture(params=sorted(BUILDERS))
def family(request) -> str:
    return request.param


def _members(family: str, k: int = 3):
    return [BUILDERS[family](seed) for seed in range(k)]


def _batch(tokenizer=None):
    tokenizer = tokenizer or word_tokenizer()
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)  # left padding: rows of 5, 2 and 5 words


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def _mean_probs(members, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The averaged next-token distribution at every position, each member run on the whole sequence."""
    probs = [
        m(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits.softmax(-1)
        for m in members
    ]
    return torch.stack(probs).mean(0)


@torch.no_grad()
def _greedy_by_hand(members, ids, mask, steps: int, eos: int | None = EOS_ID) -> torch.Tensor:
    """A hand-written greedy loop over the averaged next-token probabilities (no cache, no generate())."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        nxt = _mean_probs(members, ids, mask)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        done |= nxt == eos if eos is not None else done
        if done.all():
            break
    return ids


def test_forward_and_loss_are_the_averaged_distribution(family):
    members = _members(family)
    ens = EnsembleModel.from_members(members)
    assert type(ens) is EnsembleModelForCausalLM
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = ens(**batch, position_ids=_positions(batch["attention_mask"]), labels=labels)
    probs = _mean_probs(members, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(out.logits.exp(), probs, atol=1e-6, rtol=0)
    assert out.member_logits.shape == (3, *probs.shape) and out.cache is None  # no cache unless asked
    # token NLL of the averaged distribution, shifted, -100 ignored
    target, keep = labels[:, 1:], labels[:, 1:] != -100
    token_p = probs[:, :-1].gather(-1, target.clamp(min=0)[..., None])[..., 0]
    expected = -token_p.log()[keep].mean()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert out.loss.item() > 0 and keep.sum() < keep.numel()  # padding really was ignored


def test_greedy_generate_equals_hand_loop_left_padded_batch(family):
    members = _members(family)
    ens = EnsembleModel.from_members(members)
    batch = _batch()
    got = ens.generate(**batch, max_new_tokens=8, do_sample=False)
    want = _greedy_by_hand(members, batch["input_ids"], batch["attention_mask"], steps=8)
    assert got.shape == (3, batch["input_ids"].shape[1] + 8)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # an eos that one row reaches early: that row stops and is padded, the others go on
    eos = int(got[0, batch["input_ids"].shape[1] + 2])
    got = ens.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=PAD_ID)
    want = _greedy_by_hand(members, batch["input_ids"], batch["attention_mask"], steps=8, eos=eos)
    torch.testing.assert_close(got[:, : want.shape[1]], want, atol=0, rtol=0)
    assert (got[0, batch["input_ids"].shape[1] + 3 :] == PAD_ID).all()


def test_generation_uses_one_kv_cache_per_member(family):
    """After the prompt, every member sees one new token per step: the prefix is never run again."""
    members = _members(family, 2)
    ens = EnsembleModel.from_members(members)
    lengths = {k: [] for k in range(2)}
    for k, m in enumerate(members):
        m.register_forward_pre_hook(
            lambda _m, _a, kw, k=k: lengths[k].append(kw["input_ids"].shape[1]), with_kwargs=True
        )
    batch = _batch()
    out = ens.generate(**batch, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    prompt = batch["input_ids"].shape[1]
    assert lengths == {k: [prompt] + [1] * 5 for k in range(2)}
    assert isinstance(out.cache, EnsembleCache) and out.cache.num_members == 2
    assert out.cache.get_seq_length() == prompt + 5 and all(
        c.get_seq_length() == prompt + 5 for c in out.cache.caches
    )
    assert out.cache.caches[0] is not out.cache.caches[1]
    # continuing from the returned cache: the members see only the tokens not cached yet (no eos here: a
    # new generate() call restarts rows that had finished)
    ens.generation_config.eos_token_id = None
    out = ens.generate(**batch, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    lengths[0].clear()
    mask = torch.cat([batch["attention_mask"], torch.ones(3, 6, dtype=torch.long)], 1)
    more = ens.generate(
        input_ids=out.sequences, attention_mask=mask, cache=out.cache, max_new_tokens=3, do_sample=False
    )
    assert lengths[0] == [1, 1, 1]
    once = ens.generate(**batch, max_new_tokens=9, do_sample=False)
    torch.testing.assert_close(more, once, atol=0, rtol=0)
    # and without a cache at all, the same tokens
    torch.testing.assert_close(
        ens.generate(**batch, max_new_tokens=9, do_sample=False, use_cache=False), once, atol=0, rtol=0
    )


def test_one_member_equals_the_single_model(family):
    model = BUILDERS[family](7)
    ens = EnsembleModel.from_members([model])
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        single, mine = model(**batch, labels=labels), ens(**batch, labels=labels)
    torch.testing.assert_close(mine.logits, single.logits.log_softmax(-1), atol=1e-5, rtol=0)
    assert mine.loss.item() == pytest.approx(single.loss.item(), abs=1e-5)
    for kwargs in (
        dict(do_sample=False),
        dict(num_beams=3, do_sample=False, num_return_sequences=2),
        dict(do_sample=True, top_k=10, temperature=0.8),
    ):
        torch.manual_seed(0)
        a = model.generate(**batch, max_new_tokens=7, **kwargs)
        torch.manual_seed(0)
        b = ens.generate(**batch, max_new_tokens=7, **kwargs)
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=f"{kwargs}")


def test_beam_search_and_sampling_run_on_an_ensemble(family):
    ens = EnsembleModel.from_members(_members(family, 2))
    batch = _batch()
    beams = ens.generate(**batch, max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False)
    assert beams.shape == (9, batch["input_ids"].shape[1] + 5)
    torch.manual_seed(1)
    a = ens.generate(**batch, max_new_tokens=5, do_sample=True)
    torch.manual_seed(1)
    b = ens.generate(**batch, max_new_tokens=5, do_sample=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # seeded sampling is reproducible


def test_save_load_generate_soup_and_card(family, tmp_path):
    tokenizer = word_tokenizer()
    members = _members(family)
    ens = EnsembleModel.from_members(members, processor=tokenizer, metadata={"method": "starsse"})
    batch = _batch(tokenizer)
    before = ens.generate(**batch, max_new_tokens=6, do_sample=False)
    ens.save_pretrained(tmp_path / "ens")

    loaded = EnsembleModel.from_pretrained(tmp_path / "ens")
    assert type(loaded) is EnsembleModelForCausalLM
    torch.testing.assert_close(
        loaded.generate(**batch, max_new_tokens=6, do_sample=False), before, atol=0, rtol=0
    )
    assert loaded.processor(PROMPTS[0])["input_ids"] == tokenizer(PROMPTS[0])["input_ids"]
    auto = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ens", config=EnsembleConfig.from_pretrained(tmp_path / "ens")
    )
    assert type(auto) is EnsembleModelForCausalLM
    torch.testing.assert_close(
        auto.generate(**batch, max_new_tokens=6, do_sample=False), before, atol=0, rtol=0
    )

    # the root is the uniform soup, a plain causal LM; GPT2's tied embeddings stay tied, Llama's stay apart
    soup = AutoModelForCausalLM.from_pretrained(tmp_path / "ens").eval()
    assert type(soup) is type(members[0])
    mean_wte = torch.stack([m.get_input_embeddings().weight for m in members]).mean(0)
    torch.testing.assert_close(soup.get_input_embeddings().weight, mean_wte, atol=1e-6, rtol=0)
    tied = soup.get_output_embeddings().weight is soup.get_input_embeddings().weight
    assert tied == (family == "gpt2")
    mean_head = torch.stack([m.get_output_embeddings().weight for m in members]).mean(0)
    torch.testing.assert_close(soup.get_output_embeddings().weight, mean_head, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(soup(**batch).logits, ens.soup()(**batch).logits, atol=1e-5, rtol=0)
    # uniform_soup of the member directories: loaded strictly, as for classifiers
    by_paths = uniform_soup([tmp_path / "ens" / f"member_{k:02d}" for k in range(3)])
    torch.testing.assert_close(by_paths.get_input_embeddings().weight, mean_wte, atol=1e-6, rtol=0)

    card = (tmp_path / "ens" / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM" in card
    saved = json.loads((tmp_path / "ens" / "ensemble_config.json").read_text())
    assert saved["architectures"] == ["EnsembleModelForCausalLM"]


def test_text_generation_pipeline_gives_the_ensemble_text(tmp_path, transformers_log):
    tokenizer = word_tokenizer()
    ens = EnsembleModel.from_members(_members("gpt2", 2), processor=tokenizer)
    ens.save_pretrained(tmp_path / "ens")
    loaded = EnsembleModel.from_pretrained(tmp_path / "ens")
    pipe = pipeline("text-generation", model=loaded, tokenizer=loaded.processor)
    text = pipe(PROMPTS[0], max_new_tokens=5, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tokenizer(PROMPTS[0], return_tensors="pt")
    expected = ens.generate(**ids, max_new_tokens=5, do_sample=False)[0, ids["input_ids"].shape[1] :]
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert not [r.getMessage() for r in transformers_log]


def test_trainer_evaluate_reports_the_ensemble_loss(tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = word_tokenizer(padding_side="right")
    ens = EnsembleModel.from_members(_members("llama", 2), processor=tokenizer)
    data = Dataset.from_dict(dict(tokenizer(PROMPTS * 2)))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=6, report_to=[], use_cpu=True)
    trainer = Trainer(
        model=ens, args=args, eval_dataset=data, data_collator=collator, compute_metrics=compute_lm_metrics
    )
    metrics = trainer.evaluate()
    batch = collator([data[i] for i in range(len(data))])
    with torch.no_grad():
        expected = ens(**batch).loss.item()
    assert metrics["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["eval_nll"] == pytest.approx(expected, abs=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert 0 <= metrics["eval_ece"] <= 1 and 0 <= metrics["eval_brier"] <= 2
    # the card of a repo saved with LM metrics: perplexity-era numbers in its table
    ens.save_pretrained(tmp_path / "ens", metrics=evaluate_lm_ensemble(ens, [batch], soup=ens.soup()))
    card = (tmp_path / "ens" / "README.md").read_text()
    assert "mutual_information" in card and f"{metrics['eval_nll']:.4f}" in card
    # batches of different lengths: the Trainer pads logits and labels with -100, nothing padded is scored
    texts = [PROMPTS[1]] * 4 + [PROMPTS[0], PROMPTS[2]]  # a batch of 2 words, then one of 5
    data = Dataset.from_dict(dict(tokenizer(texts)))
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    trainer = Trainer(
        model=ens, args=args, eval_dataset=data, data_collator=collator, compute_metrics=compute_lm_metrics
    )
    batches = [collator([data[i] for i in range(4)]), collator([data[i] for i in range(4, 6)])]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    streamed = evaluate_lm_ensemble(ens, batches)
    got = trainer.evaluate()
    for name in ("nll", "perplexity", "accuracy", "ece", "brier"):
        assert got[f"eval_{name}"] == pytest.approx(streamed[f"ensemble/{name}"], abs=1e-5)


def test_refusals_are_clear():
    with pytest.raises(ValueError, match="causal-LM members: use EnsembleModelForCausalLM"):
        lm = tiny_gpt2(0)
        EnsembleModel(EnsembleConfig.for_members([lm]), members=[lm])
    with pytest.raises(ValueError, match=r"\*ForCausalLM and \*LMHeadModel members; got BertForSequence"):
        EnsembleModelForCausalLM.from_members([tiny_bert(0)])
    with pytest.raises(ValueError, match="same depth and width"):
        EnsembleModel.from_members([tiny_gpt2(0), tiny_gpt2(1, n_layer=1)])
    ens = EnsembleModel.from_members([tiny_gpt2(0), tiny_gpt2(1)])
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="EnsembleCache"):
        ens.generate(**_batch(), max_new_tokens=2, cache=DynamicCache())
    assert isinstance(ens.members[0], GPT2LMHeadModel)


def test_hub_round_trip_generates_the_same_tokens(hub):
    """Push to the local test Hub, load the repo id back: same tokens, tokenizer included; the repo id alone
    is the soup to plain transformers."""
    tokenizer = word_tokenizer()
    ens = EnsembleModel.from_members(_members("gpt2", 2), processor=tokenizer, metadata={"method": "starsse"})
    batch = _batch(tokenizer)
    before = ens.generate(**batch, max_new_tokens=5, do_sample=False)
    ens.push_to_hub("test-user/tiny-gpt2-ensemble")
    loaded = EnsembleModelForCausalLM.from_pretrained("test-user/tiny-gpt2-ensemble")
    assert loaded.processor(PROMPTS[1])["input_ids"] == tokenizer(PROMPTS[1])["input_ids"]
    after = loaded.generate(**_batch(loaded.processor), max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    soup = AutoModelForCausalLM.from_pretrained("test-user/tiny-gpt2-ensemble")
    assert type(soup) is GPT2LMHeadModel and soup.lm_head.weight is soup.transformer.wte.weight


def test_from_config_static_cache_and_trainer_loss_sum():
    ens = EnsembleModel.from_members(_members("llama", 2))
    fresh = AutoModelForCausalLM.from_config(ens.config)
    assert type(fresh) is EnsembleModelForCausalLM and fresh.num_members == 2
    batch = _batch()
    dynamic = ens.generate(**batch, max_new_tokens=4, do_sample=False)
    static = ens.generate(
        **batch,
        max_new_tokens=4,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
    )
    assert [type(c).__name__ for c in static.cache.caches] == ["StaticCache", "StaticCache"]
    torch.testing.assert_close(static.sequences, dynamic, atol=0, rtol=0)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        mean = ens(**batch, labels=labels).loss
        total = ens(**batch, labels=labels, num_items_in_batch=torch.tensor(1)).loss
    assert total.item() == pytest.approx(mean.item() * int((labels[:, 1:] != -100).sum()), rel=1e-5)


def test_docs_language_models_snippet_runs(tmp_path, monkeypatch):
    """docs/language_models.md as a user runs it, with tiny members and a tiny held-out loader."""
    import re
    from pathlib import Path

    from torch.utils.data import DataLoader
    from transformers import DataCollatorForLanguageModeling

    tokenizer = word_tokenizer()
    member_dirs = []
    for k, member in enumerate(_members("gpt2", 2)):
        member.save_pretrained(tmp_path / f"m{k}")
        tokenizer.save_pretrained(tmp_path / f"m{k}")
        member_dirs.append(tmp_path / f"m{k}")
    right = word_tokenizer(padding_side="right")
    loader = DataLoader(
        [right(t) for t in PROMPTS],
        batch_size=2,
        collate_fn=DataCollatorForLanguageModeling(right, mlm=False),
    )
    text = (Path(__file__).parents[1] / "docs" / "language_models.md").read_text()
    snippet = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)[0]  # the merges one: test_merges
    monkeypatch.chdir(tmp_path)
    namespace = {"member_dirs": member_dirs, "held_out_loader": loader}
    exec(compile(snippet, "docs/language_models.md", "exec"), namespace)
    assert namespace["flags"].shape == namespace["tokens"].shape and (namespace["flags"] >= 0).all()
    assert namespace["metrics"]["ensemble/nll"] <= namespace["metrics"]["member_mean/nll"]
    assert type(namespace["soup"]) is GPT2LMHeadModel and namespace["chosen"]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_generate_returns_each_members_hidden_states_and_attentions(family):
    """``generate(output_hidden_states=True, output_attentions=True)``: per step, a tuple over the members of
    each member's tuple (issue 27: they were dropped), the same tokens as without them."""
    members = [BUILDERS[family](seed, attn_implementation="eager") for seed in (0, 1)]
    ens = EnsembleModel.from_members(members)
    batch = word_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    out = ens.generate(**batch, output_hidden_states=True, output_attentions=True, **kwargs)
    assert len(out.hidden_states) == len(out.attentions) == 3  # steps
    layers = members[0].config.num_hidden_layers
    assert [len(h) for h in out.hidden_states[0]] == [layers + 1] * 2  # members x (embeddings + layers)
    assert [len(a) for a in out.attentions[1]] == [layers] * 2
    assert out.hidden_states[1][1][-1].shape == (len(PROMPTS), 1, members[0].config.hidden_size)
    full = batch["attention_mask"].all(-1)  # unpadded prompts (generation derives positions for padded ones)
    with torch.no_grad():  # member 1's last hidden state of the prompt, as it computes it alone
        alone = members[1](**batch, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out.hidden_states[0][1][-1][full], alone[full])
    torch.testing.assert_close(out.sequences, ens.generate(**batch, **kwargs).sequences, atol=0, rtol=0)
