"""Run by tests/test_trainer_ddp.py under ``torchrun --nproc_per_node 2``: a StarSSE run on CPU (gloo)."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from hf_ens.trainers import StarSSETrainer  # noqa: E402
from transformers import TrainerCallback

from tests._trainer_utils import RecordingCollator, TinyImages, starsse_config, tiny_vit  # noqa: E402


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class StartDigest(TrainerCallback):
    def __init__(self, trainer, steps):
        self.trainer, self.steps, self.digests = trainer, steps, {}

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step in self.steps:
            self.digests[state.global_step] = digest(self.trainer.model)


def main(out: str) -> None:
    args = starsse_config(out, per_device_train_batch_size=2)
    trainer = StarSSETrainer(
        model=tiny_vit(0), args=args, train_dataset=TinyImages(), data_collator=RecordingCollator()
    )
    probe = StartDigest(trainer, steps={12, 18})
    trainer.add_callback(probe)
    trainer.train()
    result = {
        "world_size": trainer.args.world_size,
        "torch_world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "rank": trainer.args.process_index,
        "written": trainer.written_members,
        "start_digests": {str(k): v for k, v in probe.digests.items()},
        "boundaries": trainer.plan.boundaries,
        "final_digest": digest(trainer.model),
    }
    with open(os.path.join(out, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
