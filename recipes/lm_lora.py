"""Fine-tune one pre-trained causal LM into K LoRA members (StarSSE, SSE or Local DE), then compare the
member mean, the ensemble (averaged next-token probabilities), the uniform soup and merges from the base
(task arithmetic, TIES, DARE): perplexity, token NLL and ECE on a test split, plus generated samples.

    accelerate launch recipes/lm_lora.py  # offline default: recipes/configs/lm_lora_offline.yaml
    accelerate launch recipes/lm_lora.py --config recipes/configs/lm_lora_smollm2.yaml  # SmolLM2, WikiText

The offline default pre-trains its own tiny Llama on Debian's `fortunes` quotations (recipes/pretrain_lm.py,
cached) and fine-tunes the members on other fortune categories. The best merge is chosen on the held-out part
of the training split, never on the test split.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from hf_ens.trainers import StarSSEConfig, StarSSETrainer

from recipes._cli import parse_config_and_args, run_cli

OFFLINE_DATASET = "offline:fortunes"
OFFLINE_MODEL = "offline:fortunes_llama"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "lm_lora_offline.yaml"
OFFLINE_COMMAND = "make demo-lm (or: accelerate launch recipes/lm_lora.py)"


@dataclass
class LMScriptArguments:
    """What to fine-tune on what, and how to compare; everything about training lives in StarSSEConfig."""

    model_name_or_path: str = field(
        default=OFFLINE_MODEL,
        metadata={
            "help": f"An AutoModelForCausalLM checkpoint (Hub id or local dir), or '{OFFLINE_MODEL}' for the "
            "embedded offline Llama (pre-trained on fortunes on the spot, cached)."
        },
    )
    pretrain_config: str = field(
        default="recipes/configs/pretrain_lm_offline.yaml",
        metadata={"help": f"Pre-training config for '{OFFLINE_MODEL}'."},
    )
    dataset_name: str = field(
        default=OFFLINE_DATASET,
        metadata={"help": f"A Hub text dataset (or local dir), or '{OFFLINE_DATASET}' (Debian's fortunes)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    categories: list[str] = field(
        default_factory=lambda: ["science", "computers"],
        metadata={"help": f"Fortune categories to fine-tune on ({OFFLINE_DATASET} only)."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text (Hub datasets)."})
    train_split: str = field(default="train", metadata={"help": "Split to fine-tune on."})
    test_split: str = field(default="test", metadata={"help": "Split used ONLY for the final report."})
    test_fraction: float = field(
        default=0.2,
        metadata={"help": f"Share of the texts kept for testing ({OFFLINE_DATASET})."},
    )
    held_out_fraction: float = field(
        default=0.1, metadata={"help": "Share of the TRAIN split held out to choose the best merge."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training texts."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Keep this many test texts."})
    max_length: int = field(default=64, metadata={"help": "Tokens per text (longer ones are cut)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of every member."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Modules that get LoRA adapters, or 'all-linear'."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    merge_methods: list[str] = field(
        default_factory=lambda: ["task_arithmetic", "ties", "dare_linear", "dare_ties"],
        metadata={"help": "Merges from the base to compare with the uniform soup (hf_ens.merges)."},
    )
    merge_density: float = field(
        default=0.5, metadata={"help": "Share of each task vector TIES / DARE keep (DARE drop rate 1 - it)."}
    )
    merge_scale: float = field(
        default=1.0, metadata={"help": "Scale of the merged task vector (task arithmetic: of the sum)."}
    )
    num_samples: int = field(default=3, metadata={"help": "Test texts whose first words prompt generation."})
    max_new_tokens: int = field(default=24, metadata={"help": "Tokens generated per sample."})
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of the evaluation."})
    torch_threads: int | None = field(
        default=None, metadata={"help": "torch threads per process (fix it for a reproducible table)."}
    )
    repo_dirname: str = field(default="ensemble_repo", metadata={"help": "Repo sub-folder."})

    def __post_init__(self) -> None:
        from hf_ens.merges import MERGE_METHODS

        for name in ("held_out_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}.")
        unknown = [m for m in self.merge_methods if m not in MERGE_METHODS]
        if unknown:
            raise ValueError(f"Unknown merge_methods {unknown}; choose from {list(MERGE_METHODS)}.")
        if not 0.0 < self.merge_density <= 1.0:
            raise ValueError(f"merge_density must be in (0, 1], got {self.merge_density}.")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_r must be >= 1, lora_alpha > 0 and lora_dropout in [0, 1).")
        for name in ("max_length", "eval_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("max_train_samples", "max_test_samples", "torch_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}.")
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}.")


# ------------------------------------------------------------------------------------------ preflight
def hub_repos(args: LMScriptArguments) -> list[tuple[str, str]]:
    """(kind, repo id) of what this run downloads: names that are neither embedded nor local folders."""
    repos = []
    if args.model_name_or_path != OFFLINE_MODEL and not os.path.isdir(args.model_name_or_path):
        repos.append(("model", args.model_name_or_path))
    if args.dataset_name != OFFLINE_DATASET and not os.path.isdir(args.dataset_name):
        repos.append(("dataset", args.dataset_name))
    return repos


def check_hub(args: LMScriptArguments) -> None:
    """Fail at once, before anything is loaded, when the run needs the Hub and cannot have it."""
    from recipes import preflight

    preflight.check_hub(hub_repos(args), OFFLINE_COMMAND)


# ----------------------------------------------------------------------------------------------- data
def load_texts(args: LMScriptArguments, seed: int) -> tuple[list[str], list[str]]:
    """(train texts, test texts): fortune categories split at random, or a Hub dataset's two splits."""
    import random

    if args.dataset_name == OFFLINE_DATASET:
        from recipes.pretrain_lm import load_fortunes

        texts = load_fortunes(args.categories)
        random.Random(seed).shuffle(texts)
        n_test = max(1, int(round(args.test_fraction * len(texts))))
        train, test = texts[n_test:], texts[:n_test]
    else:
        import datasets

        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        for split in (args.train_split, args.test_split):
            if split not in raw:
                raise ValueError(
                    f"Dataset {args.dataset_name!r} has no split {split!r}; it has {sorted(raw)}."
                )
        if args.text_column not in raw[args.train_split].column_names:
            raise ValueError(
                f"Dataset {args.dataset_name!r} has no column {args.text_column!r}; its columns are "
                f"{raw[args.train_split].column_names}. Set --text_column."
            )
        train, test = (
            [t for t in raw[s][args.text_column] if isinstance(t, str) and t.strip()]
            for s in (args.train_split, args.test_split)
        )
        random.Random(seed).shuffle(train)
    train = train[: args.max_train_samples] if args.max_train_samples else train
    test = test[: args.max_test_samples] if args.max_test_samples else test
    if len(train) < 2 or not test:
        raise ValueError(f"Too few texts: {len(train)} for training, {len(test)} for testing.")
    return train, test


def tokenize(tokenizer, texts: list[str], max_length: int):
    from datasets import Dataset

    from recipes.pretrain_lm import encode

    return Dataset.from_dict({"input_ids": encode(tokenizer, texts, max_length)})


def load_model_and_tokenizer(args: LMScriptArguments):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = args.model_name_or_path
    if checkpoint == OFFLINE_MODEL:
        from recipes.pretrain_lm import ensure_pretrained_lm

        checkpoint = ensure_pretrained_lm(args.pretrain_config)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    if tokenizer.pad_token is None:  # e.g. SmolLM2 / Llama tokenizers: pad with eos (labels mask padding)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation prompts; the collator's labels mask padding either way
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=False)
    return checkpoint, model, tokenizer


def apply_lora(model, args: LMScriptArguments):
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"--lora_target_modules {' '.join(targets)}: {err}") from err


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def model_metrics(model, batches) -> dict[str, float]:
    """Token NLL / perplexity / accuracy / ECE / Brier of one causal LM over `batches` (streamed)."""
    from hf_ens.lm_metrics import LMMetricAccumulator, scored_tokens

    acc = LMMetricAccumulator()
    model.eval()
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        acc.add(*scored_tokens(model(**inputs).logits, batch["labels"]))
    return acc.compute()


def evaluate_run(trainer: StarSSETrainer, held_out, test, args: LMScriptArguments) -> dict:
    """Ensemble, member mean, uniform soup on test; every merge on held-out, the best one on test."""
    from torch.utils.data import DataLoader

    from hf_ens import evaluate_lm_ensemble
    from hf_ens.merges import lora_merge

    collate = trainer.data_collator
    held_batches = list(DataLoader(held_out, batch_size=args.eval_batch_size, collate_fn=collate))
    test_batches = list(DataLoader(test, batch_size=args.eval_batch_size, collate_fn=collate))
    ensemble = trainer.ensemble()
    soup = ensemble.soup()
    metrics = evaluate_lm_ensemble(ensemble, test_batches, soup=soup)
    members = list(ensemble.config.members)
    held = {"soup": model_metrics(soup, held_batches)}
    merges = {}
    for method in args.merge_methods:
        merged = lora_merge(
            ensemble.peft_model,
            members,
            method,
            density=1.0 if method == "task_arithmetic" else args.merge_density,
            scale=args.merge_scale,
            seed=trainer.args.seed,
        )
        held[method], merges[method] = model_metrics(merged, held_batches), merged
    for name, values in held.items():
        metrics.update({f"held_out/{name}/{k}": v for k, v in values.items()})
    best = min(merges, key=lambda m: held[m]["nll"]) if merges else None
    if best is not None:
        metrics.update({f"best_merge/{k}": v for k, v in model_metrics(merges[best], test_batches).items()})
        metrics["best_merge/method"] = best
    return {"metrics": metrics, "ensemble": ensemble, "soup": soup, "best_merge": merges.get(best)}


def print_tables(metrics: dict, args: LMScriptArguments) -> str:
    rows = [
        ("member mean", "member_mean"),
        ("ensemble", "ensemble"),
        ("uniform soup", "soup"),
        (f"best merge ({metrics.get('best_merge/method', '-')})", "best_merge"),
    ]
    lines = [f"{'test split':<28}{'perplexity':>11}{'NLL':>9}{'ECE':>9}"]
    for name, key in rows:
        vals = [metrics.get(f"{key}/{m}", float("nan")) for m in ("perplexity", "nll", "ece")]
        lines.append(f"{name:<28}{vals[0]:>11.3f}{vals[1]:>9.4f}{vals[2]:>9.4f}")
    lines.append("")
    lines.append(f"{'held-out split':<28}{'perplexity':>11}{'vs soup':>9}")
    soup_ppl = metrics["held_out/soup/perplexity"]
    for name in ["soup", *args.merge_methods]:
        ppl = metrics[f"held_out/{name}/perplexity"]
        density = "" if name in ("soup", "task_arithmetic") else f" d={args.merge_density:g}"
        label = "uniform soup" if name == "soup" else f"{name}{density}"
        lines.append(f"{label:<28}{ppl:>11.3f}{ppl - soup_ppl:>+9.3f}")
    table = "\n".join(lines)
    print(table, flush=True)
    return table


@torch.no_grad()
def generate_samples(ensemble, tokenizer, texts: list[str], args: LMScriptArguments) -> list[dict]:
    """Greedy continuations by the ensemble of the first words of `num_samples` test texts."""
    prompts = [" ".join(t.split()[:4]) for t in texts[: args.num_samples]]
    if not prompts:
        return []
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    tokens = ensemble.generate(
        **batch,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new = tokens[:, batch["input_ids"].shape[1] :]
    samples = [
        {"prompt": p, "continuation": tokenizer.decode(row, skip_special_tokens=True)}
        for p, row in zip(prompts, new, strict=True)
    ]
    for s in samples:
        print(f"[sample] {s['prompt']} >>> {s['continuation']}")
    return samples


# ------------------------------------------------------------------------------------------------ run
def run(args: LMScriptArguments, training_args: StarSSEConfig) -> dict | None:
    """The whole job; the metrics dict on the main process, None on the others."""
    from transformers import DataCollatorForLanguageModeling, set_seed

    from hf_ens._io import atomic_file
    from recipes.vit_cifar import check_output_dir

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    if not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    check_output_dir(args, training_args)
    check_hub(args)
    train_texts, test_texts = load_texts(args, training_args.seed)  # bad categories fail before pre-training
    checkpoint, model, tokenizer = load_model_and_tokenizer(args)
    n_held = max(1, int(round(args.held_out_fraction * len(train_texts))))
    held_texts, train_texts = train_texts[:n_held], train_texts[n_held:]
    train, held_out, test = (
        tokenize(tokenizer, t, args.max_length) for t in (train_texts, held_texts, test_texts)
    )
    set_seed(training_args.seed)
    model = apply_lora(model, args)
    trainer = StarSSETrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=held_out,  # cycle_learning_rate="auto" probes on it (the merged adapters' token NLL)
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    trainer.train()
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()
        return None
    result = evaluate_run(trainer, held_out, test, args)
    metrics = result["metrics"]
    metrics["samples"] = generate_samples(result["ensemble"], tokenizer, test_texts, args)
    metrics["config"] = {"script": asdict(args), "base_model": checkpoint, "texts": {
        "train": len(train_texts), "held_out": len(held_texts), "test": len(test_texts)}}  # fmt: skip
    out = Path(training_args.output_dir)
    card = {k: v for k, v in metrics.items() if isinstance(v, float) and not k.startswith("held_out/")}
    result["ensemble"].save_pretrained(out / args.repo_dirname, soup=result["soup"], metrics=card)
    if result["best_merge"] is not None:
        result["best_merge"].save_pretrained(out / "best_merge")
        tokenizer.save_pretrained(out / "best_merge")
    with atomic_file(out / "metrics.json") as f:
        f.write(json.dumps(metrics, indent=2, default=float))
    metrics["summary_table"] = print_tables(metrics, args)
    trainer.accelerator.wait_for_everyone()
    return metrics


def main(argv: list[str] | None = None) -> dict | None:
    args, training_args = parse_config_and_args(
        (LMScriptArguments, StarSSEConfig), argv, default_config=DEFAULT_CONFIG
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(args, training_args)


if __name__ == "__main__":
    run_cli(main)
