"""Run by tests/test_trainer_parallel.py (under ``torchrun``, or alone for one process) and by
benchmarks/parallel_members.py: a StarSSE / Local DE run with ``parallel_members``.

Usage: ``_trainer_parallel_run.py OUT JSON [OUT JSON ...]``, one run per pair. JSON holds ``StarSSEConfig``
overrides plus the script's own keys: ``resume`` (resume_from_checkpoint=True), ``slow`` (seconds the
collator sleeps per batch, so that a test can kill a process mid-branch), ``samples``, ``model`` (tiny_vit
overrides), ``image_size``, ``lora`` (peft ``LoraConfig`` keywords: members are LoRA adapters), ``text``
(a tiny text classifier of `tests._text` instead of the ViT: ``{"family": "bert", **config overrides}``,
padded batches of the sentiment task), ``lm`` (a tiny causal LM of `tests._lm`: ``{"family": "gpt2" or
"llama", **config overrides}``, padded random sentences, transformers' causal-LM collator). Each process
writes ``OUT/pid{rank}`` at start and ``OUT/rank{rank}.json`` (members it wrote, branches it resumed, timings)
at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from hf_ens.trainers import StarSSETrainer  # noqa: E402
from transformers import TrainerCallback

from hf_ens.testing_utils import TinyImages, tiny_vit  # noqa: E402
from tests._trainer_utils import RecordingCollator, starsse_config  # noqa: E402


class SlowCollator(RecordingCollator):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def __call__(self, features):
        time.sleep(self.seconds)
        return super().__call__(features)


class Model1End(TrainerCallback):
    """When model 1 ended (for the data-parallel branches, whose branch phase is the rest of the loop)."""

    def __init__(self, trainer):
        self.trainer, self.time = trainer, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.trainer.plan.model1_steps:
            self.time = time.perf_counter()


def main(out: str, options: dict) -> dict:
    options = dict(options)
    resume = options.pop("resume", False)
    slow = options.pop("slow", 0.0)
    samples = options.pop("samples", 24)
    image_size = options.pop("image_size", 16)
    model_overrides = options.pop("model", {})
    lora = options.pop("lora", None)
    text = options.pop("text", None)
    lm = options.pop("lm", None)
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    args = starsse_config(out, **options)
    model = tiny_vit(0, train=True, image_size=image_size, **model_overrides)
    dataset, collator = TinyImages(samples, image_size=image_size), SlowCollator(slow)
    if text is not None:
        from tests import _text

        family = text.pop("family", "bert")
        model = _text.tiny_classifier(family, 0, train=True, **text)
        tok = _text.word_tokenizer()
        dataset, collator = _text.TextDataset(tok, _text.sentiment_examples(samples)), _text.collator(tok)
    if lm is not None:
        from datasets import Dataset
        from transformers import DataCollatorForLanguageModeling

        from tests import _lm

        family = lm.pop("family", "gpt2")
        model = (_lm.tiny_gpt2 if family == "gpt2" else _lm.tiny_llama)(0, **lm).train()
        tok = _lm.word_tokenizer(padding_side="right")
        dataset = Dataset.from_dict(dict(tok(_lm.lm_texts(samples))))
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**lora))
    trainer = StarSSETrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
    )
    mark = Model1End(trainer)
    trainer.add_callback(mark)
    began = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    ended = time.perf_counter()
    result = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "torch_world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "written": trainer.written_members,
        "branch_seconds": trainer.branch_seconds or (ended - (mark.time or began)),
        "seconds": ended - began,
        "plan": [trainer.plan.model1_steps, trainer.plan.cycle_steps],
        "resumed": trainer.branches_resumed,
    }
    with open(os.path.join(out, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    return result


if __name__ == "__main__":
    for out, options in zip(sys.argv[1::2], sys.argv[2::2], strict=True):  # several runs, one launch
        main(out, json.loads(options))
