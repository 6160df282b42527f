"""Tiny text models, an offline tokenizer and a constructed text task, for tests (and later LM work).

Everything is built here from configs and code: no Hub, no download. One builder per idea:

* `word_tokenizer()`: a word-level ``PreTrainedTokenizerFast`` over the task's vocabulary (``[PAD]`` = 0,
  ``[UNK]``, ``[CLS]`` prepended to every text, so BERT pools a real token);
* `sentiment_examples(n, seed)`: a rule-based sentiment task with negation: a text is positive when it holds
  a positive word XOR a ``not``; lengths vary, so batches are padded;
* `tiny_classifier(family, seed, ...)`: BERT / Llama / GPT2 ``*ForSequenceClassification`` (hidden 16,
  1 layer, the tokenizer's vocabulary; ``pad_token_id`` set, which Llama / GPT2 need to pool the last token);
* `tiny_lm(family, seed, tie=True)`: GPT2 / Llama causal LMs, with or without tied input/output embeddings;
* `TextDataset` + `collator(tokenizer)`: tokenised examples and transformers' own padding collator.

Like `hf_ens.testing_utils`, this module imports neither pytest nor the rest of the library.
"""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

FAMILIES = ("bert", "llama", "gpt2")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]"]
POSITIVE = ["good", "great", "fine", "nice", "happy", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "sad", "boring", "ugly"]
NOUNS = ["film", "book", "meal", "song", "trip", "day", "game", "show"]
FILLER = ["the", "a", "was", "is", "very", "quite", "really", "and", "this", "that", "it", "so"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + NOUNS + FILLER + ["not"]
LABELS = {0: "negative", 1: "positive"}


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over `VOCAB`, built in memory (saves and reloads like any tokenizer)."""
    vocab = {word: i for i, word in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", model_max_length=32
    )


def sentiment_examples(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """`n` (text, label) pairs: label 1 iff the text has a positive word XOR a ``not`` (4-12 words)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive, negated = rng.random() < 0.5, rng.random() < 0.5
        words = ["the", rng.choice(NOUNS), "was"] + (["not"] if negated else [])
        words += [rng.choice(POSITIVE if positive else NEGATIVE)]
        words += rng.sample(FILLER, rng.randint(0, 7))
        out.append((" ".join(words), int(positive != negated)))
    return out


def _common(vocab_size: int, num_labels: int, problem_type: str | None) -> dict:
    labels = LABELS if num_labels == 2 else {i: f"label_{i}" for i in range(num_labels)}
    return dict(
        vocab_size=vocab_size,
        num_labels=num_labels,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        problem_type=problem_type,
        pad_token_id=0,
    )


def text_config(family: str, num_labels: int = 2, problem_type: str | None = None, **overrides):
    """The config of a tiny `family` classifier or LM (hidden 16, 1 layer, 2 heads, `VOCAB` size)."""
    common = {**_common(len(VOCAB), num_labels, problem_type), **overrides}
    if family == "bert":
        return BertConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            **common,
        )
    if family == "llama":
        return LlamaConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            **common,
        )
    if family == "gpt2":
        ids = dict(bos_token_id=2, eos_token_id=2)  # GPT2's defaults (50256) lie outside this vocabulary
        return GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32, **{**ids, **common})
    raise ValueError(f"Unknown family {family!r}; one of {FAMILIES}.")


_CLASSIFIERS = {
    "bert": BertForSequenceClassification,
    "llama": LlamaForSequenceClassification,
    "gpt2": GPT2ForSequenceClassification,
}


def tiny_classifier(
    family: str = "bert",
    seed: int = 0,
    *,
    num_labels: int = 2,
    problem_type: str | None = None,
    train: bool = False,
    **overrides,
):
    """A tiny `family` ``*ForSequenceClassification`` built from `seed` (eval mode unless `train`)."""
    torch.manual_seed(seed)
    return _CLASSIFIERS[family](text_config(family, num_labels, problem_type, **overrides)).train(train)


def tiny_lm(family: str = "gpt2", seed: int = 0, *, tie: bool = True, train: bool = False):
    """A tiny causal LM (GPT2 or Llama); `tie`: output head shares the input embedding's storage."""
    torch.manual_seed(seed)
    config = text_config(family, tie_word_embeddings=tie)
    cls = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}[family]
    return cls(config).train(train)


class TextDataset(torch.utils.data.Dataset):
    """Tokenised examples (``input_ids``, ``attention_mask``, ``labels``; padding left to the collator).

    `labels` may replace the task's labels (floats for regression, lists for multi-label).
    """

    def __init__(self, tokenizer, examples: list[tuple[str, int]], labels: list | None = None):
        self.items = []
        for i, (text, label) in enumerate(examples):
            enc = tokenizer(text)
            target = labels[i] if labels is not None else label
            self.items.append({**enc, "labels": target})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return dict(self.items[i])


def collator(tokenizer) -> DataCollatorWithPadding:
    """transformers' padding collator (pads to the longest text of the batch)."""
    return DataCollatorWithPadding(tokenizer)


def batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """A padded batch of `texts` (input_ids, attention_mask)."""
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))
