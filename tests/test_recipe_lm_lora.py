"""recipes/lm_lora.py end to end on a tiny setting of the offline default (real fortunes, a tiny Llama
pre-trained on the spot), its caching pre-training, the Hub config (parsed, not run) and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hf_ens.trainers import StarSSEConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes import lm_lora, pretrain_lm
from recipes._cli import ConfigError, parse_config_and_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.skipif(not os.path.isdir(pretrain_lm.FORTUNES_DIR), reason="Debian's fortunes not installed"),
]
TINY_PRETRAIN = dict(
    categories=["riddles", "pets"],
    vocab_size=300,
    max_length=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_steps=30,
    batch_size=16,
    learning_rate=1e-2,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _pretrain_yaml(tmp_path: Path) -> Path:
    lines = [f"cache_dir: {tmp_path / 'cache'}"]
    for key, value in TINY_PRETRAIN.items():
        lines.append(f"{key}: {json.dumps(value)}")
    path = tmp_path / "pretrain.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--pretrain_config", str(_pretrain_yaml(tmp_path)),
        "--categories", "love", "kids",
        "--max_train_samples", "60", "--max_test_samples", "12", "--max_length", "32",
        "--num_members", "2", "--num_train_epochs", "2", "--cycle_epochs", "1",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--cycle_learning_rate", "1e-2",
        "--lora_r", "2", "--num_samples", "2", "--max_new_tokens", "5",
        "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def test_fortunes_are_read_from_the_plain_category_files():
    categories = pretrain_lm.fortune_categories()
    assert "science" in categories and not any("." in c for c in categories)
    texts = pretrain_lm.load_fortunes(["riddles"])
    assert len(texts) > 100 and all("%" != t and "\n" not in t and "\x08" not in t for t in texts)
    with pytest.raises(ValueError, match="Unknown fortune categories"):
        pretrain_lm.load_fortunes(["nope"])


def test_offline_recipe_end_to_end_prints_the_table_and_writes_loadable_models(tmp_path, capsys):
    metrics = lm_lora.main(_tiny_args(tmp_path))
    out = capsys.readouterr().out
    for row in ("member mean", "ensemble", "uniform soup", "best merge", "ties d=0.5", "dare_ties d=0.5"):
        assert row in out
    assert out.count("[sample]") == 2
    for key in ("member_mean", "ensemble", "soup", "best_merge"):
        assert 1.0 < metrics[f"{key}/perplexity"] < 300 and 0 <= metrics[f"{key}/ece"] <= 1
        assert metrics[f"{key}/perplexity"] == pytest.approx(2.718281828 ** metrics[f"{key}/nll"])
    assert metrics["ensemble/nll"] <= metrics["member_mean/nll"] + 1e-9  # averaged probabilities never lose
    # the held-out choice: the best merge has the lowest held-out NLL of the merges
    best = metrics["best_merge/method"]
    assert best == min(lm_lora.LMScriptArguments().merge_methods, key=lambda m: metrics[f"held_out/{m}/nll"])
    # task arithmetic with weights 1/K is the uniform soup
    assert metrics["held_out/task_arithmetic/nll"] == pytest.approx(metrics["held_out/soup/nll"], abs=1e-5)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["best_merge/method"] == best and len(saved["samples"]) == 2
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "best_merge")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "best_merge")
    assert merged.generate(**tokenizer(["a riddle"], return_tensors="pt"), max_new_tokens=3).shape[1] > 2
    soup = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "ensemble_repo")
    assert soup.lm_head.weight is soup.model.embed_tokens.weight  # tied embeddings kept tied in the soup


def test_auto_cycle_learning_rate_probes_the_lora_members_on_the_held_out_split(tmp_path):
    """cycle_learning_rate="auto" in the recipe: the probes run on the held-out split (the merged adapters'
    token NLL) and the choice travels into the ensemble repo."""
    lm_lora.main(_tiny_args(tmp_path, "--cycle_learning_rate", "auto", "--cycle_lr_grid", "0.5", "2.0"))
    probe = json.loads((tmp_path / "out" / "basin_probe.json").read_text())
    assert probe["chosen_multiplier"] in (0.5, 2.0) and probe["table"]
    config = json.loads((tmp_path / "out" / "ensemble_repo" / "ensemble_config.json").read_text())
    assert config["metadata"]["cycle_learning_rate_mode"] == "auto"
    assert config["metadata"]["cycle_learning_rate"] == pytest.approx(probe["cycle_learning_rate"])


def test_pretrained_lm_is_cached_by_its_settings(tmp_path):
    settings = {**TINY_PRETRAIN, "max_steps": 2, "cache_dir": str(tmp_path)}
    first = pretrain_lm.ensure_pretrained_lm(settings)
    stamp = os.stat(Path(first) / "model.safetensors").st_mtime_ns
    assert pretrain_lm.ensure_pretrained_lm(settings) == first
    assert os.stat(Path(first) / "model.safetensors").st_mtime_ns == stamp  # found, not retrained
    other = pretrain_lm.ensure_pretrained_lm({**settings, "seed": 1})
    assert other != first
    tokenizer = AutoTokenizer.from_pretrained(first)
    text = "Naïve café: 100% — unseen bytes!"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text  # byte-level


def test_hub_config_parses_and_needs_the_hub():
    args, training = parse_config_and_args(
        (lm_lora.LMScriptArguments, StarSSEConfig),
        ["--config", str(ROOT / "recipes" / "configs" / "lm_lora_smollm2.yaml")],
    )
    assert args.model_name_or_path == "HuggingFaceTB/SmolLM2-135M" and training.num_members == 5
    assert lm_lora.hub_repos(args) == [
        ("model", "HuggingFaceTB/SmolLM2-135M"),
        ("dataset", "Salesforce/wikitext"),
    ]
    with pytest.raises(ConfigError, match="Hub cannot be reached.*make demo-lm"):
        lm_lora.check_hub(args)
    (default, _) = parse_config_and_args(
        (lm_lora.LMScriptArguments, StarSSEConfig), [], default_config=lm_lora.DEFAULT_CONFIG
    )
    assert lm_lora.hub_repos(default) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--merge_methods", "slerp"], "Unknown merge_methods"),
        (["--merge_density", "0"], "merge_density"),
        (["--categories", "nope"], "Unknown fortune categories"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, extra, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        lm_lora.main(_tiny_args(tmp_path, *extra))
    assert not (tmp_path / "out" / "members").exists()


def test_the_lm_cache_key_holds_the_cpu_numerics(monkeypatch):
    """As for the ViT (issue 26's finding): a tiny LM pre-trained under one CPU code path is never reused
    under another, since the CPU's float rounding changes the weights."""
    args = pretrain_lm._as_args(dict(TINY_PRETRAIN))
    monkeypatch.delenv("MKL_CBWR", raising=False)
    before = args.checkpoint_dir()
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    assert args.checkpoint_dir() != before
    assert args.key_inputs()["numerics"]["MKL_CBWR"] == "AVX2"
