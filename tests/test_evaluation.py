"""`hf_ens.evaluation`: the one evaluation path the recipes, the comparison and the probe share."""

from __future__ import annotations

import pytest
import torch

from hf_ens import EnsembleModel, uniform_soup
from hf_ens.evaluation import (
    ensemble_size_curve,
    evaluate_ensemble,
    loss_error,
    make_loss_error_fn,
    predict,
)
from hf_ens.metrics import accuracy, ensemble_log_probs, nll
from hf_ens.testing_utils import random_images, tiny_vit


def _batches():
    x, y = random_images(6, seed=1)
    return x, y, [{"pixel_values": x[:4], "labels": y[:4]}, {"pixel_values": x[4:], "labels": y[4:]}]


def test_loss_error_counts_a_nan_row_as_an_error():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [float("nan"), 0.0]])
    labels = torch.tensor([0, 1, 1])
    got = loss_error(logits[:2], labels[:2])
    assert got["error"] == 0.0
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits[:2], labels[:2]).item())
    assert loss_error(logits, labels)["error"] == pytest.approx(1 / 3)


def test_make_loss_error_fn_takes_fresh_batches_and_prepares_the_model():
    x, y, batches = _batches()
    model, prepared = tiny_vit(0, num_hidden_layers=1), []
    fn = make_loss_error_fn(lambda: iter(batches), prepare=prepared.append)
    first, second = fn(model), fn(model)  # a generator source is re-made for every call
    with torch.no_grad():
        z = model(pixel_values=x).logits
    assert first == second and prepared == [model, model]
    assert first["loss"] == pytest.approx(torch.nn.functional.cross_entropy(z, y).item(), rel=1e-5)
    assert first["error"] == pytest.approx(1 - accuracy(z, y))
    with pytest.raises(ValueError, match="empty"):
        predict(model, [])


def test_evaluate_ensemble_adds_other_models_and_the_size_curve():
    x, y, batches = _batches()
    members = [tiny_vit(seed, num_hidden_layers=1) for seed in range(3)]
    soup, other = uniform_soup(members), tiny_vit(7, num_hidden_layers=1)
    m = evaluate_ensemble(
        EnsembleModel.from_members(members), batches, soup, models={"other": other}, size_curve=True
    )
    with torch.no_grad():
        z = torch.stack([mem(pixel_values=x).logits for mem in members])
        other_z = other(pixel_values=x).logits
    assert m["other/nll"] == pytest.approx(nll(other_z, y), rel=1e-5)
    curve = m["ensemble_size_curve"]
    assert curve["sizes"] == ensemble_size_curve(z, y)["sizes"] == [1, 2, 3]
    assert curve["nll"][2] == pytest.approx(m["ensemble/nll"], rel=1e-5)
    assert curve["accuracy"][0] == pytest.approx(m["member_0/accuracy"])
    assert curve["nll"][1] == pytest.approx(nll(ensemble_log_probs(z[:2]), y), rel=1e-5)


def test_evaluate_loss_error_of_a_causal_lm_is_per_next_token():
    from tests._lm import tiny_gpt2

    model = tiny_gpt2(0).train()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :2] = -100  # padding is not scored
    got = make_loss_error_fn([{"input_ids": ids, "labels": labels}])(model)
    assert model.training  # the mode is restored
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits[:, :-1]
    target, keep = labels[:, 1:], labels[:, 1:] != -100
    want_loss = torch.nn.functional.cross_entropy(logits[keep], target[keep]).item()
    want_error = (logits[keep].argmax(-1) != target[keep]).float().mean().item()
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["error"] == pytest.approx(want_error)
    with pytest.raises(ValueError, match="labelled batches"):
        make_loss_error_fn([{"input_ids": ids}])(model)
