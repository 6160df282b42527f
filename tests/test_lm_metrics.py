"""LM metrics (issue 23): token NLL / perplexity / ECE / Brier of the next-token distribution, member
disagreement and mutual information, streamed over batches, on tiny GPT2 / Llama ensembles."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling

from hf_ens import EnsembleModel, greedy_soup, metrics, uniform_soup
from hf_ens.lm_metrics import (
    LM_METRICS,
    evaluate_lm_ensemble,
    lm_ensemble_metrics,
    lm_metrics,
    make_lm_eval_fn,
    scored_tokens,
    token_uncertainty,
)
from tests._lm import tiny_gpt2, tiny_llama, word_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran", "the small red bird saw a big green tree", "it was night"]


def _batch():
    tokenizer = word_tokenizer(padding_side="right")
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)([tokenizer(t) for t in TEXTS])


def _flat(logits, labels):
    """Scored positions by hand: position t predicts labels[t + 1]; -100 is not scored."""
    rows, targets = [], []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != -100:
                rows.append(logits[b, t])
                targets.append(int(labels[b, t + 1]))
    return torch.stack(rows), torch.tensor(targets)


def test_lm_metrics_are_the_classification_metrics_of_the_scored_tokens():
    model, batch = tiny_llama(0), _batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = model(**batch).loss.item()
    got = lm_metrics(logits, batch["labels"])
    flat, targets = _flat(logits, batch["labels"])
    assert (batch["labels"] == -100).any() and len(targets) < batch["labels"].numel() - 4
    assert got["nll"] == pytest.approx(metrics.nll(flat, targets), abs=1e-9)
    assert got["nll"] == pytest.approx(loss, abs=1e-5)  # transformers' own causal-LM loss
    assert got["perplexity"] == pytest.approx(math.exp(got["nll"]))
    assert got["accuracy"] == pytest.approx(metrics.accuracy(flat, targets), abs=1e-12)
    assert got["ece"] == pytest.approx(metrics.ece(flat, targets), abs=1e-9)
    assert got["brier"] == pytest.approx(metrics.brier(flat, targets), abs=1e-9)
    assert 0 < got["ece"] < 1 and 0 < got["brier"] < 2


def test_ensemble_metrics_stream_and_agree_with_the_model_loss():
    members = [tiny_gpt2(s) for s in range(3)]
    ens, batch = EnsembleModel.from_members(members), _batch()
    soup = ens.soup()
    with torch.no_grad():
        out = ens(**batch)
    got = lm_ensemble_metrics(out.member_logits, batch["labels"], soup_logits=soup(**batch).logits.detach())
    assert got["ensemble/nll"] == pytest.approx(out.loss.item(), abs=1e-5)
    member = [lm_metrics(m(**batch).logits.detach(), batch["labels"]) for m in members]
    for name in LM_METRICS:
        assert got[f"member_mean/{name}"] == pytest.approx(sum(r[name] for r in member) / 3, abs=1e-9)
    assert got["soup/nll"] == pytest.approx(soup(**batch).loss.item(), abs=1e-5)
    flat = torch.stack([_flat(m, batch["labels"])[0] for m in out.member_logits])
    assert got["diversity/disagreement"] == pytest.approx(metrics.disagreement(flat), abs=1e-9)
    assert got["ensemble/nll"] < got["member_mean/nll"]  # averaging probabilities (Jensen)
    assert got["diversity/mutual_information"] > 0
    # streamed over a loader of 2-row batches: the same numbers as one batch
    tokenizer = word_tokenizer(padding_side="right")
    loader = DataLoader(
        [tokenizer(t) for t in TEXTS],
        batch_size=2,
        collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    streamed = evaluate_lm_ensemble(ens, loader, soup=soup)
    assert streamed.keys() == got.keys()
    for key, value in got.items():
        assert streamed[key] == pytest.approx(value, abs=1e-5), key


def test_token_uncertainty_by_hand():
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1]])  # three members, one token
    unc = token_uncertainty(p.log()[:, None, :])
    mean = p.mean(0)
    entropy = -(mean * mean.log()).sum()
    expected = -(p * p.log()).sum(-1).mean()
    assert unc["entropy"].item() == pytest.approx(entropy.item())
    assert unc["mutual_information"].item() == pytest.approx((entropy - expected).item())
    assert unc["disagreement"].item() == pytest.approx(2 / 3)  # pairs (0,1), (1,2) differ; (0,2) agree
    assert unc["confidence"].item() == pytest.approx(mean.max().item())
    same = token_uncertainty(torch.stack([p[0].log()] * 4)[:, None, :])
    assert same["mutual_information"].item() == pytest.approx(0, abs=1e-12)
    assert same["disagreement"].item() == 0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one scored token"):
        lm_metrics(torch.zeros(1, 3, 5), torch.full((1, 3), -100))
    with pytest.raises(ValueError, match=r"Expected logits \[B, T, V\]"):
        scored_tokens(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="Targets must lie in"):
        lm_metrics(torch.zeros(1, 3, 5), torch.tensor([[0, 9, 1]]))


def test_greedy_soup_of_lm_members_by_held_out_loss():
    members = [tiny_gpt2(s) for s in range(3)]
    tokenizer = word_tokenizer(padding_side="right")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    loader = DataLoader([tokenizer(t) for t in TEXTS], batch_size=2, collate_fn=collator)
    eval_fn = make_lm_eval_fn(loader)
    batch = _batch()
    with torch.no_grad():
        assert eval_fn(members[1]) == pytest.approx(
            -lm_metrics(members[1](**batch).logits, batch["labels"])["nll"]
        )
    soup, chosen = greedy_soup(members, eval_fn)
    best = max(range(3), key=lambda i: eval_fn(members[i]))
    assert chosen[0] == best and type(soup) is type(members[0])
    assert eval_fn(soup) >= eval_fn(members[best])  # never worse than the best member on the held-out split
    if len(chosen) == 1:  # no member improved the soup: the soup is the best member
        torch.testing.assert_close(soup.lm_head.weight, members[best].lm_head.weight)
    else:
        torch.testing.assert_close(
            soup.lm_head.weight, uniform_soup([members[i] for i in chosen]).lm_head.weight, atol=1e-6, rtol=0
        )
    assert soup.lm_head.weight is soup.transformer.wte.weight


def test_classification_helpers_refuse_lm_batches_with_a_pointer():
    from hf_ens import make_accuracy_eval_fn

    batch = _batch()
    with pytest.raises(ValueError, match="per-token logits.*make_lm_eval_fn"):
        make_accuracy_eval_fn([batch])(tiny_gpt2(0))
    with pytest.raises(ValueError, match="per-token logits.*evaluate_lm_ensemble"):
        EnsembleModel.from_members([tiny_gpt2(0), tiny_gpt2(1)]).predict([batch])
