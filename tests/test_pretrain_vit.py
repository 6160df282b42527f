"""Offline pre-training recipe on a tiny config (trains, caches, loads via Auto classes); YAML + CLI."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import pytest
import torch

from hf_ens.testing_utils import one_torch_thread
from recipes._cli import ConfigError, parse_config_and_args
from recipes.pretrain_vit import PretrainArguments, ensure_pretrained_checkpoint, main

_one_torch_thread = pytest.fixture(autouse=True)(one_torch_thread)


_DATA_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
HAVE_DATA = os.path.isfile(os.path.join(_DATA_DIR, "train-images-idx3-ubyte.gz")) or os.environ.get(
    "HF_HUB_OFFLINE", "0"
).upper() not in ("1", "ON", "YES", "TRUE")

TINY = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "train_size": 60,
    "eval_size": 20,
    "max_steps": 3,
    "batch_size": 20,
    "num_threads": 1,
}


@pytest.mark.skipif(
    not HAVE_DATA, reason=f"Fashion-MNIST IDX files absent ({_DATA_DIR}) and HF_HUB_OFFLINE=1"
)
def test_pretrain_caches_and_loads_with_auto_classes(tmp_path, capsys):
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    args = PretrainArguments(cache_dir=str(tmp_path), **TINY)
    with ThreadPoolExecutor(2) as pool:  # two concurrent callers on a cold cache: one trains, one waits
        paths = list(pool.map(ensure_pretrained_checkpoint, [args, dict(cache_dir=str(tmp_path), **TINY)]))
    assert paths[0] == paths[1] and capsys.readouterr().out.count("Pre-trained ViT") == 1
    path = paths[0]
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith("vit-fmnist-")
    leftovers = {p.name for p in tmp_path.iterdir()} - {
        os.path.basename(path),
        os.path.basename(path) + ".lock",
    }
    assert not leftovers  # no temporary folder left behind
    record = json.load(open(os.path.join(path, "pretrain_config.json")))
    assert record["metrics"]["train_steps"] == 3 and record["metrics"]["train_images"] == 60
    assert 0.0 <= record["metrics"]["eval_accuracy"] <= 1.0

    model, info = AutoModelForImageClassification.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # every saved weight found its module
    processor = AutoImageProcessor.from_pretrained(path)
    assert model.config.id2label == {0: "T-shirt/top", 1: "Trouser", 2: "Pullover", 3: "Sandal", 4: "Bag"}
    gray = PIL.Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28) % 255, mode="L")
    big_rgb = PIL.Image.new("RGB", (64, 48), (10, 200, 30))
    pixel_values = processor([gray, big_rgb], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 28, 28)  # grayscale -> RGB and resized to the model
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
    assert model(pixel_values=pixel_values).logits.shape == (2, 5)

    stale = tmp_path / f".{os.path.basename(path)}.tmp-killed"
    stale.mkdir()  # what a run killed mid-training leaves behind; the next training run removes it

    # second call: cache hit, nothing retrained or rewritten
    weights = os.path.join(path, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    assert ensure_pretrained_checkpoint(dict(cache_dir=str(tmp_path), **TINY)) == path
    assert os.stat(weights).st_mtime_ns == stamp
    # a setting that changes the weights is another checkpoint; cache_dir/force are not part of the key
    assert PretrainArguments(**{**TINY, "seed": 1}).cache_key() != args.cache_key()
    assert PretrainArguments(**{**TINY, "force": True}).cache_key() == args.cache_key()

    # the script: YAML config + CLI overrides, force retrains in place
    config = tmp_path.parent / "tiny.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in TINY.items()))
    again = main(["--config", str(config), "--cache_dir", str(tmp_path), "--force"])
    assert again == path and os.stat(weights).st_mtime_ns != stamp and not stale.exists()
    reloaded = AutoModelForImageClassification.from_pretrained(path)
    assert torch.equal(reloaded.classifier.weight, model.classifier.weight)  # same seed, same weights


def test_cache_key_covers_threads_data_and_code_version(tmp_path, monkeypatch):
    """The checkpoint depends on more than the settings; each such input must change the folder."""
    import shutil

    import recipes.pretrain_vit as pretrain_vit

    base = PretrainArguments(**TINY)
    inputs, key = base.key_inputs(), base.cache_key()
    assert inputs["num_threads"] == 1 and inputs["version"] == pretrain_vit.PRETRAIN_VERSION
    assert inputs["torch"] == torch.__version__ and inputs["data"].startswith(("idx:", "hub:"))
    # torch threads: 1 and 2 give different weights bit for bit on CPU, so they are different checkpoints
    assert PretrainArguments(**{**TINY, "num_threads": 2}).cache_key() != key
    # None means "whatever torch uses now", resolved into the key
    torch_threads = torch.get_num_threads()
    assert PretrainArguments(**{**TINY, "num_threads": None}).key_inputs()["num_threads"] == torch_threads
    # a new version of the pre-training code
    monkeypatch.setattr(pretrain_vit, "PRETRAIN_VERSION", pretrain_vit.PRETRAIN_VERSION + 1)
    assert PretrainArguments(**TINY).cache_key() != key
    monkeypatch.undo()
    # other data bytes (a copy of the IDX files with one label changed)
    if not os.path.isfile(os.path.join(_DATA_DIR, "train-labels-idx1-ubyte.gz")):
        pytest.skip("no local IDX files to copy")
    import gzip

    copy = tmp_path / "fmnist"
    shutil.copytree(_DATA_DIR, copy)
    labels = copy / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8] = (raw[8] + 1) % 10
    labels.write_bytes(gzip.compress(bytes(raw)))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(copy))
    assert PretrainArguments(**TINY).cache_key() != key
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        PretrainArguments(num_threads=0)


def test_pretraining_runs_on_its_own_thread_count(tmp_path):
    if not HAVE_DATA:
        pytest.skip("no Fashion-MNIST")
    from recipes.pretrain_vit import pretrain

    before = torch.get_num_threads()
    metrics = pretrain(PretrainArguments(**{**TINY, "max_steps": 1, "num_threads": 2}), str(tmp_path))
    assert metrics["torch_threads"] == 2 and torch.get_num_threads() == before == 1
    record = json.load(open(tmp_path / "pretrain_config.json"))
    assert record["settings"]["num_threads"] == 2 and "data" in record["settings"]


def test_bad_pretrain_settings_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="must divide image_size"):
        PretrainArguments(patch_size=5)
    with pytest.raises(ValueError, match="distinct"):
        PretrainArguments(source_classes=[1, 1])
    with pytest.raises(ValueError, match="Unknown pre-training key"):
        ensure_pretrained_checkpoint({"hiden_size": 8})
    with pytest.raises(TypeError, match="YAML path"):
        ensure_pretrained_checkpoint(42)


@dataclass
class ScriptArgs:
    source_classes: list[int] = field(default_factory=lambda: [0, 1])
    train_size: int | None = 5
    force: bool = True


def test_yaml_then_cli_overrides(tmp_path):
    from transformers import TrainingArguments

    config = tmp_path / "c.yaml"
    config.write_text(
        "source_classes: [3, 4]\nlearning_rate: 2.0e-3\ntrain_size: null\nforce: false\n"
        "output_dir: out\nlr_scheduler_type: cosine\nbf16: false\n"
    )
    script, train = parse_config_and_args(
        (ScriptArgs, TrainingArguments), ["--config", str(config), "--learning_rate", "5e-4"]
    )
    assert script.source_classes == [3, 4] and script.force is False and script.train_size is None
    assert train.learning_rate == 5e-4  # the command line wins over the file
    assert train.output_dir == "out" and train.lr_scheduler_type == "cosine"
    (plain,) = parse_config_and_args(PretrainArguments, ["--hidden_size", "64", "--force"])
    assert plain.hidden_size == 64 and plain.force is True and plain.source_classes == [0, 1, 2, 5, 8]
    with pytest.raises(TypeError, match="both define"):
        parse_config_and_args((PretrainArguments, TrainingArguments), [])


def test_unknown_or_invalid_keys_are_clear_errors(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("hiden_size: 64\n")
    with pytest.raises(ConfigError, match=r"'hiden_size' \(did you mean hidden_size") as err:
        parse_config_and_args(PretrainArguments, ["--config", str(config)])
    assert "Valid keys:" in str(err.value) and "num_train_epochs" in str(err.value)
    with pytest.raises(ConfigError, match="on the command line"):
        parse_config_and_args(PretrainArguments, ["--num_layers", "2"])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config_and_args(PretrainArguments, ["--config", str(tmp_path / "missing.yaml")])
    config.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        parse_config_and_args(PretrainArguments, ["--config", str(config)])
    config.write_text("lr_scheduler_type: wobbly\n")
    with pytest.raises(ConfigError, match="invalid choice: 'wobbly'"):  # one line, before any work
        from transformers import TrainingArguments

        parse_config_and_args((ScriptArgs, TrainingArguments), ["--config", str(config)])
