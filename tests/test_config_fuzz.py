"""A seeded fuzz of StarSSEConfig (issue 14): every bad value is refused with a ValueError that names the
field, before any training step, and nothing is written. Some values are refused when the config is built,
the rest (those that need the data set's size, like a max_steps that cuts a cycle) when train() sizes the
run; both count, as long as no optimizer step ran and no member or checkpoint exists."""

from __future__ import annotations

import math
import os
import random

import pytest

from hf_ens.testing_utils import one_torch_thread
from tests._trainer_utils import make_trainer

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)

NAN, INF = math.nan, math.inf
# field -> bad values for the test run (24 samples, batch 4: model 1 = 12 steps, cycles of 6, 24 in all)
BAD = {
    "learning_rate": [0, 0.0, -1e-3, INF, -INF, NAN, "1e-3", None, True],
    # a string is "auto" or a number (the command line hands both over as strings): "5e-4" is valid
    "cycle_learning_rate": [0.0, -1.0, INF, NAN, "fast", "", "-5e-4", False],
    "cycle_lr_grid": [[2.0], [], [0.0, 1.0], [1.0, NAN], [1.0, 1.0]],
    "probe_fraction": [0, 0.5, NAN, -0.1],
    "basin_tolerance": [-0.1, NAN, INF],
    "probe_loss_ratio": [0.5, -1.0, NAN, INF],
    "probe_search": ["binary", "", None],
    "num_train_epochs": [0, -2.0, INF, NAN, "2", 1e308],
    "cycle_epochs": [0, -0.5, INF, NAN, "1", 1e308],
    "cycle_warmup_steps": [-1, NAN, INF, 6, 1e12, "0"],
    "warmup_steps": [-1, NAN, INF, 12, 1e9],
    "weight_decay": [-0.1, NAN, INF],
    "max_grad_norm": [-1.0, NAN],
    "num_members": [0, -3, 2.5, "3", True, None],
    "per_device_train_batch_size": [0, -1, 2.0, "4"],
    "per_device_eval_batch_size": [0, -2, 1.5],
    "gradient_accumulation_steps": [0, 1.5],
    "max_steps": [0, -7, 2.5, 20, 25, 10**9],  # 20 and 25 cut or overrun the 24-step run
    "method": ["snapshot", "", "STARSSE", None, 3],
    "seed": ["0", 1.5, None],
    "output_dir": ["<a path under a file>"],
}
# Valid values drawn alongside the bad ones, so that a check cannot rely on the rest being defaults.
GOOD = {
    "method": ["starsse", "sse"],
    "num_members": [2, 3],
    "cycle_warmup_steps": [0, 0.5, 2],
    "reset_optimizer": [True, False],
    "gradient_accumulation_steps": [1, 2],
}


def draws(seed: int = 14) -> list[tuple[str, dict]]:
    """Every bad value once, in a seeded random order, each with a random set of valid companions."""
    rng = random.Random(seed)
    cases = []
    for bad_field, value in rng.sample(
        [(f, v) for f, vs in BAD.items() for v in vs], k=sum(map(len, BAD.values()))
    ):
        case = {name: rng.choice(values) for name, values in GOOD.items() if rng.random() < 0.5}
        case[bad_field] = value
        cases.append((bad_field, case))
    return cases


@pytest.mark.parametrize("bad_field,overrides", draws(), ids=lambda v: v if isinstance(v, str) else None)
def test_fuzzed_bad_config_is_refused_before_any_step(tmp_path, bad_field, overrides):
    out = tmp_path / "run"
    if overrides.get("output_dir"):
        (tmp_path / "file").write_text("not a directory")
        out = tmp_path / "file" / "run"
        overrides = {k: v for k, v in overrides.items() if k != "output_dir"}
    trainer = rec = None
    with pytest.raises(ValueError) as err:
        trainer, rec, _ = make_trainer(out, save_strategy="steps", save_steps=1, **overrides)
        trainer.train()
    message = str(err.value)
    assert bad_field in message, message
    if trainer is not None:  # refused by train(), after the config was accepted
        assert trainer.state.global_step == 0 and rec.lrs == {}
        assert not os.path.exists(trainer.members_dir) or os.listdir(trainer.members_dir) == []
        assert not [p for p in os.listdir(out) if p.startswith("checkpoint-")]
