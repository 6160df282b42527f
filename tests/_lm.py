"""Tiny causal LMs and an offline word-level tokenizer for the language-model tests.

GPT2 (tied input/output embeddings) and Llama (untied) from small configs; every builder seeds torch first,
so a `seed` names one set of weights. Imports neither pytest nor the library.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a cat dog bird sat ran flew on under over mat log tree and then it was very happy sad big small "
    "red blue green saw heard liked ate fish seeds bread today yesterday morning night home park"
).split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
VOCAB = 64
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

GPT2_DEFAULTS = dict(n_embd=16, n_layer=2, n_head=2, n_positions=64, vocab_size=VOCAB)
LLAMA_DEFAULTS = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    vocab_size=VOCAB,
    tie_word_embeddings=False,
)
# initializer_range 0.2 (not 0.02): next-token distributions far from uniform, so that averaging probabilities
# and averaging logits pick different tokens and a test of one can tell it from the other.
_TOKENS = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, initializer_range=0.2)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A 2-layer GPT2 LM (tied embeddings, vocabulary 64), in eval mode."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**GPT2_DEFAULTS, **_TOKENS, **overrides})).eval()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama LM (untied embeddings, grouped-query attention, vocabulary 64), in eval mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA_DEFAULTS, **_TOKENS, **overrides})).eval()


def word_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `WORDS` (offline, saved as tokenizer.json)."""
    vocab = {w: i for i, w in enumerate([*SPECIALS, *WORDS])}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side=padding_side,
    )


def lm_texts(n: int, seed: int = 0) -> list[str]:
    """`n` random sentences of 3 to 9 words over `WORDS` (uneven lengths: padded batches)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 10, (n,), generator=g).tolist()
    return [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist()) for k in lengths
    ]
