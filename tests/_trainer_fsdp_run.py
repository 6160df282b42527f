"""Run by tests/test_trainer_fsdp.py under ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2``
(or alone, one unsharded process, for the reference): StarSSE / SSE on a tiny causal LM of `tests._lm`.

Usage: ``_trainer_fsdp_run.py OUT JSON [OUT JSON ...]``, one run per pair, in one launch. JSON holds
``StarSSEConfig`` overrides plus the script's own keys: ``family`` ("gpt2": tied embeddings, or "llama":
untied), ``crash_at`` (the collator raises at its n-th call on every process: a crash mid-run, caught here so
that the launch goes on to the next run), ``resume`` (``resume_from_checkpoint=True``), ``model_seed`` (other
initial weights: a resume must bring the checkpoint's back), ``lora`` (peft ``LoraConfig`` keywords: LoRA
members), ``tag`` (the result file's suffix). Each process writes ``OUT/rank{rank}{tag}.json``: whether the
model was sharded (FSDP2 ``DTensor`` parameters, the fraction of the weights this process held), the step it
started at, the members it wrote, the crash it saw, or the ``ValueError`` that refused the run at trainer
construction.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset
from hf_ens.trainers import StarSSETrainer
from transformers import DataCollatorForLanguageModeling, TrainerCallback

from tests import _lm
from tests._trainer_utils import starsse_config

SAMPLES = 24
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


class CrashAt:
    """The causal-LM collator, raising at its n-th call (on every process: the same batch index)."""

    def __init__(self, tokenizer, n: int | None = None):
        self.inner = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        self.n, self.calls = n, 0

    def __call__(self, features):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError(f"crash at batch {self.n}")
        return self.inner(features)


class Sharding(TrainerCallback):
    """At the first step: whether the parameters are DTensors and the share of the weights held here."""

    def __init__(self, trainer):
        self.trainer, self.seen, self.first_step = trainer, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.seen is None:
            from torch.distributed.tensor import DTensor

            self.first_step = state.global_step
            params = list(self.trainer.model.parameters())
            local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
            self.seen = {
                "dtensor": all(isinstance(p, DTensor) for p in params),
                "local_fraction": local / sum(p.numel() for p in params),
            }


def fsdp_on_cpu() -> None:
    """Let accelerate shard over CPU processes: it turns FSDP on for accelerator devices only (a gloo group of
    CPU processes stays ``MULTI_CPU`` and its FSDP plugin is dropped). With an FSDP plugin (``accelerate
    launch --use_fsdp``) on CPU processes, the state says FSDP and keeps the plugin; everything after that
    (``fully_shard`` over gloo, the Trainer's and StarSSETrainer's FSDP paths) is the real code."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init_fsdp_on_cpu


def main(out: str, options: dict) -> dict:
    options = dict(options)
    family = options.pop("family", "llama")
    crash_at = options.pop("crash_at", None)
    resume = options.pop("resume", False)
    model_seed = options.pop("model_seed", 0)
    lora = options.pop("lora", None)
    tag = options.pop("tag", "")
    rank = int(os.environ.get("RANK", "0"))
    tokenizer = _lm.word_tokenizer(padding_side="right")
    build = _lm.tiny_gpt2 if family == "gpt2" else _lm.tiny_llama
    model = build(model_seed, **(NO_DROPOUT if family == "gpt2" else {})).train()
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**lora))
    config = {"num_members": 3, "learning_rate": 1e-2, "cycle_learning_rate": 5e-3, **options}
    try:
        trainer = StarSSETrainer(
            model=model,
            args=starsse_config(out, **config),
            train_dataset=Dataset.from_dict(dict(tokenizer(_lm.lm_texts(SAMPLES)))),
            data_collator=CrashAt(tokenizer, crash_at),
            processing_class=tokenizer,
        )
    except ValueError as err:  # a refusal: every process must say so, none may hang
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rank{rank}{tag}.json"), "w") as f:
            json.dump({"rank": rank, "refused": str(err)}, f)
        return {"refused": str(err)}
    sharding = Sharding(trainer)
    trainer.add_callback(sharding)
    crash = None
    try:
        trainer.train(resume_from_checkpoint=True if resume else None)
    except RuntimeError as err:
        if "crash at batch" not in str(err):
            raise
        crash = str(err)
    result = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "torch_world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "fsdp": trainer.is_fsdp_enabled,
        "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version
        if trainer.is_fsdp_enabled
        else None,
        "sharding": sharding.seen,
        "first_step": sharding.first_step,
        "written": trainer.written_members,
        "crash": crash,
    }
    with open(os.path.join(out, f"rank{result['rank']}{tag}.json"), "w") as f:
        json.dump(result, f)
    return result


if __name__ == "__main__":
    if not torch.cuda.is_available():
        fsdp_on_cpu()
    for out, options in zip(sys.argv[1::2], sys.argv[2::2], strict=True):  # several runs, one launch
        main(out, json.loads(options))
    if torch.distributed.is_initialized():  # a clean exit (gloo may abort at interpreter teardown otherwise)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
