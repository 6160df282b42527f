"""hf_ens.metrics against values computed by hand from small explicit probability tables."""

import math

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_ens.metrics import (
    accuracy,
    brier,
    compute_metrics,
    disagreement,
    ece,
    ensemble_log_probs,
    ensemble_metrics,
    kl_to_ensemble,
    nll,
)

# Four samples, three classes; logits = log(p) so softmax(logits) == P exactly (up to float rounding).
P = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
Y = np.array([0, 0, 2, 1])
LOGITS = np.log(P)


def test_accuracy_nll_brier_by_hand():
    # predictions 0, 1, 2, 2 -> correct, wrong, correct, wrong
    assert accuracy(LOGITS, Y) == pytest.approx(0.5)
    assert nll(LOGITS, Y) == pytest.approx(
        -(math.log(0.7) + math.log(0.4) + math.log(0.8) + math.log(0.3)) / 4
    )
    # per sample: .09+.04+.01, .36+.25+.01, .01+.01+.04, .09+.49+.16
    assert brier(LOGITS, Y) == pytest.approx((0.14 + 0.62 + 0.06 + 0.74) / 4)


def test_metrics_accept_torch_numpy_and_shifted_logits():
    shifted = torch.tensor(LOGITS + 5.0, dtype=torch.float32)  # softmax is shift invariant
    for fn in (accuracy, nll, brier, ece):
        assert fn(shifted, torch.tensor(Y)) == pytest.approx(fn(LOGITS, Y), abs=1e-6)


def test_ece_by_hand():
    # confidences .7 (right), .5 (wrong), .8 (right), .4 (wrong): four different bins of width 1/15
    assert ece(LOGITS, Y) == pytest.approx((0.3 + 0.5 + 0.2 + 0.4) / 4)
    # two samples in the top bin (14/15, 1]: accuracy 1/2, mean confidence .96 -> |.5 - .96|
    p = np.array([[0.94, 0.03, 0.03], [0.98, 0.01, 0.01]])
    assert ece(np.log(p), [0, 1]) == pytest.approx(0.46)
    # with a single bin everything is pooled: accuracy 1/2, confidence (.7+.5+.8+.4)/4 = .6
    assert ece(LOGITS, Y, n_bins=1) == pytest.approx(0.1)


def test_ensemble_metrics_by_hand():
    # two members, one sample: p1 = [.6, .4], p2 = [.2, .8] -> ensemble [.4, .6]
    member_logits = np.log(np.array([[[0.6, 0.4]], [[0.2, 0.8]]]))
    labels = np.array([0])
    np.testing.assert_allclose(ensemble_log_probs(member_logits).exp().numpy(), [[0.4, 0.6]], atol=1e-12)
    m = ensemble_metrics(member_logits, labels, soup_logits=np.log([[0.9, 0.1]]))
    assert m["ensemble/accuracy"] == 0.0
    assert m["ensemble/nll"] == pytest.approx(-math.log(0.4))
    assert m["ensemble/brier"] == pytest.approx(0.6**2 + 0.6**2)
    assert m["member_0/accuracy"] == 1.0 and m["member_1/accuracy"] == 0.0
    assert m["member_mean/accuracy"] == pytest.approx(0.5)
    assert m["member_mean/nll"] == pytest.approx(-(math.log(0.6) + math.log(0.2)) / 2)
    assert m["soup/nll"] == pytest.approx(-math.log(0.9))
    assert m["diversity/disagreement"] == 1.0
    kl1 = 0.6 * math.log(0.6 / 0.4) + 0.4 * math.log(0.4 / 0.6)
    kl2 = 0.2 * math.log(0.2 / 0.4) + 0.8 * math.log(0.8 / 0.6)
    assert m["diversity/kl_to_ensemble"] == pytest.approx((kl1 + kl2) / 2)
    assert m["num_members"] == 2


def test_disagreement_three_members_by_hand():
    preds = np.array([[0, 1, 1], [0, 1, 0], [1, 1, 0]])  # [K=3, N=3]
    member_logits = np.eye(2)[preds] * 3.0  # one-hot logits -> those predictions
    # pairs (0,1): 1/3, (0,2): 2/3, (1,2): 1/3
    assert disagreement(member_logits) == pytest.approx(4 / 9)
    assert kl_to_ensemble(np.stack([LOGITS, LOGITS])) == pytest.approx(0.0, abs=1e-12)


def test_ensemble_log_probs_is_stable_for_huge_logits():
    z = torch.tensor([[[1e4, 0.0]], [[0.0, 1e4]]])
    out = ensemble_log_probs(z)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.exp().numpy(), [[0.5, 0.5]])


def test_compute_metrics_for_trainer():
    plain = compute_metrics(EvalPrediction(predictions=LOGITS, label_ids=Y))
    assert plain == pytest.approx({"accuracy": 0.5, "nll": nll(LOGITS, Y), "ece": 0.35, "brier": 0.39})
    member_logits = np.stack([LOGITS, LOGITS[:, ::-1]])
    ens_logits = ensemble_log_probs(member_logits).numpy()
    full = compute_metrics(EvalPrediction(predictions=(ens_logits, member_logits), label_ids=Y))
    assert full["ensemble/nll"] == pytest.approx(nll(ens_logits, Y))
    assert full["member_1/accuracy"] == pytest.approx(accuracy(LOGITS[:, ::-1], Y))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        accuracy(LOGITS, Y[:3])
    with pytest.raises(ValueError, match="Labels must lie"):
        nll(LOGITS, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        brier(np.zeros((0, 3)), [])
    with pytest.raises(ValueError, match=r"\[K, N, C\]"):
        ensemble_metrics(LOGITS, Y)


def test_evaluate_ensemble_with_soup_matches_manual_metrics():
    from hf_ens import EnsembleModel, uniform_soup
    from hf_ens.evaluation import evaluate_ensemble
    from hf_ens.testing_utils import tiny_vit

    members = [tiny_vit(seed, num_hidden_layers=1) for seed in range(2)]
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    batches = [{"pixel_values": x[:4], "labels": y[:4]}, {"pixel_values": x[4:], "labels": y[4:]}]
    soup = uniform_soup(members)
    m = evaluate_ensemble(EnsembleModel.from_members(members), batches, soup=soup)
    with torch.no_grad():
        z = torch.stack([mem(pixel_values=x).logits for mem in members])
        soup_z = soup(pixel_values=x).logits
    assert m["ensemble/nll"] == pytest.approx(nll(ensemble_log_probs(z), y), rel=1e-5)
    assert m["soup/brier"] == pytest.approx(brier(soup_z, y), rel=1e-5)
    assert m["member_1/ece"] == pytest.approx(ece(z[1], y), rel=1e-5)


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    """Labels drawn from softmax(z / 2.5): the NLL-optimal temperature of z is 2.5 (up to sampling noise), and
    it lowers the NLL of z below both neighbours."""
    from hf_ens import fit_temperature, temperature_scaled
    from hf_ens.metrics import nll

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 5, generator=gen) * 3
    y = torch.multinomial(torch.softmax(z / 2.5, -1), 1, generator=gen)[:, 0]
    t = fit_temperature(z, y)
    assert abs(t - 2.5) < 0.1
    best = nll(temperature_scaled(z, t), y)
    assert best < nll(z, y) and best < nll(temperature_scaled(z, t * 1.1), y)
    assert best < nll(temperature_scaled(z, t / 1.1), y)
    with pytest.raises(ValueError, match="temperature"):
        temperature_scaled(z, 0.0)
