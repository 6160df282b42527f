"""StarSSE under FSDP2 on GPUs vs one unsharded process: the check prepared for a lent GPU (CI has none).

Phase ``sharded`` runs under ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes N`` (NCCL):
a Llama causal LM built from a config (nothing downloaded), StarSSE with K=3 members, fp32, batches of
``--batch`` per process on random token sequences. Phase ``unsharded`` trains the same run in ONE process
with N accumulated micro-batches (the same batch of N x ``--batch``) and ``compare`` prints, per member, the
max abs difference to the sharded member, and both phases' time and peak GPU memory.
``benchmarks/gpu_fsdp_check.sh`` runs all three (2 processes with 2+ GPUs, else 1).

Not run yet: this project's machines have no GPU; tests/test_trainer_fsdp.py runs the same code on 2 CPU
processes (gloo). Expect differences of ~1e-5 (reduction order), not 0; members must differ from each other.

    bash benchmarks/gpu_fsdp_check.sh            # on the GPU machine, ~2 min
    python benchmarks/gpu_fsdp_check.py unsharded OUT --smoke   # a CPU smoke run of one phase
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hf_ens.trainers import StarSSEConfig, StarSSETrainer  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks import _record  # noqa: E402


class RandomTokens(Dataset):
    def __init__(self, n: int, length: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.length,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).train()


def train(args, out: str, accumulation: int) -> dict:
    data = RandomTokens(args.samples, args.length, args.vocab)
    config = StarSSEConfig(
        output_dir=out,
        method="starsse",
        num_members=3,
        num_train_epochs=2,
        cycle_epochs=1,
        learning_rate=1e-3,
        cycle_learning_rate=5e-4,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=accumulation,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        overwrite_output_dir=True,
        seed=0,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = StarSSETrainer(model=build(args), args=config, train_dataset=data)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    from torch.distributed.tensor import DTensor

    return {
        "processes": trainer.args.world_size,
        "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version
        if trainer.is_fsdp_enabled
        else None,
        "sharded": all(isinstance(p, DTensor) for p in trainer.model.parameters()),
        "seconds": round(seconds, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "parameters_millions": round(sum(p.numel() for p in build(args).parameters()) / 1e6, 1),
    }


def compare(out: str) -> dict:
    """Print and return the phases' figures and the max abs difference per member."""
    import safetensors.torch

    figures: dict = {}

    def load(phase, k):
        return safetensors.torch.load_file(
            os.path.join(out, phase, "members", f"member_{k:02d}", "model.safetensors")
        )

    for phase in ("sharded", "unsharded"):
        figures[phase] = json.load(open(os.path.join(out, f"{phase}.json")))
        print(phase, figures[phase])
    for k in range(3):
        a, b = load("sharded", k), load("unsharded", k)
        diff = max((a[n].float() - b[n].float()).abs().max().item() for n in a)
        figures[f"member_{k}_max_abs_diff"] = diff
        print(f"member {k}: max abs diff sharded vs unsharded {diff:.3g}")
    a, b = load("sharded", 1), load("sharded", 2)
    figures["members_1_vs_2_max_abs_diff"] = max((a[n] - b[n]).abs().max().item() for n in a)
    print(f"members 1 vs 2 (must differ): {figures['members_1_vs_2_max_abs_diff']:.3g}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["sharded", "unsharded", "compare"])
    parser.add_argument("out")
    parser.add_argument("--processes", type=int, default=1, help="processes of the sharded phase")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
    _record.add_arguments(parser)  # the compare phase writes the record
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.length, args.batch, args.samples = 64, 2, 128, 16, 2, 16
    if args.phase == "compare":
        figures = compare(args.out)
        _record.write(args.json, "gpu_fsdp_check", vars(args), figures, args.note)
        return
    accumulation = args.processes if args.phase == "unsharded" else 1
    result = train(args, os.path.join(args.out, args.phase), accumulation)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(args.out, f"{args.phase}.json"), "w") as f:
            json.dump(result, f)
        print(args.phase, result, flush=True)


if __name__ == "__main__":
    main()
