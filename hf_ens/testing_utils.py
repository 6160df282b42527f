"""Tiny real models and data for the tests (and benchmarks): one builder per idea, overrides for the rest.

Every builder seeds torch's global RNG first, so a `seed` names one set of weights everywhere. The defaults
(a 2-layer ViT on 16x16 RGB images, 3 labels) are what most tests need; pass config fields to change them.
It imports neither pytest nor the rest of the library, so benchmarks and subprocess scripts import it too (as
`transformers.testing_utils` serves transformers' tests).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

VIT_DEFAULTS = dict(
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_labels=3,
)
RESNET_DEFAULTS = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
BERT_DEFAULTS = dict(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    num_labels=2,
)


def _merge(defaults: dict, overrides: dict) -> dict:
    """Defaults updated by overrides; an override of None drops the field (transformers' default applies)."""
    return {k: v for k, v in {**defaults, **overrides}.items() if v is not None}


def tiny_vit_config(**overrides) -> ViTConfig:
    return ViTConfig(**_merge(VIT_DEFAULTS, overrides))


def tiny_vit(seed: int = 0, *, train: bool = False, **overrides) -> ViTForImageClassification:
    """A tiny ViT classifier built from `seed`; in eval mode unless `train` (as a Trainer would set it)."""
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config(**overrides)).train(train)


def tiny_resnet(seed: int = 0, **overrides) -> ResNetForImageClassification:
    """A tiny HF ResNet (2 stages, 8/16 channels) with BatchNorm, in eval mode."""
    torch.manual_seed(seed)
    return ResNetForImageClassification(ResNetConfig(**_merge(RESNET_DEFAULTS, overrides))).eval()


def tiny_bert_config(**overrides) -> BertConfig:
    return BertConfig(**_merge(BERT_DEFAULTS, overrides))


def tiny_bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    """A 1-layer BERT sequence classifier (vocabulary 50, 2 labels), in eval mode."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**overrides)).eval()


def random_images(
    n: int,
    seed: int = 0,
    *,
    generator: torch.Generator | None = None,
    image_size: int = 16,
    num_labels: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` standard-normal RGB images, then uniform labels, drawn from `generator` (else from `seed`)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, image_size, image_size, generator=g)
    return x, torch.randint(0, num_labels, (n,), generator=g)


class TinyImages(torch.utils.data.Dataset):
    """`random_images` as `{"pixel_values", "labels"}` items (plus the item's `idx` if `with_index`)."""

    def __init__(self, n: int = 24, seed: int = 0, *, with_index: bool = True, **kwargs):
        self.x, self.y = random_images(n, seed, **kwargs)
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        item = {"pixel_values": self.x[i], "labels": self.y[i]}
        if self.with_index:
            item["idx"] = i
        return item


def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from 2 threads; on a busy 2-core box OpenMP spinning made them 30x slower.

    A pytest fixture body: use it as ``_one_torch_thread = pytest.fixture(autouse=True)(one_torch_thread)``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A CIFAR-shaped dataset for recipe tests and the data-path benchmark: one colour per class, so a 2-layer ViT
# separates the classes after a few steps.
CLASS_NAMES = ["red", "green", "blue"]
# One colour per class, so a 2-layer ViT separates the classes after a few steps.
CLASS_COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=np.float32)


def tiny_processor():
    """A processor that `AutoImageProcessor.from_pretrained` finds, resizing to 32x32."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        do_resize=True, size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def tiny_cifar(
    n_train: int = 36, n_test: int = 12, seed: int = 0, image_column: str = "img", classlabel=True
):
    """A CIFAR-shaped DatasetDict: `img` (32x32 RGB PIL images), `label` (ClassLabel), train/test splits."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)

    def split(n: int) -> datasets.Dataset:
        labels = [i % len(CLASS_NAMES) for i in range(n)]
        images = []
        for y in labels:
            pixels = CLASS_COLOURS[y] + rng.normal(0, 40, (32, 32, 3))
            images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB"))
        label_feature = datasets.ClassLabel(names=CLASS_NAMES) if classlabel else datasets.Value("int64")
        features = datasets.Features({image_column: datasets.Image(), "label": label_feature})
        return datasets.Dataset.from_dict({image_column: images, "label": labels}, features=features)

    return datasets.DatasetDict({"train": split(n_train), "test": split(n_test)})


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a multi-process launch's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])


def tiny_lora_vit(seed: int = 0, **overrides):
    """`tiny_vit(seed)` wrapped with a LoRA adapter (peft), `TINY_LORA` updated by `overrides`."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_vit(seed), LoraConfig(**{**TINY_LORA, **overrides}))
