"""The one weighted running mean (`hf_ens.averaging`) that soups, merges and LoRA soups share."""

from __future__ import annotations

import pytest
import torch

from hf_ens.averaging import RunningSum, check_weights, floating_names, weighted_mean
from hf_ens.testing_utils import tiny_bert


def test_weighted_mean_accumulates_bf16_in_float32():
    tensors = [torch.full((3,), v, dtype=torch.bfloat16) for v in (1.0, 1.0078125, 1.0078125)]
    got = weighted_mean(iter(tensors), [1.0, 2.0, 1.0])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.full((3,), (1.0 + 3 * 1.0078125) / 4))
    assert weighted_mean([torch.ones(2, dtype=torch.float64)], [3.0]).dtype == torch.float64
    with pytest.raises(ValueError, match="no tensors"):
        weighted_mean([], [])


def test_check_weights_refuses_before_any_work():
    assert check_weights(None, 2) == [1.0, 1.0]
    for bad in ([1.0], [1.0, float("nan")], [True, 1.0]):
        with pytest.raises(ValueError, match="one finite weight per adapter"):
            check_weights(bad, 2, "adapter")
    with pytest.raises(ValueError, match="sum to 0"):
        check_weights([1.0, -1.0], 2)


def test_tied_weights_are_averaged_once():
    model = tiny_bert(0)
    model.cls_weight = model.bert.embeddings.word_embeddings.weight  # a second name, one storage
    names = floating_names(model)
    state = model.state_dict()
    assert len(names) < sum(t.is_floating_point() for t in state.values())
    running = RunningSum(state, names, 2.0)
    running.add(state, 2.0)
    mean = running.mean()
    torch.testing.assert_close(mean[names[0]], state[names[0]].float())
