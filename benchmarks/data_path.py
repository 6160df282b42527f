"""Images/s of the processor path vs the tensor path (recipes/data.py) for CIFAR-shaped inputs, 32 -> 224.

Both paths start from the same `datasets` split of 32x32 PNG images and produce training batches of 256
``pixel_values [256, 3, 224, 224]`` with the ViT-B/16 processor's settings (bilinear, mean = std = 0.5),
random resized crop + flip included (`--augment`, as the real job trains):

* processor path: decode PNG + the checkpoint's image processor per batch (`attach_transforms`), then the
  batched augmentation, in the data loader;
* tensor path: images decoded once to uint8 (`decode_images`, timed separately: it runs once per dataset and
  is cached), batches sliced from it, then `DevicePreprocessor` (resize, rescale, normalize, augmentation) run
  here on the CPU, as it runs on the training device when that is a CPU.

Single process, `--threads` torch threads (default 1); each rate is the median of `--repeats` passes over the
split, in turn (one pass times a few batches and varies by ~20% on a shared machine). The last line is the
ratio of the two training paths, everything on this CPU. On a GPU only the slicing of uint8 batches stays on
the CPU: that rate is printed too.

torch's CPU tensors get transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`, set here unless already set), as
numpy's large arrays on the processor path get them by default: a [256, 3, 224, 224] float32 batch is 154 MB,
and without huge pages a fresh one costs ~37,000 page faults. `THP_MEM_ALLOC_ENABLE=0` measures without.

    python benchmarks/data_path.py [--images 1024] [--batch-size 256] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks import _record  # before the variables below are set: the record shows what the user set

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read at torch's first allocation: before `import torch`
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_ens.testing_utils import tiny_cifar  # noqa: E402
from recipes.data import DevicePreprocessor, attach_transforms, collate, decode_images  # noqa: E402


def images_per_second(batches, step) -> float:
    """Images/s over `batches`, each turned into pixel values by `step` (the first batch excluded)."""
    count, start = 0, None
    for batch in batches:
        pixels = step(batch)
        if start is None:  # warm-up: first batch (allocations, lazy imports)
            start = time.perf_counter()
            continue
        count += len(pixels)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="CIFAR-shaped images in the split")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="passes per path; the median is reported")
    _record.add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    from transformers import ViTImageProcessor

    # google/vit-base-patch16-224-in21k's processor settings
    processor = ViTImageProcessor(
        size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    ds = tiny_cifar(n_train=args.images, n_test=1)["train"].rename_column("img", "image")
    pre = DevicePreprocessor.from_processor(processor, augment=True)
    start = time.perf_counter()
    decoded = decode_images(ds, pre.spec)
    decode_rate = len(ds) / (time.perf_counter() - start)

    def loader(dataset):
        return DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate)

    passes = {}
    for _ in range(args.repeats):  # interleaved, so that a busy moment of the machine hits every path
        for augment in (False, True):
            processor_ds = attach_transforms(ds, processor, augment=augment)
            passes.setdefault(("processor", augment), []).append(
                images_per_second(loader(processor_ds), lambda b: b["pixel_values"])
            )
            passes.setdefault(("device step", augment), []).append(
                images_per_second(loader(decoded), lambda b, a=augment: pre(b["pixel_values"], train=a))
            )
        passes.setdefault("loader", []).append(
            images_per_second(loader(decoded), lambda b: b["pixel_values"])
        )
    rates = {key: statistics.median(values) for key, values in passes.items()}
    loader_rate = rates["loader"]

    print(
        f"{len(ds)} CIFAR-shaped images (32x32 PNG) -> [{args.batch_size}, 3, 224, 224] float32, "
        f"batch {args.batch_size}, {torch.get_num_threads()} torch thread(s), one process, median of "
        f"{args.repeats} passes, "
        f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}"
    )
    print(f"tensor path, once per dataset: decode to uint8 at {decode_rate:,.0f} images/s (then cached)")
    for augment, name in ((False, "evaluation"), (True, "training (crop + flip)")):
        p, t = rates["processor", augment], rates["device step", augment]
        print(
            f"{name}, all on this CPU: processor path {p:,.0f} images/s; tensor path {t:,.0f} ({t / p:.1f}x)"
        )
    print(
        f"per-step CPU data work of training when the device step runs on a GPU: processor path "
        f"{rates['processor', True]:,.0f} images/s; tensor path (slicing uint8 batches) "
        f"{loader_rate:,.0f} ({loader_rate / rates['processor', True]:.0f}x)"
    )
    print(f"tensor path / processor path: {rates['device step', True] / rates['processor', True]:.1f}x")
    figures = {
        "images": len(ds),
        "thp_mem_alloc_enable": os.environ["THP_MEM_ALLOC_ENABLE"],
        "decode_images_per_s": decode_rate,
        "evaluation": {
            "processor_images_per_s": rates["processor", False],
            "tensor_images_per_s": rates["device step", False],
            "tensor_over_processor": rates["device step", False] / rates["processor", False],
        },
        "training": {
            "processor_images_per_s": rates["processor", True],
            "tensor_images_per_s": rates["device step", True],
            "tensor_over_processor": rates["device step", True] / rates["processor", True],
        },
        "gpu_step_cpu_share": {
            "uint8_slicing_images_per_s": loader_rate,
            "over_processor_training": loader_rate / rates["processor", True],
        },
    }
    _record.write(args.json, "data_path", vars(args), figures, args.note)


if __name__ == "__main__":
    main()
