"""Basin tools: hand-checkable interpolation, barrier and distance, then a profile of two tiny real ViTs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from hf_ens.basin import barrier, distances_to, interpolate, interpolation_profile, weight_distance
from hf_ens.testing_utils import one_torch_thread, tiny_vit

_one_torch_thread = pytest.fixture(autouse=True)(one_torch_thread)


def _tiny(fill: float, tracked: int) -> nn.Module:
    """Linear(2, 2) + BatchNorm1d(2) with every floating tensor set to `fill` and an integer buffer."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(fill)
    model[1].num_batches_tracked.fill_(tracked)
    return model


def test_interpolation_endpoints_and_midpoint_by_hand():
    a, b = _tiny(0.0, tracked=3), _tiny(2.0, tracked=7)
    before_a = {k: v.clone() for k, v in a.state_dict().items()}
    for alpha, model in ((0.0, a), (1.0, b)):
        got = interpolate(a, b, alpha).state_dict()
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                assert torch.equal(got[key], value), (alpha, key)
    mid = interpolate(a, b, 0.5)
    assert torch.equal(mid[0].weight, torch.ones(2, 2)) and torch.equal(mid[1].running_var, torch.ones(2))
    assert mid[1].num_batches_tracked.item() == 3  # integer buffers come from model_a
    quarter = interpolate(a, b, 0.25)
    assert torch.allclose(quarter[0].bias, torch.full((2,), 0.5))
    # the inputs are untouched and the result is a new module
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in before_a.items())
    assert mid is not a and mid[0].weight.data_ptr() != a[0].weight.data_ptr()


def test_interpolate_keeps_dtype_and_rejects_bad_input():
    a, b = _tiny(0.0, 0).to(torch.bfloat16), _tiny(1.0, 0).to(torch.bfloat16)
    assert interpolate(a, b, 0.5)[0].weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="different architectures"):
        interpolate(nn.Linear(2, 2), nn.Linear(2, 3), 0.5)
    with pytest.raises(ValueError, match="different architectures"):
        interpolate(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), 0.5)
    with pytest.raises(ValueError, match="finite number"):
        interpolate(a, b, float("nan"))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        interpolate({"w": torch.zeros(1)}, b, 0.5)


def test_barrier_is_the_excess_over_the_end_to_end_line():
    # a monotone linear path has no barrier (the old max-minus-mean-of-ends gave 1.0 here)
    assert barrier([0.0, 1.0, 2.0]) == 0.0
    assert barrier(torch.tensor([0.0, 1.0])) == 0.0
    assert barrier(np.array([0.5, 0.4, 0.3])) == pytest.approx(0.0)
    # convex paths (a valley, a rising parabola) have none either, never a negative one
    assert barrier([0.2, 0.1, 0.2]) == 0.0
    assert barrier([t * t for t in (0.0, 0.25, 0.5, 0.75, 1.0)]) == 0.0
    # a bump: its height above the line between the ends (the line is at 1.5 for t=0.5)
    assert barrier([1.0, 3.0, 2.0]) == pytest.approx(1.5)
    assert barrier([0.0, 0.0, 0.7, 0.0, 0.0]) == pytest.approx(0.7)
    assert barrier([0.0, 1.5, 1.0, 1.0, 2.0]) == pytest.approx(1.0)  # 1.5 - 0.5 at t=0.25
    # uneven alphas (e.g. a denser middle): the line is taken at each point's own t
    assert barrier([0.0, 1.0, 1.0], alphas=[0.0, 0.9, 1.0]) == pytest.approx(0.1)
    assert barrier([0.0, 1.0, 1.0], alphas=[0.0, 0.1, 1.0]) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="two end points"):
        barrier([1.0])
    with pytest.raises(ValueError, match="alphas"):
        barrier([1.0, 2.0], alphas=[0.0])
    with pytest.raises(ValueError, match="increase"):
        barrier([1.0, 2.0, 3.0], alphas=[0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        barrier([1.0, float("nan"), 2.0])


def test_weight_distance_of_known_tensors():
    a, b = nn.Linear(1, 2, bias=False), nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        a.weight.zero_()
        b.weight.copy_(torch.tensor([[3.0], [4.0]]))
    assert weight_distance(a, b) == pytest.approx(5.0)
    assert weight_distance(b, a) == pytest.approx(5.0)
    assert weight_distance(a, b, relative=True) == pytest.approx(1.0)  # ||a - b|| / ||b||
    assert weight_distance(b, b) == 0.0
    with pytest.raises(ValueError, match="all-zero"):
        weight_distance(b, a, relative=True)
    assert distances_to([a, b], b) == pytest.approx([5.0, 0.0])
    # buffers (BatchNorm statistics) are not parameters: only the parameters count
    x, y = _tiny(0.0, 0), _tiny(0.0, 0)
    y[1].running_mean.fill_(10.0)
    assert weight_distance(x, y) == 0.0
    y[0].weight.data.fill_(1.0)
    assert weight_distance(x, y) == pytest.approx(2.0)  # sqrt(4 * 1^2)


def _tiny_vit(seed: int):
    """A 1-layer ViT for 8x8 grey digits (sklearn), in train mode."""
    return tiny_vit(
        seed,
        train=True,
        image_size=8,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        intermediate_size=32,
        num_labels=10,
    )


@pytest.fixture(scope="module")
def digits():
    """Real 8x8 handwritten digits (sklearn), scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:200] / 8.0 - 1.0, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(y[:200])


def _train(model, x, y, steps: int = 30):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(pixel_values=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def test_profile_of_two_trained_tiny_vits(digits):
    x, y = digits
    calls = []

    def eval_fn(model):
        calls.append(model.training)
        with torch.no_grad():
            logits = model(pixel_values=x).logits
        return {
            "loss": torch.nn.functional.cross_entropy(logits, y).item(),
            "error": (logits.argmax(-1) != y).float().mean().item(),
        }

    a, b = _train(_tiny_vit(0), x, y), _train(_tiny_vit(1), x, y)
    profile = interpolation_profile(a, b, eval_fn, num_points=5)
    assert profile["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(profile["loss"]) == len(profile["error"]) == 5 and not any(calls)  # evaluated in eval mode
    assert profile["loss"][0] == pytest.approx(eval_fn(a.eval())["loss"], abs=1e-6)
    assert profile["error"][-1] == pytest.approx(eval_fn(b.eval())["error"], abs=1e-6)
    assert profile["error"][0] < 0.5 and profile["error"][-1] < 0.5  # both ends learned something
    # two independent inits are not in one basin: the midpoint is worse than the ends
    assert barrier(profile["loss"]) > 0.05
    assert all(isinstance(v, float) for v in profile["loss"])  # JSON-ready

    # a model and itself: a flat profile, no barrier; (loss, error) pairs and "accuracy" are accepted too
    flat = interpolation_profile(a, a, lambda m: (eval_fn(m)["loss"], 0.1), num_points=3)
    assert barrier(flat["loss"]) == pytest.approx(0.0, abs=1e-6)
    acc = interpolation_profile(a, b, lambda m: {"loss": 1.0, "accuracy": 0.75}, alphas=[0.0, 1.0])
    assert acc["error"] == [0.25, 0.25] and acc["accuracy"] == [0.75, 0.75]


def test_profile_rejects_bad_eval_fn_and_points():
    a, b = _tiny(0.0, 0), _tiny(1.0, 0)
    with pytest.raises(TypeError, match="'loss' and 'error'"):
        interpolation_profile(a, b, lambda m: 0.3, num_points=2)
    with pytest.raises(ValueError, match="num_points"):
        interpolation_profile(a, b, lambda m: (0.0, 0.0), num_points=1)
    assert math.isclose(weight_distance(a, b), math.sqrt(4 + 2 + 2 + 2), rel_tol=1e-9)  # BN weight+bias count


# ------------------------------------------------------------------------------------- LoRA (peft) members
def _two_adapters(family: str):
    """Two peft models on ONE base with different, non-zero adapters (and heads): a ViT classifier with a
    ``modules_to_save`` head, or a Llama LM (untied embeddings)."""
    from peft import LoraConfig, get_peft_model

    from hf_ens.testing_utils import TINY_LORA
    from tests._lm import tiny_llama

    if family == "vit":
        base, config = tiny_vit(0), TINY_LORA
    else:
        base, config = tiny_llama(0), dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    models = []
    for seed in (1, 2):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # the factors and the head: away from peft's B = 0 start
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        models.append(model.eval())
    return models


def _merged_state(peft_model) -> dict[str, torch.Tensor]:
    """peft's own merge (``merge_and_unload`` of a copy), independent of hf_ens.adapters."""
    return copy.deepcopy(peft_model).merge_and_unload().state_dict()


@pytest.mark.parametrize("family", ["vit", "llama"])
def test_lora_models_are_interpolated_on_their_merged_weights(family):
    """The midpoint of two LoRA members is the model holding the average of their merged weights (peft's
    merge_and_unload), not the merge of averaged A and B factors, which lies off the straight line."""
    from hf_ens.soups import weighted_average

    a, b = _two_adapters(family)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    mid = interpolate(a, b, 0.5)
    assert not hasattr(mid, "peft_config")  # a plain transformers model
    merged_a, merged_b = _merged_state(a), _merged_state(b)
    expected = {k: (v + merged_b[k]) / 2 for k, v in merged_a.items() if v.is_floating_point()}
    got = mid.state_dict()
    assert max((got[k] - v).abs().max().item() for k, v in expected.items()) <= 1e-6
    naive = _merged_state(weighted_average([a, b], [0.5, 0.5]))  # interpolated A and B, then merged
    adapted = [k for k in expected if not torch.equal(merged_a[k], merged_b[k])]
    assert max((naive[k] - expected[k]).abs().max().item() for k in adapted) > 1e-3
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in before.items())  # inputs untouched

    # the profile's end points are the members themselves, its middle the merged midpoint
    x = (
        {"pixel_values": torch.randn(2, 3, 16, 16)}
        if family == "vit"
        else {"input_ids": torch.tensor([[2, 5, 9]])}
    )

    def eval_fn(model):
        with torch.no_grad():
            return {"loss": float(model(**x).logits.double().square().mean()), "error": 0.0}

    profile = interpolation_profile(a, b, eval_fn, alphas=[0.0, 0.5, 1.0])
    for value, model in zip(profile["loss"], (a, mid, b), strict=True):
        assert value == pytest.approx(eval_fn(model)["loss"], rel=1e-5)
    # distances in weight space are those of the merged weights as well
    plain_b = copy.deepcopy(b).merge_and_unload()
    assert weight_distance(a, b) == pytest.approx(
        weight_distance(copy.deepcopy(a).merge_and_unload(), plain_b)
    )
