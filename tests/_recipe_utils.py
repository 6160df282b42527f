"""Tiny checkpoints and a tiny CIFAR-shaped dataset for tests/test_recipe_vit_cifar.py.

Everything here is real (transformers configs, image processors, `datasets` Image/ClassLabel features) and
small enough that a whole StarSSE run of the recipe takes a few seconds on one CPU thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hf_ens.testing_utils import CLASS_NAMES, tiny_cifar, tiny_processor, tiny_resnet, tiny_vit_config  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def save_tiny_vit(
    path: str | os.PathLike, num_labels: int | None = 3, label_names=None, seed: int = 0
) -> Path:
    """A 2-layer ViT (32px, patch 8, hidden 32) + processor; `num_labels=None` saves the bare backbone."""
    from transformers import ViTForImageClassification, ViTModel

    torch.manual_seed(seed)
    kwargs = {}
    if num_labels is not None:
        names = label_names or [f"LABEL_{i}" for i in range(num_labels)]
        kwargs = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    config = tiny_vit_config(image_size=32, patch_size=8, num_labels=None, **kwargs)
    model = ViTForImageClassification(config) if num_labels is not None else ViTModel(config)
    model.save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return Path(path)


def save_tiny_resnet(path: str | os.PathLike, num_labels: int = 3, seed: int = 0) -> Path:
    """An HF ResNet with BatchNorm (2 stages, 8/16 channels) + a processor that resizes to 32x32."""
    tiny_resnet(seed, layer_type="basic", num_labels=num_labels).save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return Path(path)


def tiny_run_args(output_dir: str | os.PathLike, model: str, dataset: str, *extra: str) -> list[str]:
    """argv for `vit_cifar.main`: 3 StarSSE members (2 epochs, then 1-epoch cycles), seconds on one thread.

    No `--config`, so the defaults are recipes/configs/vit_cifar10.yaml's; the flags below replace every one
    of its settings that a tiny run cannot use (workers, checkpoints, the CIFAR schedule).
    """
    return [
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(dataset),
        "--output_dir",
        str(output_dir),
        "--num_train_epochs",
        "2",
        "--cycle_epochs",
        "1",
        "--num_members",
        "3",
        "--per_device_train_batch_size",
        "9",
        "--learning_rate",
        "3e-3",
        "--held_out_fraction",
        "0.25",
        "--eval_batch_size",
        "8",
        "--interpolation_points",
        "3",
        "--save_strategy",
        "no",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "1",
        "--dataloader_num_workers",
        "0",
        "--cycle_learning_rate",
        "3e-3",
        "--warmup_steps",
        "0",
        "--lr_scheduler_type",
        "linear",
        *extra,
    ]
