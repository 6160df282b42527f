"""The recipes' image data path: decode once to uint8, preprocess in batch on the training device.

Why: the checkpoint's PIL image processor turns CIFAR's 32 px images into 224 px tensors at a few hundred
images/s per CPU process, while a GPU trains ViT-B/16 at thousands per second, and the PIL path decodes every
image again every epoch. Here

* `decode_images` turns a split's images ONCE into fixed-size uint8 ``[3, H, W]`` arrays (a `datasets` map,
  so a Hub dataset's result is cached and fingerprinted like any other map), held as one uint8 tensor;
* `collate` stacks them, the Trainer moves the small uint8 batch to the device, and
* `DevicePreprocessor` does there, in batch, what the processor does (resize, rescale, normalize) plus the
  training augmentation (random resized crop + horizontal flip), with torch ops on whatever device the batch
  is on, CPU or GPU alike.

The training model gets the step as a forward pre-hook (`DevicePreprocessor.attach`): it runs after the
Trainer has moved the batch to the model's device, inside any Trainer (or a plain loop), augments only in
``model.train()`` mode, is not part of the weights (``save_pretrained`` writes the plain model), and passes
float ``pixel_values`` through untouched. Evaluation feeds the same step through `eval_batches`.

Processors whose steps this cannot reproduce exactly (a centre crop, padding, shortest-edge resizing, a class
with its own ``_preprocess``, an unknown resampling filter) fall back to the processor path
(`attach_transforms`) with a one-line notice.

Nothing here imports `datasets` at module level: the device-side step is usable where it is not installed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# PIL resampling ids -> antialiased interpolate modes that compute the same filter (PIL's NEAREST picks other
# pixels than torch's nearest modes when downsampling: not reproduced)
_PIL_TO_TORCH = {2: "bilinear", 3: "bicubic"}
_TORCH_TO_PIL = {v: k for k, v in _PIL_TO_TORCH.items()}


@dataclass(frozen=True)
class PixelSpec:
    """The numbers of an image processor's resize / rescale / normalize, for `DevicePreprocessor`."""

    size: tuple[int, int] | None  # (height, width) to resize to; None = keep
    resample: str = "bilinear"  # "bilinear" or "bicubic" (antialiased, as PIL's filters)
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @property
    def pil_resample(self) -> int:
        return _TORCH_TO_PIL[self.resample]


def pixel_spec(processor) -> tuple[PixelSpec | None, str]:
    """(spec, "") when `DevicePreprocessor` can reproduce `processor`, else (None, why not)."""
    try:
        from transformers.image_processing_backends import PilBackend, TorchvisionBackend
        from transformers.image_processing_utils import BaseImageProcessor
    except ImportError:  # another transformers layout: do not guess
        return None, "this transformers version has no PIL/torchvision image-processor backends"
    cls = type(processor)
    name = cls.__name__
    own = [
        method
        for method in ("_preprocess", "preprocess", "_preprocess_image_like_inputs")
        if getattr(cls, method, None)
        not in {getattr(base, method, None) for base in (PilBackend, TorchvisionBackend, BaseImageProcessor)}
    ]
    if not isinstance(processor, (PilBackend, TorchvisionBackend)) or own:
        return None, f"{name} has its own preprocessing steps ({', '.join(own) or 'unknown backend'})"
    for flag in ("do_center_crop", "do_pad"):
        if getattr(processor, flag, False):
            return None, f"{name} sets {flag}=True"
    size = None
    if processor.do_resize:
        s = processor.size
        get = s.get if isinstance(s, Mapping) else lambda k: getattr(s, k, None)
        if not (get("height") and get("width")) or any(
            get(k) for k in ("shortest_edge", "longest_edge", "max_height", "max_width")
        ):
            return None, f"{name} resizes by {s} (only a fixed height x width is reproduced)"
        size = (int(get("height")), int(get("width")))
    resample = processor.resample
    mode = getattr(resample, "value", resample)  # torchvision InterpolationMode values are names
    mode = mode if isinstance(mode, str) else _PIL_TO_TORCH.get(int(mode) if mode is not None else 2)
    if size is not None and mode not in _TORCH_TO_PIL:
        return None, f"{name} resamples with {resample!r} (only bilinear and bicubic are reproduced)"

    def three(values, what: str) -> tuple[float, float, float]:
        values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values] * 3)]
        if len(values) != 3:
            raise ValueError(f"{name}.{what} has {len(values)} entries; RGB images need 3.")
        return tuple(values)

    normalize = bool(processor.do_normalize)
    return (
        PixelSpec(
            size=size,
            resample=mode or "bilinear",
            rescale_factor=float(processor.rescale_factor) if processor.do_rescale else None,
            mean=three(processor.image_mean, "image_mean") if normalize else None,
            std=three(processor.image_std, "image_std") if normalize else None,
        ),
        "",
    )


# ------------------------------------------------------------------------------------------ device side


def random_resized_crop_flip(
    pixels: torch.Tensor, generator: torch.Generator | None = None, min_scale: float = 0.08
) -> torch.Tensor:
    """RandomResizedCrop(scale=(min_scale, 1), ratio=(3/4, 4/3)) + horizontal flip (p=0.5) of a [B, C, H, W]
    batch (torchvision's default min_scale is 0.08).

    Every image gets its own box (`draw_crop_boxes`) and is resampled bilinearly back to H x W in ONE batched
    `grid_sample` on the batch's device (`resample_boxes`). `generator` must live on the batch's device.
    """
    b, _, h, w = pixels.shape
    return resample_boxes(pixels, *draw_crop_boxes(b, h, w, pixels.device, generator, min_scale))


def _resized_crop_flip(
    pixels: torch.Tensor,
    size: tuple[int, int],
    generator: torch.Generator | None = None,
    min_scale: float = 0.08,
) -> torch.Tensor:
    """`random_resized_crop_flip` of `pixels` resized to `size`, in ONE resampling from the source: boxes are
    drawn in `size` coordinates, and align_corners=False grid coordinates are resolution-free, so sampling
    the source with the box's grid is the composition of the resize and the crop (bilinear once, not
    twice)."""
    top, left, ch, cw, flip = draw_crop_boxes(pixels.shape[0], *size, pixels.device, generator, min_scale)
    return resample_boxes(pixels, top, left, ch, cw, flip, size=size)


def draw_crop_boxes(
    b: int,
    h: int,
    w: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    min_scale: float = 0.08,
) -> tuple[torch.Tensor, ...]:
    """(top, left, height, width, flip) of `b` random boxes, drawn like torchvision's RandomResizedCrop:
    area fraction U(min_scale, 1), log aspect ratio U(log 3/4, log 4/3), the first of 10 tries that fits,
    else the whole image; position uniform; flip with p=0.5. All on `device`, no host synchronisation."""
    target = torch.empty(b, 10, device=device).uniform_(min_scale, 1.0, generator=generator) * (h * w)
    ratio = torch.empty(b, 10, device=device).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = ratio.exp()
    cw, ch = (target * ratio).sqrt().round(), (target / ratio).sqrt().round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.int().argmax(dim=1, keepdim=True)  # first valid try (0 when none: replaced below)
    found = ok.any(dim=1)
    cw = torch.where(found, cw.gather(1, first)[:, 0], torch.full_like(cw[:, 0], w))
    ch = torch.where(found, ch.gather(1, first)[:, 0], torch.full_like(ch[:, 0], h))
    top = (torch.rand(b, device=device, generator=generator) * (h - ch + 1)).floor()
    left = (torch.rand(b, device=device, generator=generator) * (w - cw + 1)).floor()
    flip = torch.rand(b, device=device, generator=generator) < 0.5
    return top, left, ch, cw, flip


def resample_boxes(
    pixels: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    flip: torch.Tensor,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Crop box i (pixel units of an image of `size`, default the batch's H x W) of image i, bilinearly
    resampled to `size`, mirrored where `flip`.

    The sampling grid is the one `interpolate(crop, (H, W), mode="bilinear", align_corners=False)` uses; only
    the half-pixel border of a box reads its neighbours instead of repeating its own edge.

    At the batch's own size this is one `grid_sample`. When the boxes are also resized (CIFAR's 32 px to
    224), the same bilinear map is applied as two batched matmuls, one per axis (`_box_weights`): grid_sample
    gathers four source pixels per output pixel and is ~6x slower on a CPU core there. The two agree to float
    rounding; grid_sample stays for same-size crops so that runs recorded with it reproduce bit for bit."""
    b = pixels.shape[0]
    h, w = size if size is not None else pixels.shape[-2:]
    if (h, w) != tuple(pixels.shape[-2:]):
        rows = _box_weights(top, height, torch.zeros_like(flip), h, pixels.shape[-2])  # [B, h, H_in]
        cols = _box_weights(left, width, flip, w, pixels.shape[-1])  # [B, w, W_in]
        out = torch.matmul(pixels.float(), cols.transpose(1, 2).unsqueeze(1))  # [B, C, H_in, w]
        return torch.matmul(rows.unsqueeze(1), out).to(pixels.dtype)
    theta = torch.zeros(b, 2, 3, device=pixels.device, dtype=torch.float32)
    theta[:, 0, 0] = torch.where(flip, -width / w, width / w)
    theta[:, 0, 2] = (2 * left + width) / w - 1
    theta[:, 1, 1] = height / h
    theta[:, 1, 2] = (2 * top + height) / h - 1
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    out = F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(pixels.dtype)


def _box_weights(
    start: torch.Tensor, length: torch.Tensor, flip: torch.Tensor, out_size: int, in_size: int
) -> torch.Tensor:
    """[B, out_size, in_size] bilinear weights along one axis: output pixel o of box i reads the source where
    `grid_sample(align_corners=False, padding_mode="border")` would (`resample_boxes`'s grid, one axis)."""
    base = (2 * torch.arange(out_size, device=start.device, dtype=torch.float32) + 1) / out_size - 1
    scale = torch.where(flip, -length / out_size, length / out_size)
    grid = scale[:, None] * base + ((2 * start + length) / out_size - 1)[:, None]
    source = (((grid + 1) * in_size - 1) / 2).clamp(0, in_size - 1)  # source pixel coordinate, border-clamped
    low = source.floor()
    frac = source - low
    low = low.long()
    weights = torch.zeros(*source.shape, in_size, device=start.device, dtype=torch.float32)
    weights.scatter_add_(2, low[..., None], (1 - frac)[..., None])
    return weights.scatter_add_(2, (low + 1).clamp(max=in_size - 1)[..., None], frac[..., None])


class DevicePreprocessor:
    """uint8 ``[B, 3, H, W]`` pixels -> the processor's float ``pixel_values``, on the pixels' device.

    Evaluation: resize (PIL's 8-bit filters: `_resize_like_pil`), rescale, normalize: the processor's
    numbers. Training (``train=True`` and `augment`): rescale and normalize the small source, then resize +
    random resized crop + flip as ONE bilinear resampling (`_resized_crop_flip`): the processor path's boxes
    and flips, one interpolation instead of two.
    """

    def __init__(self, spec: PixelSpec, augment: bool = False, min_scale: float = 0.08):
        self.spec = spec
        self.augment = augment
        self.min_scale = min_scale
        s = spec
        scale = s.rescale_factor if s.rescale_factor is not None else 1.0
        mean = torch.tensor(s.mean if s.mean is not None else (0.0,) * 3)
        std = torch.tensor(s.std if s.std is not None else (1.0,) * 3)
        # x * scale, then (x - mean) / std, as one multiply-add per element
        self._mul = (scale / std).view(1, 3, 1, 1)
        self._add = (-mean / std).view(1, 3, 1, 1)
        # the factors on each device, copied there once: a host-to-device copy in every step would make the
        # host wait for the GPU (a blocking copy synchronises the stream)
        self._factors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_processor(
        cls, processor, augment: bool = False, min_scale: float = 0.08
    ) -> DevicePreprocessor | None:
        """The tensor path for `processor`, or None after a one-line notice that the processor path is
        used."""
        spec, why = pixel_spec(processor)
        if spec is None:
            print(f"[data] processor path: {why}; the tensor data path cannot reproduce it.", flush=True)
            return None
        return cls(spec, augment=augment, min_scale=min_scale)

    def __call__(self, pixels: torch.Tensor, train: bool = False) -> torch.Tensor:
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(
                "DevicePreprocessor takes uint8 [B, 3, H, W] pixels, got "
                f"{pixels.dtype} {tuple(pixels.shape)}."
            )
        # float32 whatever autocast the model's forward runs under (bf16 would round the resampling weights)
        kind = pixels.device.type
        with torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext():
            size = self.spec.size or tuple(pixels.shape[-2:])
            if train and self.augment:  # normalize the small source, then resize + crop + flip in one pass
                x = self._normalize(pixels.float())
                return _resized_crop_flip(x, size, min_scale=self.min_scale)
            if tuple(pixels.shape[-2:]) != size:
                return self._normalize(_resize_like_pil(pixels, size, self.spec.resample))
            return self._normalize(pixels.float())

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x * rescale, then (x - mean) / std, in place on float `x` (a tensor this class made)."""
        if x.device not in self._factors:
            self._factors[x.device] = (self._mul.to(x.device), self._add.to(x.device))
        mul, add = self._factors[x.device]
        if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return torch.addcmul(add, x, mul, out=x)
        # channels_last: per-channel factors tiled along each pixel row, so the inner loop is a whole row
        # (broadcasting [1, 3, 1, 1] there runs an inner loop of 3 elements: ~3x slower)
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).view(b, h, w * c)
        torch.addcmul(add.view(c).repeat(w), rows, mul.view(c).repeat(w), out=rows)
        return x

    def attach(self, model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Run this step inside `model`'s forward on uint8 ``pixel_values``; returns the hook's handle.

        A forward pre-hook, not a wrapper module: it sees the batch after the Trainer moved it to the device,
        augments only while ``model.training``, leaves float inputs alone and is never saved with the weights.
        """

        def hook(module, args, kwargs):
            if kwargs.get("pixel_values") is not None:
                if kwargs["pixel_values"].dtype == torch.uint8:
                    kwargs = {**kwargs, "pixel_values": self(kwargs["pixel_values"], train=module.training)}
            elif args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.uint8:
                args = (self(args[0], train=module.training), *args[1:])
            return args, kwargs

        return model.register_forward_pre_hook(hook, with_kwargs=True)

    def eval_batches(self, batches: Iterable[Mapping], device: torch.device | str) -> Iterable[dict]:
        """`batches` moved to `device` (non-blocking) and preprocessed without augmentation; re-iterable."""
        return _EvalBatches(batches, self, torch.device(device))


def _resize_like_pil(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """uint8 [B, C, H, W] resized as PIL resizes 8-bit images with its bilinear/bicubic filters (up and down
    alike), as float holding uint8 levels: torch's uint8 kernel on a CPU, float passes elsewhere (torch has no
    uint8 antialiased kernel on other devices)."""
    if pixels.device.type == "cpu":
        return _resize_uint8_kernel(pixels, size, mode)
    return _resize_float_passes(pixels, size, mode)


def _resize_uint8_kernel(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """CPU: torch's uint8 antialiased kernel computes PIL's fixed-point filters (channels_last in and out; the
    float result stays channels_last, which the model's patch convolution takes as it is)."""
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    return F.interpolate(pixels, size=size, mode=mode, antialias=True, align_corners=False).float()


def _resize_float_passes(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Any device: width first, then height, each pass rounded and clipped to 0..255 as PIL keeps 8-bit images
    between passes (bicubic overshoot is clipped there)."""
    x = pixels.float()
    for pass_size in ((x.shape[-2], size[1]), size):
        if tuple(x.shape[-2:]) != tuple(pass_size):
            x = F.interpolate(x, size=pass_size, mode=mode, antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255)
    return x


class _EvalBatches:
    def __init__(self, batches: Iterable[Mapping], preprocess: DevicePreprocessor, device: torch.device):
        self.batches, self.preprocess, self.device = batches, preprocess, device

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches:
            moved = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            moved["pixel_values"] = self.preprocess(moved["pixel_values"], train=False)
            yield moved


# ------------------------------------------------------------------------------------------- CPU side


def collate(examples: list[Mapping]) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` (uint8 on the tensor path, float on the processor path) and ``labels``."""
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "labels": torch.stack([torch.as_tensor(e["labels"]) for e in examples]),
    }


def decode_images(ds, spec: PixelSpec, image_column: str = "image", label_column: str = "label"):
    """`ds`'s images decoded ONCE to uint8 ``pixel_values [3, H, W]`` (RGB) + ``labels``, as `ImageTensors`.

    Images keep their size when all share one; otherwise they are resized at decode time to the processor's
    size with its PIL filter (the processor's own first step), so the device resize has nothing left to do.
    A `datasets.map`: on a dataset with cache files (the Hub's) a re-run finds the result by fingerprint.
    """
    import datasets

    height, width = _storage_size(ds, image_column, spec)
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=(3, height, width), dtype="uint8"),
            "labels": ds.features[label_column],
        }
    )
    resample = spec.pil_resample

    def decode(batch: dict) -> dict:
        out = np.empty((len(batch[label_column]), 3, height, width), dtype=np.uint8)
        for i, image in enumerate(batch[image_column]):
            image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), resample=resample)
            out[i] = np.asarray(image).transpose(2, 0, 1)
        return {"pixel_values": out, "labels": batch[label_column]}

    decoded = ds.map(
        decode,
        batched=True,
        batch_size=1000,
        features=features,
        remove_columns=ds.column_names,
        desc="Decoding images once to uint8",
    )
    pixels = decoded.with_format("torch", columns=["pixel_values"], dtype=torch.uint8)[:]["pixel_values"]
    return ImageTensors(pixels, torch.as_tensor(decoded["labels"], dtype=torch.long), source=decoded)


class ImageTensors(torch.utils.data.Dataset):
    """A decoded split in memory: one uint8 ``[N, 3, H, W]`` tensor and its labels (CIFAR-10: 150 MB).

    Served from the cached `datasets` split by one conversion, so a loader step is one tensor index instead
    of an Arrow read and conversion per example; `source` is that split (cache files, fingerprint)."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, source=None):
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or len(pixels) != len(labels):
            raise ValueError(f"Need uint8 [N, 3, H, W] pixels and N labels, got {tuple(pixels.shape)}.")
        self.pixels, self.labels, self.source = pixels, labels, source

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        index = torch.as_tensor(indices)
        pixels, labels = self.pixels[index], self.labels[index]  # one gather for the whole batch
        return [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels, strict=True)]


def _storage_size(ds, image_column: str, spec: PixelSpec) -> tuple[int, int]:
    """(H, W) every image of `ds` has (read from the file headers, no decoding), else the processor's size."""
    import datasets
    from PIL import Image

    sizes = set()
    raw = ds.cast_column(image_column, datasets.Image(decode=False)).select_columns([image_column])
    for batch in raw.iter(batch_size=1000):
        for item in batch[image_column]:
            source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
            with Image.open(source) as image:
                sizes.add(image.size)
            if len(sizes) > 1:
                break
        if len(sizes) > 1:
            break
    if len(sizes) == 1:
        width, height = sizes.pop()
        return height, width
    if spec.size is None:
        raise ValueError(
            f"The images in {image_column!r} differ in size and the processor does not resize them to one "
            "size."
        )
    return spec.size


def attach_transforms(ds, processor, augment: bool, min_scale: float = 0.08):
    """The processor path: lazy preprocessing through the checkpoint's image processor (RGB), plus the same
    batched augmentation for training, on the CPU in the data loader."""

    def transform(batch):
        images = [img.convert("RGB") for img in batch["image"]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        if augment:
            pixels = random_resized_crop_flip(pixels, min_scale=min_scale)
        return {"pixel_values": pixels, "labels": torch.tensor(batch["label"])}

    return ds.with_transform(transform)
