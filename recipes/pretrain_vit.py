"""Pre-train the embedded offline default's small ViT on Fashion-MNIST source classes, once, then cache it.

No pre-trained vision weights exist offline, so the project makes its own "pre-trained checkpoint": a ~0.8M
parameter ViT trained on Fashion-MNIST classes {0,1,2,5,8}; the main recipe fine-tunes it on the other five
classes. The result is an ordinary `save_pretrained` folder (model + `ViTImageProcessor`) that
`AutoModelForImageClassification` / `AutoImageProcessor` load like any Hub checkpoint.

The repo ships the checkpoint of `recipes/configs/pretrain_offline.yaml` in `recipes/pretrained/vit-fmnist`
(3.3 MB; its `pretrain_config.json` says how and where it was made): with those settings and `use_shipped`
(the default) the main recipe starts from it, so every machine fine-tunes the same weights and the demo
needs no pre-training. Any other settings, or `--use_shipped false`, pre-train on this machine:

    python recipes/pretrain_vit.py --config recipes/configs/pretrain_offline.yaml --use_shipped false

That checkpoint lives under `{cache_dir}/vit-fmnist-{hash}`, where the hash covers everything that changes
the weights: the settings (the torch thread count among them: 1 and 2 threads give different weights, bit
for bit), `PRETRAIN_VERSION` of this code, the bytes of the data files, the torch/transformers versions and
the CPU's numerics (`numeric_environment`: torch's CPU capability, `MKL_CBWR`, `ONEDNN_MAX_CPU_ISA` and the
CPU's instruction sets each change the weights bit for bit). A second run (or the main recipe) with the
same inputs finds it and returns at once; any other input trains its own.

A plain torch loop rather than the `Trainer`: the main recipe may run under `accelerate launch` with several
processes; it pre-trains on the main process only while the others wait, and a `Trainer` there would wrap the
model in DDP and deadlock. The loop is also a few seconds faster on 2 CPU cores.

    python recipes/pretrain_vit.py --config recipes/configs/pretrain_offline.yaml [--key value ...]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from recipes._cli import parse_config_and_args, run_cli

# Bump whenever a change to this file (or to what it calls) changes the weights for the same settings: the
# cache key holds it, so a checkpoint made by older code is never reused.
PRETRAIN_VERSION = 2
DEFAULT_CACHE_DIR = os.path.join(
    os.environ.get("HF_ENS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_ens")), "pretrained"
)
# The checkpoint of recipes/configs/pretrain_offline.yaml, made once with this file and committed.
SHIPPED_DIR = Path(__file__).resolve().parent / "pretrained" / "vit-fmnist"
# Fields that do not change the weights (kept out of the cache key and of the shipped-checkpoint match).
_NOT_SETTINGS = ("cache_dir", "force", "use_shipped")
# Environment variables that change float results on CPU bit for bit (measured: each alone changes the
# weights after a few ViT steps on an AVX-512 Xeon). DNNL_MAX_CPU_ISA is oneDNN's older name.
NUMERIC_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_ISA_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def numeric_environment() -> dict:
    """What decides CPU float results beside the code and the data: the kernels torch dispatches to (its CPU
    capability), MKL's and oneDNN's code-path settings, and the instruction sets MKL and oneDNN pick from
    when those are unset (two CPUs of different families give different weights for the same run)."""
    import torch

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(
                (set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set()
            )
    except OSError:  # not Linux: the processor string stands in below
        pass
    return {
        "machine": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa": sorted(flags & set(_ISA_FLAGS)) or [platform.processor()],
        **{name: os.environ.get(name) for name in NUMERIC_ENV if os.environ.get(name)},
    }


@dataclass
class PretrainArguments:
    """Settings of the offline pre-training; all but `cache_dir`, `force` and `use_shipped` enter the key."""

    cache_dir: str = field(
        default=DEFAULT_CACHE_DIR,
        metadata={"help": "Folder holding cached checkpoints (default: $HF_ENS_CACHE/pretrained)."},
    )
    force: bool = field(default=False, metadata={"help": "Train again even if a cached checkpoint exists."})
    use_shipped: bool = field(
        default=True,
        metadata={
            "help": "Use the checkpoint shipped in recipes/pretrained/vit-fmnist when it was made with these "
            "settings (the same on every machine, no pre-training); false pre-trains on this machine."
        },
    )
    source_classes: list[int] = field(
        default_factory=lambda: [0, 1, 2, 5, 8],
        metadata={"help": "Fashion-MNIST class ids (0..9) to pre-train on."},
    )
    train_size: int | None = field(
        default=None,
        metadata={"help": "Training images (balanced over classes); None = all 6,000 per class."},
    )
    eval_size: int | None = field(
        default=None, metadata={"help": "Test images for the reported accuracy; None = all 1,000 per class."}
    )
    image_size: int = field(default=28, metadata={"help": "Model input size; the processor resizes to it."})
    patch_size: int = field(default=7, metadata={"help": "ViT patch size (must divide image_size)."})
    hidden_size: int = field(default=128, metadata={"help": "ViT width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "ViT depth."})
    num_attention_heads: int = field(
        default=4, metadata={"help": "Attention heads (must divide hidden_size)."}
    )
    intermediate_size: int = field(default=512, metadata={"help": "MLP width."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Passes over the training images."})
    max_steps: int = field(
        default=-1, metadata={"help": "If > 0, stop after this many steps (overrides epochs)."}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(
        default=0.05, metadata={"help": "Linear warmup steps, or a fraction of all steps when < 1."}
    )
    batch_size: int = field(default=128, metadata={"help": "Training batch size."})
    seed: int = field(default=0, metadata={"help": "Seed of the data subset, the init and the data order."})
    num_threads: int | None = field(
        default=2,
        metadata={
            "help": "torch threads while pre-training. The weights differ bit for bit between thread counts, "
            "so the count is fixed (not left to OMP_NUM_THREADS, which `accelerate launch` sets to 1) and "
            "is part of the cache key; None uses torch's current count."
        },
    )

    def __post_init__(self):
        if not self.source_classes or len(set(self.source_classes)) != len(self.source_classes):
            raise ValueError(f"source_classes must be distinct ids, got {self.source_classes}.")
        if any(not 0 <= c <= 9 for c in self.source_classes):
            raise ValueError(f"source_classes are Fashion-MNIST ids 0..9, got {self.source_classes}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}."
            )
        for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ValueError("Set num_train_epochs > 0 or max_steps > 0.")
        if self.learning_rate <= 0 or self.warmup_steps < 0:
            raise ValueError("learning_rate must be > 0 and warmup_steps >= 0.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 (or None), got {self.num_threads}.")

    def threads(self) -> int:
        import torch

        return self.num_threads or torch.get_num_threads()

    def settings(self) -> dict:
        """The recipe's own inputs (no machine, data or versions): what a shipped checkpoint must match."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_SETTINGS}
        return settings | {"num_threads": self.threads(), "version": PRETRAIN_VERSION}

    def key_inputs(self) -> dict:
        """Everything that decides the weights: kept in pretrain_config.json, hashed into the folder name."""
        import torch
        import transformers

        from recipes.image_datasets import source_fingerprint

        return self.settings() | {
            "data": source_fingerprint(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numerics": numeric_environment(),
        }

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(self.key_inputs(), sort_keys=True).encode()).hexdigest()[:12]

    def checkpoint_dir(self) -> str:
        return os.path.join(self.cache_dir, f"vit-fmnist-{self.cache_key()}")


def _as_args(cfg: PretrainArguments | dict | str | os.PathLike) -> PretrainArguments:
    if isinstance(cfg, PretrainArguments):
        return cfg
    if isinstance(cfg, dict):
        valid = {f.name for f in dataclasses.fields(PretrainArguments)}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise ValueError(f"Unknown pre-training key(s) {unknown}. Valid keys: {sorted(valid)}.")
        return PretrainArguments(**cfg)
    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg)
        if not path.is_absolute() and not path.exists():  # e.g. "recipes/configs/..." run from elsewhere
            path = Path(__file__).resolve().parents[1] / path
        (args,) = parse_config_and_args(PretrainArguments, ["--config", str(path)])
        return args
    raise TypeError(f"cfg must be PretrainArguments, a dict or a YAML path, got {type(cfg).__name__}.")


def make_processor(image_size: int):
    """The standard ViT image processor: any image -> RGB, resized to the model, scaled to [-1, 1]."""
    try:
        import torchvision  # noqa: F401
        from transformers import ViTImageProcessor as processor_class
    except ImportError:  # same processor, PIL backend; saved under the same "ViTImageProcessor" type
        from transformers import ViTImageProcessorPil as processor_class
    return processor_class(
        size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def make_model(args: PretrainArguments, label_names: list[str]):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=3,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    return ViTForImageClassification(config)


def _loader(dataset, processor, batch_size: int, shuffle: bool, seed: int):
    import torch

    def collate(rows):
        pixel_values = processor([r["image"] for r in rows], return_tensors="pt")["pixel_values"]
        return pixel_values, torch.tensor([r["label"] for r in rows])

    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator
    )


def evaluate_accuracy(model, loader) -> float:
    import torch
    from tqdm.auto import tqdm

    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for pixel_values, labels in tqdm(loader, desc="pretrain eval", leave=False):
            correct += (model(pixel_values=pixel_values).logits.argmax(-1) == labels).sum().item()
            total += len(labels)
    return correct / max(total, 1)


def pretrain(args: PretrainArguments, output_dir: str) -> dict:
    """Train the ViT and write model, processor and `pretrain_config.json` to `output_dir`; return metrics.

    Runs on `args.threads()` torch threads (the caller's count is restored afterwards).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads())
    try:
        return _train(args, output_dir)
    finally:
        torch.set_num_threads(threads)


def _train(args: PretrainArguments, output_dir: str) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from recipes.image_datasets import load_fashion_mnist

    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(args.seed)
    data = load_fashion_mnist(
        args.source_classes, train_size=args.train_size, test_size=args.eval_size, seed=args.seed
    )
    label_names = data["train"].features["label"].names
    processor = make_processor(args.image_size)
    model = make_model(args, label_names)
    train_loader = _loader(data["train"], processor, args.batch_size, shuffle=True, seed=args.seed)
    eval_loader = _loader(data["test"], processor, 256, shuffle=False, seed=args.seed)

    if args.max_steps > 0:
        total_steps = args.max_steps
    else:
        total_steps = max(1, math.ceil(args.num_train_epochs * len(train_loader)))
    warmup = int(args.warmup_steps * total_steps) if args.warmup_steps < 1 else int(args.warmup_steps)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "embeddings" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)

    model.train()
    step, running = 0, None
    data_time = time.perf_counter() - start
    with tqdm(total=total_steps, desc="pretrain ViT", unit="step") as bar:
        while step < total_steps:
            for pixel_values, labels in train_loader:
                loss = model(pixel_values=pixel_values, labels=labels).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if step >= total_steps:
                    break
    train_time = time.perf_counter() - start - data_time
    accuracy = evaluate_accuracy(model, eval_loader)
    metrics = {
        "eval_accuracy": accuracy,
        "train_steps": total_steps,
        "train_images": len(data["train"]),
        "eval_images": len(data["test"]),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "data_seconds": round(data_time, 2),
        "train_seconds": round(train_time, 2),
        "total_seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(time.process_time() - cpu_start, 2),  # summed over threads
        "torch_threads": torch.get_num_threads(),
    }
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    record = {"settings": args.key_inputs(), "metrics": metrics}
    with open(os.path.join(output_dir, "pretrain_config.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return metrics


def shipped_matches(args: PretrainArguments) -> bool:
    """Whether the shipped checkpoint was made with `args`' settings (machine and versions aside)."""
    marker = SHIPPED_DIR / "pretrain_config.json"
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text(encoding="utf-8"))["settings"]
    return {k: recorded.get(k) for k in args.settings()} == args.settings()


def ensure_pretrained_checkpoint(cfg: PretrainArguments | dict | str | os.PathLike) -> str:
    """Return the folder of the pre-trained checkpoint for `cfg`: the shipped one when `cfg` is its settings
    (and `use_shipped`), else the cached one, training it first if it is not cached.

    `cfg` is a `PretrainArguments`, a dict of its fields, or a YAML path. The folder appears atomically
    (`hf_ens._io.atomic_directory`), so a crash never leaves a half-written checkpoint behind. A file
    lock makes concurrent callers (e.g. every process of an `accelerate launch`) wait for the first one
    instead of training again; `force=True` retrains unless another caller just did.
    """
    from filelock import FileLock

    from hf_ens._io import atomic_directory

    args = _as_args(cfg)
    if args.use_shipped and not args.force and shipped_matches(args):
        return str(SHIPPED_DIR)
    final = args.checkpoint_dir()
    marker = os.path.join(final, "pretrain_config.json")
    if os.path.isfile(marker) and not args.force:
        return final
    os.makedirs(args.cache_dir, exist_ok=True)
    stamp = os.stat(marker).st_mtime_ns if os.path.isfile(marker) else None
    with FileLock(final + ".lock"):
        if os.path.isfile(marker) and (not args.force or os.stat(marker).st_mtime_ns != stamp):
            return final  # another process finished it while we waited
        with atomic_directory(final) as tmp:  # also clears what a killed run left; we hold the lock
            metrics = pretrain(args, str(tmp))
    print(
        f"Pre-trained ViT ({metrics['num_parameters'] / 1e6:.2f}M params) on "
        f"{metrics['train_images']} images in {metrics['total_seconds']:.0f} s: "
        f"accuracy {metrics['eval_accuracy']:.2%} on "
        f"{metrics['eval_images']} test images -> {final}"
    )
    return final


def main(argv: list[str] | None = None) -> str:
    (args,) = parse_config_and_args(PretrainArguments, argv, description=__doc__.splitlines()[0])
    start = time.perf_counter()
    path = ensure_pretrained_checkpoint(args)
    with open(os.path.join(path, "pretrain_config.json"), encoding="utf-8") as f:
        metrics = json.load(f)["metrics"]
    print(json.dumps({"checkpoint": path, "seconds": round(time.perf_counter() - start, 2), **metrics}))
    return path


if __name__ == "__main__":
    run_cli(main)
