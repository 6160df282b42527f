"""Every shipped YAML config parses with the script that reads it (unknown keys, wrong types and refused
values fail here, not after a download); the paper-code configs carry shared/paper-notes.md values."""

from __future__ import annotations

import pytest
import yaml
from hf_ens.trainers import StarSSEConfig

from recipes._cli import parse_config_and_args
from recipes.compare_methods import CompareArguments
from recipes.lm_lora import LMScriptArguments
from recipes.pretrain_lm import PretrainLMArguments
from recipes.pretrain_vit import PretrainArguments
from recipes.study import StudyArguments
from recipes.vit_cifar import ScriptArguments
from tests._recipe_utils import ROOT

CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


def _parse(path):
    if path.name.startswith("pretrain_lm"):
        return parse_config_and_args(PretrainLMArguments, ["--config", str(path)])
    if path.name.startswith("lm_"):
        return parse_config_and_args((LMScriptArguments, StarSSEConfig), ["--config", str(path)])
    if path.name.startswith("pretrain_"):
        return parse_config_and_args(PretrainArguments, ["--config", str(path)])
    classes = (ScriptArguments, StarSSEConfig)
    if path.name.startswith("study"):
        classes = (StudyArguments, *classes)
    if path.name.startswith("compare_"):
        classes = (CompareArguments, *classes)
    return parse_config_and_args(classes, ["--config", str(path)])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_to_the_values_it_writes(path):
    """Every key of the YAML reaches the parsed arguments with the value it writes (a key silently dropped
    or coerced would leave the run on a default)."""
    parsed = _parse(path)
    written = yaml.safe_load(path.read_text())
    for key, value in written.items():
        holders = [args for args in parsed if hasattr(args, key)]
        assert holders, f"{path.name}: {key!r} reached no arguments class"
        got = getattr(holders[0], key)
        got = got.value if hasattr(got, "value") else got  # enums (e.g. lr_scheduler_type)
        if key == "report_to" and value == "none":  # transformers' spelling of "no integration"
            assert got in ([], ["none"], "none"), (key, got)
        elif isinstance(value, dict):  # e.g. accelerator_config: a config object built from the mapping
            for sub, v in value.items():
                assert (got[sub] if isinstance(got, dict) else getattr(got, sub)) == v, (key, sub, got)
        elif isinstance(value, float) or isinstance(got, float):
            assert got == pytest.approx(float(value)), (key, got, value)
        elif isinstance(value, list) and isinstance(got, tuple | list):
            assert list(got) == value, (key, got, value)
        elif isinstance(value, str) and not isinstance(got, str):
            assert str(got).lower() == value.lower() or got == type(got)(value), (key, got, value)
        else:
            assert got == value, (key, got, value)


def test_paper_code_configs_carry_its_settings():
    swin = _parse(ROOT / "recipes" / "configs" / "swin_t_cifar100.yaml")[1]
    assert (swin.learning_rate, swin.weight_decay, swin.num_train_epochs, swin.max_grad_norm) == (
        1e-4,
        0.25,
        102,
        5.0,
    )
    assert swin.label_smoothing_factor == 0.1 and swin.per_device_train_batch_size == 256
    resnet = _parse(ROOT / "recipes" / "configs" / "resnet50_cifar100.yaml")[1]
    assert (resnet.learning_rate, resnet.weight_decay, resnet.num_train_epochs) == (5e-3, 5e-4, 25)
    assert str(resnet.optim.value if hasattr(resnet.optim, "value") else resnet.optim) == "sgd"
    assert resnet.optim_args == "momentum=0.9"
    for args in (swin, resnet):
        assert args.num_members == 5 and args.cycle_epochs == args.num_train_epochs
        assert args.cycle_learning_rate == args.learning_rate and args.cycle_warmup_steps == 0


def test_starsse_config_documents_every_field_with_help_and_in_its_parameters_docstring():
    """TRL's config pattern: each field of StarSSEConfig has ``metadata["help"]`` (the CLI's --help) and an
    entry under the ``Parameters:`` headings of the class docstring."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(StarSSEConfig)}
    ours = list(StarSSEConfig.__annotations__)
    assert "method" in ours and "parallel_members" in ours
    doc = StarSSEConfig.__doc__.split("Parameters:", 1)[1]
    for name in ours:
        assert fields[name].metadata.get("help", "").strip(), f"{name} has no metadata help"
        assert f"\n        {name} (`" in doc, f"{name} is not documented under Parameters:"
