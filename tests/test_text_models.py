"""Text models through the whole library: tiny BERT / Llama / GPT2 built from configs, an offline word-level
tokenizer and a constructed sentiment task (`tests._text`). Every problem type the ensemble accepts gives the
members' own kind of answer (never a softmax over one class, never a sigmoid shown as a softmax), tied
embeddings survive Local DE, and an ensemble serves a pipeline with nothing but itself."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hf_ens.trainers import StarSSEConfig, StarSSETrainer
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, TrainerCallback, pipeline
from transformers.utils import logging as hf_logging

import hf_ens
from hf_ens import EnsembleConfig, EnsembleModel, tasks
from hf_ens.adapters import AdapterEnsembleModel
from hf_ens.evaluation import evaluate_ensemble, predict_logits
from hf_ens.heads import reinit_task_head
from hf_ens.members import load_member
from hf_ens.metrics import nll
from hf_ens.testing_utils import one_torch_thread
from tests import _text

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
_one_thread = pytest.fixture(autouse=True)(one_torch_thread)

TEXTS = ["the film was good", "the book was not bad really so", "a day is not happy"]


@pytest.fixture(scope="module")
def tok():
    return _text.word_tokenizer()


def _members(family, k=3, **kw):
    return [_text.tiny_classifier(family, seed, **kw) for seed in range(k)]


def _stack(models, batch):
    with torch.no_grad():
        return torch.stack([m(**batch).logits for m in models])


# ------------------------------------------------------------------ 1. tied embeddings
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_head_redraw_never_touches_tied_embeddings(family, caplog):
    """Local DE's head re-draw: a head tied to the input embeddings (same storage) is kept, said once; an
    untied head is re-drawn and the embeddings stay. (Before: both re-drawn, |change| ~0.25.)"""
    tied = _text.tiny_lm(family, 0, tie=True)
    emb = tied.get_input_embeddings().weight.detach().clone()
    assert tied.get_output_embeddings().weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    hf_logging.enable_propagation()  # transformers' loggers do not reach caplog otherwise
    try:
        for seed in (1, 2):
            torch.manual_seed(seed)
            reinit_task_head(tied)
    finally:
        hf_logging.disable_propagation()
    assert torch.equal(tied.get_input_embeddings().weight, emb)
    assert caplog.text.count("tied to the input embeddings") == 1  # said once, not per member

    untied = _text.tiny_lm(family, 0, tie=False)
    emb, head = (untied.get_input_embeddings().weight.detach().clone(),
                 untied.get_output_embeddings().weight.detach().clone())  # fmt: skip
    reinit_task_head(untied)
    assert torch.equal(untied.get_input_embeddings().weight, emb)
    assert (untied.get_output_embeddings().weight - head).abs().max() > 0.05


def test_local_de_keeps_tied_embeddings_of_a_language_model(tmp_path, tok):
    """Local DE on a tied GPT2 LM: member 2 starts from exactly the pre-trained embeddings."""
    model = _text.tiny_lm("gpt2", 0, tie=True, train=True)
    start = model.get_input_embeddings().weight.detach().clone()
    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                seen.append(kw["model"].get_input_embeddings().weight.detach().clone())

    data = [dict(tok(t)) for t, _ in _text.sentiment_examples(16, seed=1)]
    trainer = StarSSETrainer(
        model=model,
        args=_args(
            tmp_path, method="local_de", num_members=2, num_train_epochs=1, per_device_train_batch_size=8
        ),
        train_dataset=data,
        data_collator=_lm_collator(tok),
        callbacks=[Watch()],
    )
    trainer.train()
    assert len(seen) == 1 and torch.equal(seen[0], start)  # member 2's first step: the original embeddings


def _lm_collator(tok):
    return DataCollatorForLanguageModeling(tok, mlm=False)


# ------------------------------------------------------------------ 2. regression
def test_regression_ensemble_is_the_mean_value_with_spread_and_mse(tok):
    members = _members("bert", num_labels=1, problem_type=None)  # num_labels=1: regression to transformers
    for k, m in enumerate(members):
        torch.nn.init.constant_(m.classifier.bias, 0.5 * k)  # members that clearly differ
    ens = EnsembleModel.from_members(members, processor=tok)
    assert ens.config.problem_type == "regression"
    batch = _text.batch(tok, TEXTS)
    values = _stack(members, batch)
    labels = torch.tensor([0.1, 0.7, -0.3])
    out = ens(**batch, labels=labels)
    torch.testing.assert_close(out.logits, values.mean(0))
    torch.testing.assert_close(out.spread, values.std(0, correction=0))
    assert out.logits.abs().min() > 0.1  # never the zeros of a softmax over one class
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(values.mean(0).squeeze(-1), labels))
    scores = hf_ens.pipeline(model=ens, function_to_apply=None)(TEXTS[0])
    assert scores[0]["score"] == pytest.approx(values.mean(0)[0, 0].item(), abs=1e-5)
    with pytest.raises(ValueError, match="single-label classification"):
        evaluate_ensemble(ens, [{**batch, "labels": labels}])
    with pytest.raises(ValueError, match="non-integer labels"):
        nll(values.mean(0).repeat(1, 2), labels)


# ------------------------------------------------------------------ 3. multi-label
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_multilabel_ensemble_averages_sigmoids_with_bce(family, tok):
    members = _members(family, num_labels=3, problem_type="multi_label_classification")
    for k, m in enumerate(members):
        head = m.score if family == "llama" else m.classifier
        torch.nn.init.normal_(head.weight, std=1.0, generator=torch.Generator().manual_seed(k))
    ens = EnsembleModel.from_members(members, processor=tok)
    batch = _text.batch(tok, TEXTS)
    probs = _stack(members, batch).sigmoid().mean(0)
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0]]).float()
    out = ens(**batch, labels=labels)
    torch.testing.assert_close(out.logits.sigmoid(), probs)
    expected = torch.nn.functional.binary_cross_entropy(probs, labels)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    # the pipeline shows the mean member probabilities (it applies a sigmoid by the config's problem type)
    plain = pipeline("text-classification", model=ens, tokenizer=tok, top_k=None)
    for p in (hf_ens.pipeline(model=ens, top_k=None), plain):
        scores = {s["label"]: s["score"] for s in p([TEXTS[1]])[0]}
        for i, label in ens.config.id2label.items():
            assert scores[label] == pytest.approx(probs[1, int(i)].item(), abs=1e-5)
    with pytest.raises(ValueError, match="multi-label"):
        evaluate_ensemble(ens, [{**batch, "labels": labels}])
    with pytest.raises(ValueError, match="shape"):
        ens(**batch, labels=torch.tensor([0, 1, 2]))


def test_combining_rule_is_stable_and_one_member_is_the_member():
    z = torch.tensor([[[40.0, -40.0]], [[-40.0, 40.0]]])  # saturated members
    logits, _ = tasks.combine(z, tasks.MULTI_LABEL)
    torch.testing.assert_close(logits.sigmoid(), torch.full((1, 2), 0.5))
    for kind in tasks.PROBLEM_TYPES:
        one, spread = tasks.combine(z[:1], kind)
        expected = torch.log_softmax(z[0], -1) if kind == tasks.SINGLE_LABEL else z[0]
        torch.testing.assert_close(one, expected)
        assert spread is None or spread.abs().max() == 0
    with pytest.raises(ValueError, match="problem type"):
        multi = _text.tiny_classifier("bert", 1, problem_type="multi_label_classification")
        EnsembleModel.from_members([_text.tiny_classifier("bert", 0), multi])


# ------------------------------------------------------------------ 4. config, card, batches
def test_config_card_and_batches_name_the_members_task(tmp_path, tok):
    with pytest.raises(ValueError, match="model_type"):
        EnsembleConfig(members=["member_00"], member_config={"num_labels": 2})  # was: silently a ViT
    ens = EnsembleModel.from_members(_members("gpt2", 2), processor=tok)
    ens.save_pretrained(tmp_path / "ens")
    card = (tmp_path / "ens" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "image-classification" not in card
    saved = json.loads((tmp_path / "ens" / "ensemble_config.json").read_text())
    assert (
        saved["problem_type"] == "single_label_classification"
        and saved["member_config"]["model_type"] == "gpt2"
    )
    ids = _text.batch(tok, TEXTS)["input_ids"]
    with pytest.raises(TypeError, match="attention_mask"):  # was: the mask silently dropped
        predict_logits(ens.members[0], DataLoader(TensorDataset(ids, torch.tensor([0, 1, 0])), batch_size=3))


# ------------------------------------------------------------------ training, ensemble, soups, pipelines
def _args(out, **overrides) -> StarSSEConfig:
    kwargs = dict(output_dir=str(out), num_train_epochs=2, learning_rate=3e-3, per_device_train_batch_size=16,
                  method="starsse", num_members=3, cycle_epochs=1, cycle_learning_rate=2e-3, use_cpu=True,
                  report_to=[], disable_tqdm=True, save_strategy="no", remove_unused_columns=False,
                  seed=0)  # fmt: skip
    return StarSSEConfig(**{**kwargs, **overrides})


@pytest.mark.parametrize(
    "family,method",
    [("bert", "starsse"), ("gpt2", "sse"), ("llama", "local_de")],
)
def test_text_methods_train_ensemble_soup_save_load_pipeline(tmp_path, tok, family, method):
    train = _text.TextDataset(tok, _text.sentiment_examples(96, seed=0))
    test = _text.TextDataset(tok, _text.sentiment_examples(48, seed=1))
    extra = {"num_train_epochs": 1} if method == "local_de" else {}
    trainer = StarSSETrainer(
        model=_text.tiny_classifier(family, 0, train=True),
        args=_args(tmp_path / "run", method=method, **extra),
        train_dataset=train,
        data_collator=_text.collator(tok),
        processing_class=tok,
    )
    trainer.train()
    ens = trainer.ensemble()
    loader = DataLoader(test, batch_size=16, collate_fn=_text.collator(tok))
    metrics = evaluate_ensemble(ens, loader, soup=trainer.soup())
    assert metrics["num_members"] == 3 and math.isfinite(metrics["ensemble/nll"])
    assert metrics["diversity/kl_to_ensemble"] > 0  # distinct members
    ens.save_pretrained(tmp_path / "ens", metrics=metrics)
    loaded = EnsembleModel.from_pretrained(tmp_path / "ens")
    assert type(loaded.processor).__name__ == type(tok).__name__
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "ens" / "member_01")(TEXTS[1])["input_ids"]
        == tok(TEXTS[1])["input_ids"]
    )
    batch = _text.batch(tok, TEXTS)
    torch.testing.assert_close(loaded(**batch).logits, ens.eval()(**batch).logits)
    result = hf_ens.pipeline(model=tmp_path / "ens", top_k=None)([TEXTS[0]])[0]  # no tokenizer= needed
    probs = loaded(**_text.batch(tok, TEXTS[:1])).logits.softmax(-1)[0]
    assert {r["label"]: round(r["score"], 5) for r in result} == {
        "negative": round(probs[0].item(), 5),
        "positive": round(probs[1].item(), 5),
    }


def test_lora_seq_cls_members_and_a_soup_plain_peft_loads(tmp_path, tok):
    """LoRA SEQ_CLS members on Llama: the soup adapter is written where the user says, with a clean config,
    and plain peft loads it into the exact merged soup."""
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                      modules_to_save=["score"])  # fmt: skip
    model = get_peft_model(_text.tiny_classifier("llama", 0), lora)
    base_dir = tmp_path / "base"
    _text.tiny_classifier("llama", 0).save_pretrained(base_dir)
    trainer = StarSSETrainer(
        model=model,
        args=_args(tmp_path / "run", num_members=2),
        train_dataset=_text.TextDataset(tok, _text.sentiment_examples(64, seed=0)),
        data_collator=_text.collator(tok),
        processing_class=tok,
    )
    trainer.train()
    ens = trainer.ensemble()
    assert isinstance(ens, AdapterEnsembleModel)
    soup_dir = tmp_path / "soup"
    ens.soup_adapter().save_pretrained(soup_dir)
    config = json.loads(
        (soup_dir / "adapter_config.json").read_text()
    )  # in soup_dir itself, not soup_dir/soup
    assert sorted(config["modules_to_save"]) == sorted(set(config["modules_to_save"]))
    assert not config.get("base_model_name_or_path") or str(tmp_path) not in config["base_model_name_or_path"]
    plain = PeftModel.from_pretrained(_text.tiny_classifier("llama", 0), soup_dir).eval()
    batch = _text.batch(tok, TEXTS)
    torch.testing.assert_close(plain(**batch).logits, ens.soup().eval()(**batch).logits, atol=1e-5, rtol=1e-4)
    ens.save_pretrained(tmp_path / "ens")
    loaded = EnsembleModel.from_pretrained(tmp_path / "ens", base_model=base_dir)
    torch.testing.assert_close(loaded(**batch).logits, ens(**batch).logits)
    assert hf_ens.pipeline(model=loaded)(TEXTS[0])[0]["label"] in ("negative", "positive")


def test_image_ensemble_pipeline_needs_no_image_processor():
    """The same for images: the ensemble's image processor serves the pipeline, scores the mean softmax."""
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    from hf_ens.testing_utils import tiny_vit

    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    ens = EnsembleModel.from_members([tiny_vit(0), tiny_vit(1)], processor=processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    scores = hf_ens.pipeline(model=ens, top_k=None)(image)
    probs = ens(**processor(image, return_tensors="pt")).logits.softmax(-1)[0]
    by_label = {s["label"]: s["score"] for s in scores}
    for i, label in ens.config.id2label.items():
        assert by_label[label] == pytest.approx(probs[int(i)].item(), abs=1e-5)


def test_lora_ensemble_on_a_masked_lm_checkpoint_reloads_from_that_checkpoint(tmp_path, tok):
    """A masked-LM checkpoint has no pooler: loaded as a classifier it gets a fresh frozen one, which the
    members depend on. The ensemble saves it (base_extra.safetensors), so base_model=<the MLM> reloads the
    same members (before: EnsembleLoadError 'lacks weights bert.pooler...')."""
    from transformers import BertForMaskedLM, BertForSequenceClassification

    torch.manual_seed(0)
    BertForMaskedLM(_text.text_config("bert")).save_pretrained(tmp_path / "mlm")
    torch.manual_seed(1)
    base = BertForSequenceClassification.from_pretrained(tmp_path / "mlm")  # pooler and classifier: new
    dirs = []
    for k in range(2):
        torch.manual_seed(10 + k)
        lora = LoraConfig(
            r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]
        )
        member = get_peft_model(copy.deepcopy(base), lora, adapter_name="default")
        for p in member.parameters():
            if p.requires_grad:
                p.data.add_(0.1 * torch.randn_like(p))
        member.save_pretrained(tmp_path / f"a{k}")
        dirs.append(tmp_path / f"a{k}")
    ens = AdapterEnsembleModel.from_adapters(
        base, dirs, processor=tok, base_model_name_or_path=str(tmp_path / "mlm")
    )
    ens.save_pretrained(tmp_path / "ens")
    assert (tmp_path / "ens" / "base_extra.safetensors").is_file()
    loaded = EnsembleModel.from_pretrained(tmp_path / "ens", base_model=tmp_path / "mlm")
    batch = _text.batch(tok, TEXTS)
    torch.testing.assert_close(loaded(**batch).logits, ens(**batch).logits)


def test_bert_local_de_branches_equal_the_trainer_loop(tmp_path):
    """BERT's and GPT2's classifiers average their loss themselves and ignore num_items_in_batch; the Trainer,
    seeing **kwargs, summed the micro-batch means of a step (gradient x accumulation) while the branch loop
    averages them: Local DE members differed by ~4e-4. Now the Trainer is told, and both loops agree bit for
    bit, also with a short last batch (30 samples, batches of 4)."""
    from hf_ens.trainers.starsse_trainer import loss_normalized_by_num_items

    from tests._trainer_parallel_run import main as run_here
    from tests._trainer_utils import max_diff, weights

    assert not loss_normalized_by_num_items(_text.tiny_classifier("bert"))
    assert loss_normalized_by_num_items(_text.tiny_classifier("llama"))
    options = dict(
        num_members=2, gradient_accumulation_steps=2, method="local_de", num_train_epochs=1, samples=30
    )
    text = {"family": "bert", "hidden_dropout_prob": 0, "attention_probs_dropout_prob": 0}  # see the README
    run_here(str(tmp_path / "branch"), {**options, "parallel_members": True, "text": dict(text)})
    run_here(str(tmp_path / "loop"), {**options, "parallel_members": False, "text": dict(text)})
    for k in range(2):
        a, b = (
            weights(load_member(tmp_path / run / "members" / f"member_{k:02d}")) for run in ("branch", "loop")
        )
        assert max_diff(a, b) == 0.0, k


def test_what_the_ensemble_cannot_combine_is_refused_before_training(tmp_path, tok, caplog):
    """A masked LM: the trainer says at construction that ensemble() will refuse it (its members still train
    and soup); EnsembleModel refuses it with the reason. Language models get their own class (and token
    classifiers: tests/test_token_classification.py)."""
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    token = BertForMaskedLM(_text.text_config("bert"))
    with pytest.raises(ValueError, match="ForSequenceClassification"):
        EnsembleModel.from_members([token, copy.deepcopy(token)])
    lm = EnsembleModel.from_members([_text.tiny_lm("gpt2", 0), _text.tiny_lm("gpt2", 1)])
    assert type(lm).__name__ == "EnsembleModelForCausalLM"  # language models: their own ensemble class
    hf_logging.enable_propagation()
    try:
        StarSSETrainer(model=token, args=_args(tmp_path), train_dataset=[{"input_ids": [1], "labels": [0]}])
    finally:
        hf_logging.disable_propagation()
    assert "trainer.ensemble() will refuse it" in caplog.text
