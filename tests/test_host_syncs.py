"""Training steps never make the host wait for the device: no ``.item()``, ``bool(tensor)``, ``float(tensor)``
(... ) per optimizer step, in the Trainer loop and in the branch loop, with the tensor data path attached, and
the data step copies nothing from the host after its first batch (a blocking copy synchronises the stream).

On a GPU each such call drains the queue, so the GPU idles while Python prepares the next step. On this CPU
nothing waits, but the calls are the same: a `TorchFunctionMode` counts them where they happen. The plain
Trainer (its ``logging_nan_inf_filter``) is the control that shows the counter sees them.
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from hf_ens.trainers import StarSSEConfig, StarSSETrainer
from hf_ens.trainers.nonfinite import LossWatch
from torch.overrides import TorchFunctionMode
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_ens.testing_utils import tiny_vit
from recipes.data import DevicePreprocessor, PixelSpec, collate

# tensor -> Python conversions: each waits for the device to finish the work queued before it
SYNCS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}


class CountSyncs(TorchFunctionMode):
    """Every host synchronisation made while active, with the innermost frame outside torch."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            self.calls.append((name, f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].name}"))
        return func(*args, **(kwargs or {}))


class CountHostToDevice(TorchFunctionMode):
    """Calls that take a host tensor (not a 0-dim scalar: kernels get those by value) and return a tensor
    on another device."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        from_host = any(a.device.type == "cpu" and a.dim() > 0 for a in tensors)
        if from_host and isinstance(out, torch.Tensor) and out.device.type != "cpu":
            self.calls.append(getattr(func, "__name__", str(func)))
        return out


class StepWindows(TrainerCallback):
    """Syncs counted between the ends of consecutive optimizer steps (data loading included)."""

    def __init__(self, counter: CountSyncs):
        self.counter, self.ends = counter, []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append((state.global_step, len(self.counter.calls)))

    def per_step(self) -> dict[int, int]:
        return {step: b - a for (_, a), (step, b) in zip(self.ends, self.ends[1:], strict=False)}


class UInt8Images(torch.utils.data.Dataset):
    """64 random uint8 8x8 images, 3 labels: resized to the tiny ViT's 16 px by the tensor data path."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, 3, (64,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def _model():
    model = tiny_vit(train=True)  # 16 px: uint8 8 px batches are resized, cropped and flipped in the hook
    DevicePreprocessor(PixelSpec(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3), augment=True).attach(model)
    return model


def _common(out) -> dict:
    return dict(output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=4, learning_rate=1e-3,
                use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                remove_unused_columns=False, seed=0)  # fmt: skip


def _train(trainer) -> tuple[CountSyncs, dict[int, int]]:
    counter = CountSyncs()
    windows = StepWindows(counter)
    trainer.add_callback(windows)
    with counter:
        trainer.train()
    return counter, windows.per_step()


def test_loss_watch_notes_the_first_nonfinite_step_without_syncing():
    watch = LossWatch()
    assert watch.first_nonfinite() is None
    with CountSyncs() as counter:
        for step, loss in enumerate([1.0, 2.0, float("inf"), float("nan"), 3.0]):
            watch.update(torch.tensor(loss, requires_grad=True) * 1, step)
    assert counter.calls == []
    assert watch.first_nonfinite() == (2, float("inf"))
    finite = LossWatch()
    finite.update(torch.ones(4), 0)  # any shape
    assert finite.first_nonfinite() is None


def test_trainer_steps_make_no_host_sync(tmp_path):
    plain = Trainer(model=_model(), args=TrainingArguments(**_common(tmp_path / "plain")),
                    train_dataset=UInt8Images(), data_collator=collate)  # fmt: skip
    _, plain_steps = _train(plain)
    assert min(plain_steps.values()) >= 1  # the control: the nan/inf filter syncs every step

    config = StarSSEConfig(method="starsse", num_members=2, cycle_epochs=2, **_common(tmp_path / "star"))
    trainer = StarSSETrainer(model=_model(), args=config, train_dataset=UInt8Images(), data_collator=collate)
    counter, steps = _train(trainer)
    epoch_starts = {s for s in steps if (s - 1) % 8 == 0}  # the loader's sampler seeds itself per epoch
    snapshots = set(trainer.plan.boundaries)  # finite-weight checks and the member write
    ordinary = {s: n for s, n in steps.items() if s not in epoch_starts | snapshots}
    assert len(ordinary) >= 30 and set(ordinary.values()) == {0}, Counter(counter.calls)


def test_branch_steps_make_no_host_sync(tmp_path):
    config = StarSSEConfig(
        method="starsse", num_members=3, cycle_epochs=2, parallel_members=True, **_common(tmp_path)
    )
    trainer = StarSSETrainer(model=_model(), args=config, train_dataset=UInt8Images(), data_collator=collate)
    counter = CountSyncs()
    with counter:
        trainer.train()
    branch_steps = 2 * trainer.plan.cycle_steps  # members 1 and 2, trained here one after the other
    in_loop = [c for c in counter.calls if c[1].split(":")[1] in {"train_branch", "accumulate_gradients"}]
    # per member: the loss check and the loss of the last log line, the check before the member, the mean
    assert branch_steps >= 32 and len(in_loop) <= 4 * 2, Counter(in_loop)


def test_the_data_step_copies_nothing_from_the_host_after_its_first_batch():
    """On "meta", a device that is not the host (the same code runs on a GPU): the normalization factors go
    over once, then every batch is preprocessed from device tensors only."""
    spec = PixelSpec(size=(16, 16), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    pre = DevicePreprocessor(spec, augment=True)
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8).to("meta")
    with CountHostToDevice() as first:
        assert pre(pixels, train=True).shape == (4, 3, 16, 16)
    assert first.calls  # the control: the factors' first copy is seen
    with CountHostToDevice() as later:
        for train in (True, False, True, False):
            assert pre(pixels, train=train).device.type == "meta"
    assert later.calls == []
