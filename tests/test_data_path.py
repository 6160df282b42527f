"""recipes/data.py: the tensor data path matches the image processor (pixels and accuracy), augments like the
processor path, runs as a forward pre-hook that is never saved, caches its decoding, and falls back with a
notice for processors it cannot reproduce."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_ens.testing_utils import tiny_vit
from recipes.data import (
    DevicePreprocessor,
    _resize_float_passes,
    attach_transforms,
    collate,
    decode_images,
    draw_crop_boxes,
    resample_boxes,
)
from tests._recipe_utils import ROOT, tiny_cifar

# Measured max |tensor path - processor path| after normalization, in uint8 levels (a level is 1/255/std:
# 2/255 at std 0.5), for both resizes (the CPU's uint8 kernel, and the float passes other devices use):
# upsampling 32 -> 224 bilinear is exact to float rounding (1.2e-7); bicubic up and bilinear/bicubic down
# differ by at most two levels on <2% of pixels (PIL's fixed-point filter weights).
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # per-channel statistics


def _processor(size: int, resample: int = 2, **kwargs):
    from transformers import ViTImageProcessor

    kwargs = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, **kwargs}
    return ViTImageProcessor(size={"height": size, "width": size}, resample=resample, **kwargs)


def _images(n: int, size: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _uint8(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB")).transpose(2, 0, 1) for i in images]))


@pytest.mark.parametrize("resize", ["cpu-uint8-kernel", "float-passes"])
@pytest.mark.parametrize("resample", [2, 3], ids=["bilinear", "bicubic"])
@pytest.mark.parametrize("case,source,target", [("cifar-up", 32, 224), ("down", 64, 24)], ids=["up", "down"])
def test_pixels_match_the_processor(resize, resample, case, source, target):
    images = _images(16, source)
    processor = _processor(target, resample, **(IMAGENET if resample == 3 else {}))
    level = 1 / 255 / min(processor.image_std)
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    pre = DevicePreprocessor.from_processor(processor)
    if resize == "cpu-uint8-kernel":  # what a CPU batch gets
        got = pre(_uint8(images))
    else:  # what a GPU batch gets, computed here on the CPU
        got = pre._normalize(_resize_float_passes(_uint8(images), (target, target), pre.spec.resample))
    diff = (got - expected).abs()
    assert got.shape == expected.shape and got.dtype == torch.float32
    exact = case == "cifar-up" and resample == 2
    assert diff.max() <= (1e-5 if exact else 2 * level + 1e-5), float(diff.max())
    assert (diff > 1e-4).float().mean() < 0.02  # only a few pixels differ at all


def test_accuracy_agrees_on_fashion_mnist_test_set(tmp_path):
    """A briefly pre-trained ViT (28 px) on all 5,000 test images of its classes, stored at 36x36 so that both
    paths must resize (36 -> 28, antialiased): accuracies within 0.2 points, predictions nearly identical."""
    import datasets
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hf_ens.evaluation import predict_logits
    from recipes.image_datasets import load_fashion_mnist
    from recipes.pretrain_vit import ensure_pretrained_checkpoint

    small = dict(train_size=3000, eval_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=2)
    ckpt = ensure_pretrained_checkpoint(dict(cache_dir=str(tmp_path), intermediate_size=128, **small))
    model = AutoModelForImageClassification.from_pretrained(ckpt).eval()
    processor = AutoImageProcessor.from_pretrained(ckpt)
    test = load_fashion_mnist([0, 1, 2, 5, 8])["test"]
    assert len(test) == 5000
    test = test.map(
        lambda b: {"image": [i.resize((36, 36), Image.BICUBIC) for i in b["image"]]},
        batched=True,
        features=datasets.Features({"image": datasets.Image(), "label": test.features["label"]}),
    )

    def loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=500, collate_fn=collate)

    pre = DevicePreprocessor.from_processor(processor)
    tensor_logits, y = predict_logits(model, pre.eval_batches(loader(decode_images(test, pre.spec)), "cpu"))
    processor_logits, y2 = predict_logits(model, loader(attach_transforms(test, processor, augment=False)))
    assert torch.equal(y, y2)
    acc_tensor = (tensor_logits.argmax(-1) == y).float().mean().item()
    acc_processor = (processor_logits.argmax(-1) == y).float().mean().item()
    assert acc_processor > 0.6, acc_processor  # a real model (chance: 0.2)
    assert abs(acc_tensor - acc_processor) <= 0.002, (acc_tensor, acc_processor)
    assert (tensor_logits.argmax(-1) != processor_logits.argmax(-1)).float().mean() <= 0.002


def test_crop_boxes_follow_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    top, left, h, w, flip = draw_crop_boxes(4000, 224, 224, generator=g)
    area, ratio = h * w / 224**2, w / h
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.45 < area.mean() < 0.6
    assert ratio.min() >= 0.74 and ratio.max() <= 1.35
    assert (top >= 0).all() and (top + h <= 224).all() and (left >= 0).all() and (left + w <= 224).all()
    assert 0.45 < flip.float().mean() < 0.55


def test_box_resampling_is_the_crop_resized():
    x = torch.rand(3, 3, 40, 40)
    top, left = torch.tensor([0.0, 5.0, 10.0]), torch.tensor([0.0, 3.0, 20.0])
    h, w = torch.tensor([40.0, 20.0, 16.0]), torch.tensor([40.0, 30.0, 12.0])
    flip = torch.tensor([False, False, True])
    out = resample_boxes(x, top, left, h, w, flip)
    torch.testing.assert_close(out[0], x[0])  # whole image, no flip: identity
    for i in (1, 2):
        t, lft, hh, ww = int(top[i]), int(left[i]), int(h[i]), int(w[i])
        crop = x[i : i + 1, :, t : t + hh, lft : lft + ww]
        ref = F.interpolate(crop, size=(40, 40), mode="bilinear", align_corners=False)[0]
        ref = ref.flip(-1) if flip[i] else ref
        # equal away from the box's half-pixel border (there the grid reads the neighbours, not the edge)
        torch.testing.assert_close(out[i, :, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-5, rtol=0)


def test_training_step_is_one_resampling_of_resize_then_crop():
    """Augmenting the small source once equals resizing to 224 first and cropping that (the processor path's
    order), up to the second interpolation's smoothing."""
    pre = DevicePreprocessor.from_processor(_processor(224), augment=True)
    pixels = _uint8(_images(8, 32))
    torch.manual_seed(0)
    once = pre(pixels, train=True)
    torch.manual_seed(0)
    boxes = draw_crop_boxes(8, 224, 224)
    twice = resample_boxes(pre(pixels, train=False), *boxes)
    assert once.shape == twice.shape == (8, 3, 224, 224)
    assert (once - twice).abs().mean() < 0.02
    assert not torch.equal(pre(pixels, train=True), once)  # a new draw each call
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as inside a bf16 model's forward: still float32
        under_autocast = pre(pixels, train=True)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, once)


def test_resized_boxes_as_two_matmuls_equal_grid_sample():
    """Boxes resized to another size go through per-axis weight matrices; they sample where grid_sample
    samples (same grid, border clamping), to float rounding, flips and edge boxes included."""
    x = torch.randn(64, 3, 32, 32)
    top, left, h, w, flip = draw_crop_boxes(64, 224, 224, generator=torch.Generator().manual_seed(0))
    h[:3], w[:3], top[:3], left[:3] = 224.0, 224.0, 0.0, 0.0  # whole images (one mirrored below)
    flip[0], flip[1] = True, False
    got = resample_boxes(x, top, left, h, w, flip, size=(224, 224))
    theta = torch.zeros(64, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -w / 224, w / 224)
    theta[:, 0, 2] = (2 * left + w) / 224 - 1
    theta[:, 1, 1] = h / 224
    theta[:, 1, 2] = (2 * top + h) / 224 - 1
    grid = F.affine_grid(theta, [64, 1, 224, 224], align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    whole = F.interpolate(x[1:2], size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got[1:2], whole, atol=5e-5, rtol=0)  # a whole box is the plain resize
    mirrored = F.interpolate(x[0:1], size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got[0:1], mirrored.flip(-1), atol=5e-5, rtol=0)


def test_forward_pre_hook_preprocesses_and_is_not_saved(tmp_path):
    from transformers import ViTForImageClassification

    model = tiny_vit(image_size=32, patch_size=8)
    pre = DevicePreprocessor.from_processor(_processor(32), augment=True)
    handle = pre.attach(model)
    pixels = _uint8(_images(4, 16))
    with torch.no_grad():
        hooked = model(pixel_values=pixels).logits
        torch.testing.assert_close(hooked, model(pre(pixels)).logits)  # uint8 positional input too
        plain = model(pixel_values=pre(pixels)).logits  # float input passes through untouched
        torch.testing.assert_close(hooked, plain)
        model.train()
        torch.manual_seed(1)
        augmented = model(pixel_values=pixels).logits
        assert not torch.allclose(augmented, hooked)
        torch.manual_seed(1)
        torch.testing.assert_close(model(pixel_values=pixels).logits, augmented)  # seeded: reproducible
    model.eval().save_pretrained(tmp_path / "m")
    loaded = ViTForImageClassification.from_pretrained(tmp_path / "m").eval()
    assert not loaded._forward_pre_hooks
    torch.testing.assert_close(loaded(pixel_values=pre(pixels)).logits, hooked)
    handle.remove()
    with pytest.raises(ValueError, match="uint8"):
        pre(pixels.float())


def test_decode_once_uint8_cached_and_mixed_sizes(tmp_path):
    import datasets
    from PIL import Image

    parquet = tmp_path / "train.parquet"
    tiny_cifar(n_train=12, n_test=1)["train"].rename_column("img", "image").to_parquet(parquet)
    ds = datasets.load_dataset(
        "parquet", data_files=str(parquet), split="train", cache_dir=str(tmp_path / "c")
    )
    pre = DevicePreprocessor.from_processor(_processor(224))
    first = decode_images(ds, pre.spec)
    again = decode_images(ds, pre.spec)
    assert first.source.cache_files and first.source.cache_files == again.source.cache_files  # by fingerprint
    batch = collate([first[i] for i in range(4)])
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == ds["label"][:4]
    torch.testing.assert_close(batch["pixel_values"], _uint8(ds["image"][:4]))

    # different sizes and a grey image: stored at the processor's size with its filter, RGB
    images = [*_images(2, 40), Image.fromarray(np.full((20, 30), 77, np.uint8))]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    mixed = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0]}, features=features)
    small = _processor(24)
    decoded = decode_images(mixed, DevicePreprocessor.from_processor(small).spec)
    pixels = collate([decoded[i] for i in range(3)])["pixel_values"]
    assert pixels.shape == (3, 3, 24, 24) and (pixels[2] == 77).all()
    expected = small(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(DevicePreprocessor.from_processor(small)(pixels), expected, atol=1e-5, rtol=0)


def test_unreproducible_processors_fall_back_with_a_notice(capsys, tmp_path):
    from transformers import ConvNextImageProcessor

    from recipes import vit_cifar
    from recipes.image_datasets import prepare_data

    cropping = _processor(32, do_center_crop=True, crop_size={"height": 24, "width": 24})
    assert DevicePreprocessor.from_processor(cropping) is None
    assert DevicePreprocessor.from_processor(ConvNextImageProcessor()) is None
    assert DevicePreprocessor.from_processor(_processor(32, resample=0)) is None  # PIL nearest: not exact
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[data]")]
    assert len(lines) == 3 and "do_center_crop" in lines[0] and "ConvNextImageProcessor" in lines[1]
    assert "resamples with" in lines[2]

    # the recipe then uses the processor path: float pixel_values from the image processor, no hook
    ds = tiny_cifar(n_train=4, n_test=1)["train"].rename_column("img", "image")
    args = vit_cifar.ScriptArguments(dataset_name="x")
    train, train_eval, _, test, preprocess = prepare_data(ds, ds, ds, cropping, args)
    assert preprocess is None
    assert train_eval[0]["pixel_values"].dtype == torch.float32
    assert train_eval[0]["pixel_values"].shape == (3, 24, 24)
    train, *_, preprocess = prepare_data(ds, ds, ds, _processor(32), args)
    assert preprocess is not None and train[0]["pixel_values"].dtype == torch.uint8


def test_gpu_benchmark_smoke_runs_without_datasets():
    """benchmarks/gpu_throughput.py --smoke on CPU, with `datasets` and `evaluate` made unimportable (the GPU
    machine lacks them)."""
    code = (
        "import sys, runpy; sys.modules['datasets'] = sys.modules['evaluate'] = None; "
        "sys.argv = ['gpu_throughput.py', '--smoke', '--steps', '2', '--warmup', '1']; "
        "runpy.run_path('benchmarks/gpu_throughput.py', run_name='__main__')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "StarSSETrainer / plain loop:" in out.stdout and "plain torch loop :" in out.stdout
