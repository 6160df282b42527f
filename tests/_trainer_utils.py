"""Shared pieces of the trainer tests: a tiny real ViT, a synthetic image dataset, a data-order recorder."""

from __future__ import annotations

import os

import torch
from hf_ens.trainers import StarSSEConfig, StarSSETrainer
from transformers import TrainerCallback, ViTForImageClassification

from hf_ens import testing_utils as _tiny
from hf_ens.testing_utils import TinyImages  # noqa: F401  (random 16x16 images, 3 labels, items carry `idx`)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_SAMPLES = 24
BATCH = 4
LR, CYCLE_LR = 1e-3, 5e-4


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    """The default tiny ViT in train mode, as the Trainer tests hand it over."""
    return _tiny.tiny_vit(seed, train=True)


def starsse_config(out, **overrides) -> StarSSEConfig:
    """StarSSE on CPU: 2 epochs, model 1 then cycles of 1 epoch, 3 members, nothing saved but the members."""
    kwargs = dict(
        output_dir=str(out),
        num_train_epochs=2,
        learning_rate=LR,
        per_device_train_batch_size=BATCH,
        method="starsse",
        num_members=3,
        cycle_epochs=1,
        cycle_learning_rate=CYCLE_LR,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        remove_unused_columns=False,
        seed=0,
    )
    kwargs.update(overrides)
    return StarSSEConfig(**kwargs)


class RecordingCollator:
    """Stacks a batch and records the sample indices in the order the model sees them."""

    def __init__(self):
        self.seen: list[int] = []

    def __call__(self, features: list[dict]) -> dict:
        self.seen.extend(int(f["idx"]) for f in features)
        return {
            "pixel_values": torch.stack([f["pixel_values"] for f in features]),
            "labels": torch.stack([f["labels"] for f in features]),
        }


class StopAfter(RecordingCollator):
    """Stands in for a kill inside a branch: raises at the n-th batch it collates."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __call__(self, features):
        if len(self.seen) // len(features) + 1 == self.n:
            raise RuntimeError(f"stopped at batch {self.n}")
        return super().__call__(features)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def load_member(path: str) -> dict[str, torch.Tensor]:
    return weights(ViTForImageClassification.from_pretrained(path))


class Recorder(TrainerCallback):
    """Records LR per optimizer step, the weights at cycle starts/ends and the optimizer state size.

    Add it with ``trainer.add_callback`` so that it runs after the trainer's own cycle callback.
    """

    def __init__(self, trainer, snapshot_steps=()):
        self.trainer = trainer
        self.lrs: dict[int, float] = {}
        self.begin: dict[int, dict] = {}
        self.end: dict[int, dict] = {}
        self.opt_state_len: dict[int, int] = {}
        self.snapshot_steps = set(snapshot_steps)
        self.stop_at: int | None = None

    def on_step_begin(self, args, state, control, **kw):
        step = state.global_step
        self.lrs[step] = self.trainer.optimizer.param_groups[0]["lr"]
        self.opt_state_len[step] = len(self.trainer.optimizer.state)
        if step in self.snapshot_steps:
            self.begin[step] = weights(self.trainer.model)

    def on_step_end(self, args, state, control, **kw):
        if state.global_step in self.snapshot_steps:
            self.end[state.global_step] = weights(self.trainer.model)
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True


def make_trainer(out, model_seed=0, snapshot_steps=(), processing_class=None, callbacks=None, **overrides):
    """A StarSSETrainer on TinyImages with a data-order recorder and a :class:`Recorder` added last."""
    collator = RecordingCollator()
    trainer = StarSSETrainer(
        model=tiny_vit(model_seed),
        args=starsse_config(out, **overrides),
        train_dataset=TinyImages(),
        data_collator=collator,
        processing_class=processing_class,
        callbacks=callbacks,
    )
    recorder = Recorder(trainer, snapshot_steps)
    trainer.add_callback(recorder)  # after the cycle callback: sees the weights once a cycle has started
    return trainer, recorder, collator
