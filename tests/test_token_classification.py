"""Token-classification ensembles (issue 23 item 1): K *ForTokenClassification members averaged per token.

Tiny BERT, Llama and GPT2 taggers built from configs (hidden 16, one layer), a word-level tokenizer and a
tagging task with padding and -100 labels ([CLS] and padding are not scored): per-token log-mean-softmax and
token NLL against hand computations, K=1 equals the member, padding invariance, save/load/Hub round trips,
the token-classification pipeline, metrics over scored tokens, LoRA TOKEN_CLS members and the trainer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import (
    AutoModelForTokenClassification,
    BertForTokenClassification,
    DataCollatorForTokenClassification,
    GPT2ForTokenClassification,
    LlamaForTokenClassification,
)

import hf_ens
from hf_ens import EnsembleConfig, EnsembleForTokenClassification, EnsembleModel
from hf_ens.testing_utils import one_torch_thread
from tests import _text

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
_one_thread = pytest.fixture(autouse=True)(one_torch_thread)

TAGS = {0: "O", 1: "POS", 2: "NEG"}  # a word is tagged positive, negative or other
CLASSES = {
    "bert": BertForTokenClassification,
    "llama": LlamaForTokenClassification,
    "gpt2": GPT2ForTokenClassification,
}
FAMILIES = tuple(CLASSES)
TEXTS = [
    "the film was good",
    "the meal was not bad and very nice",
    "a sad song",
    "the trip was quite boring so ugly",
]


def tagger(family: str, seed: int, **overrides):
    """A tiny `family` token classifier with the three `TAGS` (eval mode)."""
    config = _text.text_config(family, num_labels=3, id2label=TAGS, label2id={v: k for k, v in TAGS.items()})
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return CLASSES[family](config).eval()


def tag(word: str) -> int:
    return 1 if word in _text.POSITIVE else 2 if word in _text.NEGATIVE else 0


def examples(tokenizer, texts=TEXTS) -> list[dict]:
    """Tokenised texts with one tag per word; the [CLS] the tokenizer prepends is not scored (-100)."""
    items = []
    for text in texts:
        enc = dict(tokenizer(text))
        items.append({**enc, "labels": [-100] + [tag(w) for w in text.split()]})
    return items


def padded(tokenizer, texts=TEXTS) -> dict[str, torch.Tensor]:
    """A right-padded batch: labels padded with -100 by transformers' token-classification collator."""
    return DataCollatorForTokenClassification(tokenizer)(examples(tokenizer, texts))


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def hand_log_mean_softmax(members, batch) -> torch.Tensor:
    with torch.no_grad():
        probs = torch.stack([m(**inputs(batch)).logits.softmax(-1) for m in members])
    return probs.mean(0).log()


def hand_token_nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    scored = labels != -100
    return -log_probs[scored].gather(-1, labels[scored][:, None]).mean()


@pytest.fixture
def tok():
    return _text.word_tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_is_the_per_token_log_mean_softmax_and_loss_the_token_nll(family, tok):
    members = [tagger(family, seed) for seed in range(3)]
    ens = EnsembleModel.from_members(members, processor=tok)
    assert type(ens) is EnsembleForTokenClassification and ens.config.num_labels == 3
    batch = padded(tok)
    assert (batch["labels"] == -100).sum() > len(TEXTS)  # [CLS] and padding are not scored
    with torch.no_grad():
        out = ens(**batch)
    expected = hand_log_mean_softmax(members, batch)
    assert out.logits.shape == expected.shape == (*batch["input_ids"].shape, 3)
    assert out.member_logits.shape == (3, *expected.shape)
    torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=0)
    nll = hand_token_nll(expected, batch["labels"])
    assert out.loss.item() == pytest.approx(nll.item(), abs=1e-6)
    # the mean is over scored tokens: changing the logits of an unscored position changes nothing
    assert out.loss.item() != pytest.approx(-expected.reshape(-1, 3)[:, 0].mean().item(), abs=1e-3)
    # positional calls, main_input_name, return_dict=False: as for any token classifier
    with torch.no_grad():
        loss, logits, *_ = ens(
            batch["input_ids"], batch["attention_mask"], labels=batch["labels"], return_dict=False
        )
    torch.testing.assert_close(logits, out.logits, atol=0, rtol=0)
    assert ens.main_input_name == "input_ids"


@pytest.mark.parametrize("family", FAMILIES)
def test_one_member_equals_the_single_model(family, tok):
    member = tagger(family, 0)
    ens = EnsembleModel.from_members([member])
    batch = padded(tok)
    with torch.no_grad():
        single, out = member(**batch), ens(**batch)
    torch.testing.assert_close(out.logits, single.logits.log_softmax(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits.argmax(-1), single.logits.argmax(-1), atol=0, rtol=0)
    assert out.loss.item() == pytest.approx(single.loss.item(), abs=1e-6)  # the member's own -100 rule


@pytest.mark.parametrize("family", FAMILIES)
def test_a_padded_batch_gives_each_text_its_unpadded_outputs(family, tok):
    ens = EnsembleModel.from_members([tagger(family, s) for s in range(2)])
    batch = padded(tok)
    with torch.no_grad():
        together = ens(**inputs(batch)).logits
        for i, text in enumerate(TEXTS):
            alone = ens(**inputs(padded(tok, [text]))).logits[0]
            n = alone.shape[0]
            assert batch["attention_mask"][i].sum() == n and (batch["attention_mask"][i, n:] == 0).all()
            torch.testing.assert_close(together[i, :n], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_soup_card_and_tokenizer(family, tok, tmp_path):
    members = [tagger(family, s) for s in range(2)]
    ens = EnsembleModel.from_members(members, processor=tok, metadata={"method": "starsse"})
    batch = padded(tok)
    with torch.no_grad():
        before = ens(**batch)
    ens.save_pretrained(tmp_path / "ens")

    loaded = EnsembleModel.from_pretrained(tmp_path / "ens")
    assert type(loaded) is EnsembleForTokenClassification and loaded.config.id2label == TAGS
    auto = AutoModelForTokenClassification.from_pretrained(
        tmp_path / "ens", config=EnsembleConfig.from_pretrained(tmp_path / "ens")
    )
    assert type(auto) is EnsembleForTokenClassification
    with torch.no_grad():
        for model in (loaded, auto):
            after = model(**batch)
            torch.testing.assert_close(after.logits, before.logits, atol=0, rtol=0)
            assert after.loss.item() == before.loss.item()
    assert loaded.processor(TEXTS[1])["input_ids"] == tok(TEXTS[1])["input_ids"]

    # the root is the uniform soup, a plain token classifier
    soup = AutoModelForTokenClassification.from_pretrained(tmp_path / "ens").eval()
    assert type(soup) is CLASSES[family] and soup.config.id2label == TAGS
    with torch.no_grad():
        torch.testing.assert_close(soup(**batch).logits, ens.soup()(**batch).logits, atol=1e-5, rtol=0)
    head = [n for n, _ in soup.named_parameters() if n.startswith(("classifier", "score"))][0]
    mean_head = torch.stack([dict(m.named_parameters())[head] for m in members]).mean(0)
    torch.testing.assert_close(dict(soup.named_parameters())[head], mean_head, atol=1e-6, rtol=0)

    card = (tmp_path / "ens" / "README.md").read_text()
    assert "pipeline_tag: token-classification" in card and "AutoModelForTokenClassification" in card
    saved = json.loads((tmp_path / "ens" / "ensemble_config.json").read_text())
    assert saved["architectures"] == ["EnsembleForTokenClassification"]
    assert saved["architecture"] == CLASSES[family].__name__


def test_hub_round_trip_gives_the_same_outputs(hub, tok):
    ens = EnsembleModel.from_members([tagger("bert", s) for s in range(2)], processor=tok)
    batch = padded(tok)
    with torch.no_grad():
        before = ens(**batch).logits
    ens.push_to_hub("test-user/tiny-bert-tagger-ensemble")
    loaded = EnsembleForTokenClassification.from_pretrained("test-user/tiny-bert-tagger-ensemble")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**padded(loaded.processor)).logits, before, atol=0, rtol=0)
    soup = AutoModelForTokenClassification.from_pretrained("test-user/tiny-bert-tagger-ensemble")
    assert type(soup) is BertForTokenClassification


def test_token_classification_pipeline_scores_are_the_mean_member_probabilities(tok, tmp_path):
    members = [tagger("bert", s) for s in range(3)]
    ens = EnsembleModel.from_members(members, processor=tok)
    ens.save_pretrained(tmp_path / "ens")
    for model in (ens, str(tmp_path / "ens")):
        pipe = hf_ens.pipeline(model=model)
        assert pipe.task == "token-classification"
        entities = pipe(TEXTS[1], ignore_labels=[])
        words = TEXTS[1].split()
        assert [e["word"] for e in entities] == words
        expected = hand_log_mean_softmax(members, dict(tok(TEXTS[1], return_tensors="pt")))[0, 1:].exp()
        for e, p in zip(entities, expected, strict=True):
            assert e["entity"] == TAGS[int(p.argmax())]
            assert e["score"] == pytest.approx(float(p.max()), abs=1e-5)


def test_trainer_evaluate_and_metrics_score_the_tokens(tok, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_ens import compute_token_metrics, evaluate_ensemble, evaluate_loss_error, lm_metrics

    members = [tagger("llama", s) for s in range(2)]
    ens = EnsembleModel.from_members(members, processor=tok)
    items = examples(tok, TEXTS * 2)
    data = Dataset.from_list(items)
    collator = DataCollatorForTokenClassification(tok)
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=3, report_to=[], use_cpu=True)
    trainer = Trainer(
        model=ens, args=args, eval_dataset=data, data_collator=collator, compute_metrics=compute_token_metrics
    )
    got = trainer.evaluate()  # batches of different lengths: the Trainer pads with -100, never scored
    whole = collator(items)
    batches = [collator(items[:3]), collator(items[3:6]), collator(items[6:])]
    with torch.no_grad():
        out = ens(**whole)
        losses = [ens(**b).loss.item() for b in batches]
    # eval_loss: the Trainer's mean of batch losses by samples (3, 3, 2), as for any single model
    assert got["eval_loss"] == pytest.approx((3 * losses[0] + 3 * losses[1] + 2 * losses[2]) / 8, abs=1e-5)
    assert got["eval_nll"] == pytest.approx(out.loss.item(), abs=1e-5)  # the metrics: by scored token
    scored = whole["labels"] != -100
    accuracy = (out.logits.argmax(-1)[scored] == whole["labels"][scored]).double().mean().item()
    assert got["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert 0 <= got["eval_ece"] <= 1 and 0 <= got["eval_brier"] <= 2

    metrics = evaluate_ensemble(ens, batches, soup=ens.soup())
    assert metrics["ensemble/nll"] == pytest.approx(out.loss.item(), abs=1e-5)
    assert metrics["ensemble/accuracy"] == pytest.approx(accuracy, abs=1e-9)
    member_nll = [hand_token_nll(m(**inputs(whole)).logits.log_softmax(-1), whole["labels"]) for m in members]
    assert metrics["member_mean/nll"] == pytest.approx(float(sum(member_nll) / 2), abs=1e-5)
    assert metrics["ensemble/nll"] <= metrics["member_mean/nll"] and "soup/ece" in metrics
    assert metrics["diversity/mutual_information"] > 0
    assert lm_metrics(out.logits, whole["labels"], shift=False)["nll"] == pytest.approx(
        out.loss.item(), abs=1e-5
    )
    # the loss/error basin profiles and the LR probe read: per token, unshifted
    probe = evaluate_loss_error(ens, batches)
    assert probe["loss"] == pytest.approx(out.loss.item(), abs=1e-5)
    assert probe["error"] == pytest.approx(1 - accuracy, abs=1e-9)
    assert evaluate_loss_error(members[0], batches)["loss"] == pytest.approx(member_nll[0].item(), abs=1e-5)
    with pytest.raises(ValueError, match="size_curve= are not supported"):
        evaluate_ensemble(ens, batches, size_curve=True)
    with pytest.raises(ValueError, match="token classifier"):
        hf_ens.predict(ens, batches)
    with pytest.raises(
        ValueError, match="compute_token_metrics"
    ):  # not "multi-label?" from per-sample metrics
        hf_ens.metrics.compute_metrics((out.logits.numpy(), whole["labels"].numpy()))


def test_greedy_soup_of_taggers_by_held_out_token_nll(tok):
    from hf_ens import greedy_soup, make_lm_eval_fn

    members = [tagger("bert", s) for s in range(3)]
    batch = padded(tok)
    eval_fn = make_lm_eval_fn([batch], shift=False)
    with torch.no_grad():
        nll = [
            hand_token_nll(m(**inputs(batch)).logits.log_softmax(-1), batch["labels"]).item() for m in members
        ]
    assert [-eval_fn(m) for m in members] == pytest.approx(nll, abs=1e-5)
    soup, chosen = greedy_soup(members, eval_fn)
    assert type(soup) is BertForTokenClassification and chosen[0] == min(range(3), key=nll.__getitem__)
    assert -eval_fn(soup) <= min(nll) + 1e-6  # a member is added only if the soup scores strictly better


def test_what_the_token_ensemble_cannot_average_is_refused(tok):
    bert = tagger("bert", 0)
    with pytest.raises(ValueError, match="one label set"):
        other = dict(TAGS) | {2: "NEGATIVE"}
        EnsembleModel.from_members(
            [bert, tagger("bert", 1, id2label=other, label2id={v: k for k, v in other.items()})]
        )
    with pytest.raises(ValueError, match="num_labels=1"):
        one = _text.text_config("bert", num_labels=1)
        EnsembleModel.from_members([BertForTokenClassification(one), BertForTokenClassification(one)])
    with pytest.raises(ValueError, match="multi_label_classification"):
        EnsembleModel.from_members([tagger("bert", 0, problem_type="multi_label_classification")])
    with pytest.raises(ValueError, match="one architecture"):
        EnsembleModel.from_members([bert, tagger("llama", 0)])
    with pytest.raises(
        ValueError, match=r"\*ForTokenClassification members; got BertForSequenceClassification"
    ):
        EnsembleForTokenClassification.from_members([_text.tiny_classifier("bert")])
    with pytest.raises(ValueError, match="ForSequenceClassification members; got BertForTokenClassification"):
        hf_ens.EnsembleForSequenceClassification.from_members([bert])
    ens = EnsembleModel.from_members([bert, tagger("bert", 1)])
    batch = padded(tok)
    with pytest.raises(ValueError, match=r"expected labels of shape \(4, 9\)"):
        ens(**inputs(batch), labels=batch["labels"][:, :5])


def lora_taggers(tmp_path, tok, family: str = "llama", k: int = 2) -> list:
    """K LoRA TOKEN_CLS adapters (peft adds the head to modules_to_save) on one tagger, each trained a few
    SGD steps on its own order of the texts (B != 0 and distinct heads afterwards)."""
    from peft import LoraConfig, get_peft_model

    from hf_ens.adapters import save_adapter

    targets = ["q_proj", "v_proj"] if family == "llama" else ["query", "value"]
    paths, batch = [], padded(tok)
    for seed in range(k):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="TOKEN_CLS")
        torch.manual_seed(seed)
        model = get_peft_model(tagger(family, 0), config).train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for step in range(3):
            order = torch.randperm(len(TEXTS), generator=torch.Generator().manual_seed(seed * 10 + step))
            model(**{key: v[order] for key, v in batch.items()}).loss.backward()
            opt.step()
            opt.zero_grad()
        save_adapter(model, "default", tmp_path / f"adapter_{seed}")
        paths.append(tmp_path / f"adapter_{seed}")
    return paths


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_lora_token_members_on_one_base_average_per_token_and_round_trip(family, tok, tmp_path):
    from peft import PeftModel

    from hf_ens.adapters import AdapterEnsembleModel
    from hf_ens.adapters_token import AdapterEnsembleForTokenClassification

    paths = lora_taggers(tmp_path, tok, family)
    ens = AdapterEnsembleModel.from_adapters(tagger(family, 0), paths, processor=tok)
    assert type(ens) is AdapterEnsembleForTokenClassification and isinstance(
        ens, EnsembleForTokenClassification
    )
    merged = [PeftModel.from_pretrained(tagger(family, 0), str(p)).merge_and_unload().eval() for p in paths]
    batch = padded(tok)
    with torch.no_grad():
        out = ens(**batch)
    expected = hand_log_mean_softmax(merged, batch)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    assert out.loss.item() == pytest.approx(hand_token_nll(expected, batch["labels"]).item(), abs=1e-5)
    assert (out.member_logits[0] - out.member_logits[1]).abs().max() > 1e-3  # two different members

    base_dir = tmp_path / "base"
    tagger(family, 0).save_pretrained(base_dir)
    saved = ens.save_pretrained(tmp_path / "repo")
    loaded = EnsembleModel.from_pretrained(saved, base_model=base_dir)
    assert type(loaded) is AdapterEnsembleForTokenClassification
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, out.logits, atol=0, rtol=0)
        soup = AutoModelForTokenClassification.from_pretrained(saved).eval()
        assert type(soup) is CLASSES[family]
        torch.testing.assert_close(soup(**batch).logits, ens.soup()(**batch).logits, atol=1e-5, rtol=0)
    assert "pipeline_tag: token-classification" in (saved / "README.md").read_text()
    assert hf_ens.pipeline(model=loaded).task == "token-classification"


def _train(tmp_path, tok, model, **overrides):
    from datasets import Dataset
    from hf_ens.trainers import StarSSETrainer

    from tests._trainer_utils import starsse_config

    data = Dataset.from_list(examples(tok, TEXTS * 4))
    settings = dict(
        num_members=2, learning_rate=5e-2, cycle_learning_rate=2e-2, per_device_train_batch_size=4
    )
    args = starsse_config(tmp_path, **{**settings, **overrides})
    collator = DataCollatorForTokenClassification(tok)
    trainer = StarSSETrainer(
        model=model.train(), args=args, train_dataset=data, data_collator=collator, processing_class=tok
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("lora", [False, True], ids=["full-bert", "lora-llama"])
def test_starsse_trainer_on_token_classifiers_gives_a_token_ensemble_and_a_plain_soup(
    lora, tok, tmp_path, caplog
):
    from peft import LoraConfig, get_peft_model
    from transformers.utils import logging as hf_logging

    from hf_ens.adapters_token import AdapterEnsembleForTokenClassification

    family = "llama" if lora else "bert"
    model = tagger(family, 0, hidden_dropout_prob=0.0)
    if lora:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="TOKEN_CLS")
        model = get_peft_model(model, config)
    hf_logging.enable_propagation()
    try:
        trainer = _train(tmp_path, tok, model)
    finally:
        hf_logging.disable_propagation()
    assert "will refuse it" not in caplog.text  # the trainer no longer warns that ensemble() refuses
    ens, soup = trainer.ensemble(), trainer.soup()
    assert type(ens) is (AdapterEnsembleForTokenClassification if lora else EnsembleForTokenClassification)
    assert type(soup) is CLASSES[family] and ens.num_members == 2
    assert ens.config.id2label == TAGS and soup.config.id2label == TAGS
    batch = padded(tok)
    with torch.no_grad():
        out = ens(**batch)
        members = torch.stack([m(**inputs(batch)).logits for m in ens.members])
    torch.testing.assert_close(out.member_logits, members, atol=1e-6, rtol=0)
    nll = [hand_token_nll(z.log_softmax(-1), batch["labels"]).item() for z in members]
    assert out.loss.item() <= max(nll) + 1e-6  # the averaged distribution's NLL: never worse than the worst
    assert out.loss.item() < math.log(3)  # trained: better than uniform over the three tags


def test_auto_cycle_learning_rate_on_a_tagger_judges_the_basin_by_token_nll(tok, tmp_path):
    """cycle_learning_rate="auto" on a token classifier: the probes score the held-out split per token
    (unshifted, -100 ignored), so model 1's probe loss is member 0's hand-computed token NLL."""
    from datasets import Dataset

    held_out = examples(tok)
    from hf_ens.trainers import StarSSETrainer

    from tests._trainer_utils import starsse_config

    args = starsse_config(
        tmp_path,
        num_members=2,
        learning_rate=5e-2,
        per_device_train_batch_size=4,
        cycle_learning_rate="auto",
        cycle_lr_grid=[0.5, 4.0],
        probe_search="linear",
    )
    trainer = StarSSETrainer(
        model=tagger("bert", 0, hidden_dropout_prob=0.0).train(),
        args=args,
        train_dataset=Dataset.from_list(examples(tok, TEXTS * 4)),
        eval_dataset=Dataset.from_list(held_out),
        data_collator=DataCollatorForTokenClassification(tok),
        processing_class=tok,
    )
    trainer.train()
    probe = trainer.basin_probe
    assert probe["mode"] == "auto" and 1 <= len(probe["table"]) <= 2
    member0 = BertForTokenClassification.from_pretrained(trainer.member_paths[0]).eval()
    batch = padded(tok)
    with torch.no_grad():
        nll = hand_token_nll(member0(**inputs(batch)).logits.log_softmax(-1), batch["labels"])
    assert probe["model1"]["eval_loss"] == pytest.approx(nll.item(), abs=1e-5)
    assert type(trainer.ensemble()) is EnsembleForTokenClassification


def test_docs_tasks_token_classification_snippet_runs(tok, tmp_path, monkeypatch):
    """docs/tasks.md's token-classification snippet as a user runs it, with tiny members and loader."""
    import re
    from pathlib import Path

    member_dirs = []
    for k in range(2):
        tagger("bert", k).save_pretrained(tmp_path / f"m{k}")
        tok.save_pretrained(tmp_path / f"m{k}")
        member_dirs.append(tmp_path / f"m{k}")
    loader = [padded(tok, TEXTS[:2]), padded(tok, TEXTS[2:])]
    text = (Path(__file__).parents[1] / "docs" / "tasks.md").read_text()
    (snippet,) = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    monkeypatch.chdir(tmp_path)
    namespace = {"member_dirs": member_dirs, "held_out_loader": loader}
    exec(compile(snippet, "docs/tasks.md", "exec"), namespace)
    assert [w["word"] for w in namespace["words"]] == "the film was not bad".split()
    assert namespace["metrics"]["ensemble/nll"] <= namespace["metrics"]["member_mean/nll"]
    assert type(namespace["soup"]) is BertForTokenClassification
