"""A corrupted copy of a test split, in the spirit of CIFAR-10-C (Hendrycks & Dietterich, 2019), made with
torch ops on the uint8 pixels the tensor data path evaluates, so shifted batches go through the very same
preprocessing as clean ones.

Five corruptions at five severities each; the severities are scaled for 28x28 grayscale images (CIFAR-10-C's
are for 32x32 colour): at severity 5 a ViT pre-trained on Fashion-MNIST still beats chance by far, at 1 it
loses a point or two. Noise is drawn from a `torch.Generator` seeded by (seed, corruption, severity), so
every method of a study sees the same corrupted images.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

SEVERITIES = (1, 2, 3, 4, 5)
# per corruption, the parameter at severities 1..5 (pixel values in [0, 1])
PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),  # noise std
    "gaussian_blur": (0.5, 0.75, 1.0, 1.5, 2.0),  # kernel std in pixels
    "contrast": (0.6, 0.45, 0.3, 0.2, 0.1),  # contrast kept around the image mean
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to every pixel, then clipped
    "pixelate": (2, 3, 4, 5, 6),  # side of the square blocks averaged, in pixels
}
CORRUPTIONS = tuple(PARAMS)


def _generator(seed: int, name: str, severity: int) -> torch.Generator:
    digest = hashlib.sha256(f"hf-ens/corruption/{seed}/{name}/{severity}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def corrupt(pixels: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """`pixels` (uint8 ``[N, C, H, W]``) corrupted by `name` at `severity` (1..5), as uint8 again."""
    if name not in PARAMS:
        raise ValueError(f"Unknown corruption {name!r}; known: {list(CORRUPTIONS)}.")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}.")
    if pixels.dtype != torch.uint8 or pixels.ndim != 4:
        raise ValueError(
            f"corrupt takes uint8 [N, C, H, W] pixels, got {pixels.dtype} {tuple(pixels.shape)}."
        )
    p = PARAMS[name][severity - 1]
    x = pixels.float() / 255.0
    if name == "gaussian_noise":
        # one noise plane per image, shared by its channels (the images are grayscale copied to 3 channels)
        noise = torch.randn(x.shape[0], 1, *x.shape[2:], generator=_generator(seed, name, severity))
        x = x + p * noise
    elif name == "gaussian_blur":
        x = _gaussian_blur(x, p)
    elif name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * p + mean
    elif name == "brightness":
        x = x + p
    elif name == "pixelate":  # every b x b block (the last ones cut at the border) takes its mean
        h, w, b = *x.shape[-2:], int(p)
        x = F.avg_pool2d(x, b, stride=b, ceil_mode=True, count_include_pad=False)
        x = x.repeat_interleave(b, dim=-2).repeat_interleave(b, dim=-1)[..., :h, :w]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
