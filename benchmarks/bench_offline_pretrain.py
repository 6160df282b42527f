"""Timings of the embedded offline default's first stage: Fashion-MNIST loading and the ViT pre-training.

Prints one JSON line per measurement. The pre-training runs in a fresh temporary cache (the real cache is not
touched) with the settings of recipes/configs/pretrain_offline.yaml unless overridden:

    python benchmarks/bench_offline_pretrain.py [--skip_pretrain] [--key value ...]  # PretrainArguments keys

Target (issue 4): pre-training <= ~90 s on an unloaded 2-core CPU, so that the whole main job stays <= 5 min.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES: dict = {}  # what the JSON lines print, for the --json record

from benchmarks import _record  # noqa: E402
from recipes._cli import parse_config_and_args  # noqa: E402
from recipes.image_datasets import DEBIAN_DIR, load_fashion_mnist, read_idx  # noqa: E402
from recipes.pretrain_vit import PretrainArguments, ensure_pretrained_checkpoint  # noqa: E402


def timed(label: str, fn, **extra):
    start = time.perf_counter()
    out = fn()
    seconds = round(time.perf_counter() - start, 3)
    print(json.dumps({"what": label, "seconds": seconds, **extra}), flush=True)
    FIGURES.setdefault("seconds", {})[label] = seconds
    return out


def main() -> None:
    import torch

    argv, json_path, note = _record.pop_arguments(sys.argv[1:])
    skip_pretrain = "--skip_pretrain" in argv
    argv = [a for a in argv if a != "--skip_pretrain"]
    config = str(ROOT / "recipes" / "configs" / "pretrain_offline.yaml")
    (args,) = parse_config_and_args(PretrainArguments, ["--config", config, *argv])
    print(json.dumps({"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}))

    data_dir = os.environ.get("FASHION_MNIST_DIR", DEBIAN_DIR)
    timed("read train images IDX", lambda: read_idx(os.path.join(data_dir, "train-images-idx3-ubyte.gz")))
    timed("load all 70k as Dataset", lambda: load_fashion_mnist())
    timed("load source classes 0,1,2,5,8 (35k)", lambda: load_fashion_mnist([0, 1, 2, 5, 8]))
    timed(
        "load target task (550 train + 5k test)", lambda: load_fashion_mnist([3, 4, 6, 7, 9], train_size=550)
    )
    data = load_fashion_mnist([3, 4, 6, 7, 9], train_size=550)
    timed("decode 5k test images", lambda: data["test"][:]["image"])

    settings = {"skip_pretrain": skip_pretrain, "config": "recipes/configs/pretrain_offline.yaml"}
    settings["overrides"], settings["pretrain"] = argv, vars(args)
    if skip_pretrain:
        _record.write(json_path, "bench_offline_pretrain", settings, FIGURES, note)
        return
    with tempfile.TemporaryDirectory() as cache:
        args.cache_dir, args.force, args.use_shipped = cache, False, False  # time the training itself
        path = timed("pre-train (fresh cache)", lambda: ensure_pretrained_checkpoint(args))
        metrics = json.load(open(os.path.join(path, "pretrain_config.json")))["metrics"]
        print(json.dumps({"what": "pre-train metrics", **metrics}))
        FIGURES["pretrain_metrics"] = metrics
        timed("pre-train (cache hit)", lambda: ensure_pretrained_checkpoint(args))
    _record.write(json_path, "bench_offline_pretrain", settings, FIGURES, note)


if __name__ == "__main__":
    main()
