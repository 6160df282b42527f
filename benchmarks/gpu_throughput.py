"""Training throughput of the real job's shape through the tensor data path: StarSSETrainer vs a plain loop.

ViT-B/16 (random init from `ViTConfig`, nothing downloaded), bf16 autocast, batch 256, synthetic CIFAR-shaped
uint8 images (32x32) resized to 224, normalized and augmented (random resized crop + flip) on the GPU by
`recipes/data.py`'s `DevicePreprocessor` (a forward pre-hook, as in the recipe). Both loops see the same
model init, data, optimizer (AdamW, fused on CUDA), gradient clipping (max norm 1), loader settings (workers,
pinned memory, non-blocking copies) and number of steps; the first `--warmup` steps are excluded, the clock is
synchronised with the GPU. The trainer makes no host synchronisation per step (tests/test_host_syncs.py).
Goals on an H200: StarSSETrainer >= 0.98 x the plain loop, and >= 2,780 images/s.

Needs torch, transformers and accelerate only (no `datasets`/`evaluate`). One command, ~2 min on an H200:

    python benchmarks/gpu_throughput.py                 # on the GPU machine
    python benchmarks/gpu_throughput.py --smoke         # CPU check: tiny ViT, batch 8, a few steps
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from hf_ens.trainers import StarSSEConfig, StarSSETrainer  # noqa: E402
from transformers import TrainerCallback, ViTConfig, ViTForImageClassification  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from benchmarks import _record  # noqa: E402
from recipes.data import DevicePreprocessor, PixelSpec, collate  # noqa: E402

GOAL_RATIO, GOAL_IMAGES_PER_SECOND = 0.98, 2780
MAX_GRAD_NORM = 1.0  # TrainingArguments' default: both loops clip
SMOKE_VIT = dict(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


class SyntheticCifar(torch.utils.data.Dataset):
    """`n` random uint8 [3, 32, 32] images with labels 0..9, as the recipe's decoded splits serve them."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


class Clock:
    """Synchronised wall time from the start of step `start` to the start of step `stop` (exclusive)."""

    def __init__(self, start: int, stop: int, device: torch.device):
        self.start, self.stop, self.device = start, stop, device
        self.t0 = self.t1 = None

    def at_step(self, step: int) -> None:
        if step in (self.start, self.stop):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if step == self.start:
                self.t0 = time.perf_counter()
            else:
                self.t1 = time.perf_counter()

    def images_per_second(self, batch_size: int) -> float:
        return (self.stop - self.start) * batch_size / (self.t1 - self.t0)


class _ClockCallback(TrainerCallback):
    def __init__(self, clock: Clock):
        self.clock = clock

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.at_step(state.global_step)


def make_model(args, device: torch.device) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(num_labels=10, **(SMOKE_VIT if args.smoke else {}))  # default: ViT-B/16 at 224
    model = ViTForImageClassification(config).to(device).train()
    spec = PixelSpec(size=(config.image_size,) * 2, mean=(0.5,) * 3, std=(0.5,) * 3)
    DevicePreprocessor(spec, augment=True).attach(model)
    return model


def loader_kwargs(args, device: torch.device) -> dict:
    return dict(num_workers=args.workers, pin_memory=device.type == "cuda")


def plain_loop(args, device: torch.device, data, total_steps: int, clock: Clock) -> float:
    model = make_model(args, device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        persistent_workers=args.workers > 0,
        **loader_kwargs(args, device),
    )
    step = 0
    while step < total_steps:
        for batch in loader:
            clock.at_step(step)
            if step == total_steps:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)  # as the Trainer does
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    clock.at_step(total_steps)
    return clock.images_per_second(args.batch_size)


def starsse_run(args, device: torch.device, data, total_steps: int, clock: Clock) -> float:
    model = make_model(args, device)
    with tempfile.TemporaryDirectory() as out:
        config = StarSSEConfig(
            output_dir=out,
            method="starsse",
            num_members=1,  # a member write is the trainer's, not the data path's, cost (trainer_overhead.py)
            num_train_epochs=1,  # one epoch of total_steps + 1 batches; the last one (it writes the member)
            # is outside the clock
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4,
            weight_decay=0.0,
            max_grad_norm=MAX_GRAD_NORM,
            lr_scheduler_type="constant",
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
            bf16=args.bf16,
            use_cpu=device.type == "cpu",
            dataloader_num_workers=args.workers,
            dataloader_pin_memory=device.type == "cuda",
            dataloader_persistent_workers=args.workers > 0,
            dataloader_drop_last=True,
            accelerator_config={"non_blocking": device.type == "cuda"},
            remove_unused_columns=False,
            save_strategy="no",
            logging_steps=10**9,
            report_to="none",
            disable_tqdm=True,
        )
        trainer = StarSSETrainer(model=model, args=config, train_dataset=data, data_collator=collate)
        trainer.add_callback(_ClockCallback(clock))
        trainer.train()
    return clock.images_per_second(args.batch_size)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny ViT, batch 8, a few steps")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (smoke: 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 100; smoke: 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 15; smoke: 2)")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default 4; smoke: 0)")
    _record.add_arguments(parser)
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.batch_size = args.batch_size or (8 if smoke else 256)
    args.steps = args.steps or (4 if smoke else 100)
    args.warmup = args.warmup if args.warmup is not None else (2 if smoke else 15)
    args.workers = args.workers if args.workers is not None else (0 if smoke else 4)
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    args.bf16 = device.type == "cuda"
    hf_logging.set_verbosity_error()
    total = args.warmup + args.steps
    data = SyntheticCifar(args.batch_size * (total + 1))

    plain = plain_loop(args, device, data, total, Clock(args.warmup, total, device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    starsse = starsse_run(args, device, data, total, Clock(args.warmup, total, device))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    model = "tiny ViT (smoke)" if smoke else "ViT-B/16"
    print(
        f"{model} on {name}, batch {args.batch_size}, {'bf16' if args.bf16 else 'fp32'}, "
        f"{args.steps} timed steps after {args.warmup} warm-up, {args.workers} loader workers"
    )
    print(f"plain torch loop : {plain:,.1f} images/s")
    print(f"StarSSETrainer   : {starsse:,.1f} images/s")
    ratio = starsse / plain
    print(f"StarSSETrainer / plain loop: {ratio:.3f} (goal >= {GOAL_RATIO})")
    if device.type == "cuda" and not smoke:
        verdict = "met" if starsse >= GOAL_IMAGES_PER_SECOND and ratio >= GOAL_RATIO else "NOT met"
        print(f"goals on an H200: >= {GOAL_IMAGES_PER_SECOND:,} images/s and >= {GOAL_RATIO}x: {verdict}")
    else:
        print(f"goals (>= {GOAL_IMAGES_PER_SECOND:,} images/s, >= {GOAL_RATIO}x) apply to an H200 run only")
    figures = {
        "device": name,
        "model": model,
        "plain_images_per_s": plain,
        "starsse_images_per_s": starsse,
        "starsse_over_plain": ratio,
    }
    _record.write(args.json, "gpu_throughput", vars(args), figures, args.note)
    return {"plain": plain, "starsse": starsse, "ratio": ratio}


if __name__ == "__main__":
    main()
