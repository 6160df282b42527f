"""Decoding speed of a K-member LoRA LM ensemble: one model vs the member loop vs members batched on the base.

Builds a Llama from a config (nothing is downloaded), K LoRA adapters on it (r=8 on q/v, random non-zero B as
after training) and times greedy ``generate()`` (``max_new_tokens`` forced, no eos) of

* one model: the plain base (what one merged member costs);
* the member loop: `AdapterEnsembleModelForCausalLM`, one base forward per member per step;
* batched: the same ensemble with ``batch_members=True``, ONE base forward per step over the K members' rows
  (peft's ``adapter_names=`` mixed batches).

Reported: tokens/s (batch x new tokens / seconds, the minimum time over interleaved repeats; median printed
too) and each ensemble's speed relative to one model (the issue's goal: K=5 batched >= 0.5x one model; on a
GPU decoding is memory-bound, which is where reading the base once per step pays off).

    PYTHONPATH=. python benchmarks/lm_ensemble_generate.py --config tiny
    PYTHONPATH=. python benchmarks/lm_ensemble_generate.py --config mid --batch 1 8 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import _record
from hf_ens.adapters import AdapterEnsembleModel, save_adapter

CONFIGS = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512
    ),
    "mid": dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, vocab_size=16000
    ),
}


def build(config: str, members: int, folder: Path, device: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(**CONFIGS[config], num_key_value_heads=CONFIGS[config]["num_attention_heads"] // 2)
    cfg.max_position_embeddings, cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 2048, 0, None, 1
    base = LlamaForCausalLM(cfg).eval()
    paths = []
    for k in range(members):
        model = get_peft_model(
            LlamaForCausalLM(cfg).eval(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        )
        model.base_model.model.load_state_dict(base.state_dict(), strict=False)
        torch.manual_seed(100 + k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        save_adapter(model, "default", folder / f"adapter_{k}")
        paths.append(folder / f"adapter_{k}")
    ens = AdapterEnsembleModel.from_adapters(base, paths).to(device)
    return base.to(device), ens


@torch.no_grad()
def seconds(model, ids, new_tokens: int) -> float:
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    _record.add_arguments(parser)
    args = parser.parse_args()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base, ens = build(args.config, args.members, Path(tmp), args.device)
    runs = {
        "one model": lambda ids: seconds(base, ids, args.new_tokens),
        "member loop": lambda ids: (setattr(ens, "batch_members", False), seconds(ens, ids, args.new_tokens))[
            1
        ],
        "batched": lambda ids: (setattr(ens, "batch_members", True), seconds(ens, ids, args.new_tokens))[1],
    }
    print(
        f"config={args.config} K={args.members} prompt={args.prompt_length} new_tokens={args.new_tokens} "
        f"device={args.device} threads={torch.get_num_threads()}"
    )
    for batch in args.batch:
        ids = torch.randint(
            2, CONFIGS[args.config]["vocab_size"], (batch, args.prompt_length), device=args.device
        )
        for run in runs.values():
            run(ids)  # warm-up
        times = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved, so that load changes hit every variant alike
            for name, run in runs.items():
                times[name].append(run(ids))
        one = min(times["one model"])
        for name, t in times.items():
            rate, median = batch * args.new_tokens / min(t), batch * args.new_tokens / statistics.median(t)
            print(
                f"batch={batch:<3d} {name:<12s} {rate:9.1f} tok/s (median {median:9.1f})  "
                f"{one / min(t):5.2f}x one model"
            )
            rows.setdefault(f"batch_{batch}", {})[name] = {
                "tokens_per_s": rate,
                "median_tokens_per_s": median,
                "relative_to_one_model": one / min(t),
            }
    _record.write(args.json, "lm_ensemble_generate", vars(args), rows, args.note)


if __name__ == "__main__":
    main()
