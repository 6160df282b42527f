"""Pre-train the offline LM default's tiny Llama on Debian's `fortunes` quotations, once, then cache it.

No pre-trained language model exists offline, so the project makes its own "pre-trained checkpoint": a
byte-level BPE tokenizer trained on the pre-training text (no unknown tokens, ever) and a small Llama (tied
embeddings) trained on some fortune categories; `recipes/lm_lora.py` then fine-tunes LoRA members on other
categories. The result is an ordinary `save_pretrained` folder that `AutoModelForCausalLM` / `AutoTokenizer`
load like any Hub checkpoint.

The fortunes (Debian's `fortunes` package, /usr/share/games/fortunes): one plain-text file per category, the
quotations separated by lines holding only ``%``; the ``.dat`` index and ``.u8`` links are not read.

Cached like `recipes/pretrain_vit.py`: under ``{cache_dir}/llama-fortunes-{hash}``, the hash covering the
settings, `PRETRAIN_VERSION`, the bytes of the category files and the torch/transformers versions; written
atomically under a file lock. A plain torch loop (not the `Trainer`), for the reason pretrain_vit.py gives.

    python recipes/pretrain_lm.py --config recipes/configs/pretrain_lm_offline.yaml [--key value ...]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from recipes._cli import parse_config_and_args, run_cli
from recipes.pretrain_vit import DEFAULT_CACHE_DIR

PRETRAIN_VERSION = 1
FORTUNES_DIR = os.environ.get("HF_ENS_FORTUNES_DIR", "/usr/share/games/fortunes")
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = SPECIAL_TOKENS


# ------------------------------------------------------------------------------------------------ the data
def fortune_categories(directory: str = FORTUNES_DIR) -> list[str]:
    """The category files of the fortunes package (plain files without an extension)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No fortunes at {directory}: install Debian's `fortunes` package (`make demo-lm` does: apt-get "
            "install fortunes) or point HF_ENS_FORTUNES_DIR at a folder of fortune files."
        )
    return sorted(
        name
        for name in os.listdir(directory)
        if "." not in name and os.path.isfile(os.path.join(directory, name))
    )


def load_fortunes(categories: list[str], directory: str = FORTUNES_DIR) -> list[str]:
    """The quotations of `categories`, in file order, whitespace collapsed and overstriking removed."""
    known = fortune_categories(directory)
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise ValueError(f"Unknown fortune categories {unknown}; {directory} holds {known}.")
    texts = []
    for category in categories:
        with open(os.path.join(directory, category), encoding="utf-8", errors="replace") as f:
            raw = f.read()
        for entry in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
            text = re.sub(r"\s+", " ", re.sub(r".\x08", "", entry)).strip()
            if text:
                texts.append(text)
    return texts


def fortunes_fingerprint(categories: list[str], directory: str = FORTUNES_DIR) -> str:
    """SHA-256 of the category files' bytes: a changed package never reuses a cached checkpoint."""
    digest = hashlib.sha256()
    for category in sorted(categories):
        digest.update(category.encode() + b"\0")
        digest.update(Path(directory, category).read_bytes())
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------- the settings
@dataclass
class PretrainLMArguments:
    """Settings of the offline LM pre-training; all but `cache_dir` and `force` enter the cache key."""

    cache_dir: str = field(default=DEFAULT_CACHE_DIR, metadata={"help": "Folder holding cached checkpoints."})
    force: bool = field(default=False, metadata={"help": "Train again even if a cached checkpoint exists."})
    categories: list[str] = field(
        default_factory=lambda: ["people", "wisdom", "politics", "work", "men-women", "literature"],
        metadata={"help": "Fortune categories to pre-train on (keep the fine-tuning ones out)."},
    )
    vocab_size: int = field(default=2048, metadata={"help": "Byte-level BPE vocabulary (specials included)."})
    max_length: int = field(default=64, metadata={"help": "Tokens per quotation (longer ones are cut)."})
    hidden_size: int = field(default=128, metadata={"help": "Llama width."})
    intermediate_size: int = field(default=384, metadata={"help": "Llama MLP width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Llama depth."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads (divide hidden_size)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the quotations."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0, stop after this many steps."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps, or a fraction when < 1."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    seed: int = field(default=0, metadata={"help": "Seed of the init and the data order."})
    num_threads: int | None = field(
        default=1,
        metadata={"help": "torch threads (the weights depend on it bit for bit: cache key)."},
    )

    def __post_init__(self):
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories must be distinct names, got {self.categories}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}."
            )
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size must be >= 260 (256 bytes + specials), got {self.vocab_size}.")
        for name in ("max_length", "hidden_size", "intermediate_size", "num_hidden_layers", "batch_size"):
            if getattr(self, name) < 2 if name == "max_length" else getattr(self, name) < 1:
                raise ValueError(f"{name} is too small: {getattr(self, name)}.")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ValueError("Set num_train_epochs > 0 or max_steps > 0.")
        if self.learning_rate <= 0 or self.warmup_steps < 0:
            raise ValueError("learning_rate must be > 0 and warmup_steps >= 0.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 (or None), got {self.num_threads}.")

    def threads(self) -> int:
        import torch

        return self.num_threads or torch.get_num_threads()

    def key_inputs(self) -> dict:
        import torch
        import transformers

        from recipes.pretrain_vit import numeric_environment

        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("cache_dir", "force")}
        return settings | {
            "num_threads": self.threads(),
            "version": PRETRAIN_VERSION,
            "data": fortunes_fingerprint(self.categories),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numerics": numeric_environment(),  # the CPU's float rounding changes the weights, as for the ViT
        }

    def checkpoint_dir(self) -> str:
        key = hashlib.sha256(json.dumps(self.key_inputs(), sort_keys=True).encode()).hexdigest()[:12]
        return os.path.join(self.cache_dir, f"llama-fortunes-{key}")


def _as_args(cfg) -> PretrainLMArguments:
    if isinstance(cfg, PretrainLMArguments):
        return cfg
    if isinstance(cfg, dict):
        return PretrainLMArguments(**cfg)
    path = Path(cfg)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[1] / path
    (args,) = parse_config_and_args(PretrainLMArguments, ["--config", str(path)])
    return args


# -------------------------------------------------------------------------------------- tokenizer, model
def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer learnt from `texts` (`tokenizers`): any string encodes, nothing unknown.
    It prepends ``<bos>``; the recipe appends ``<eos>`` to training quotations."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )


def make_model(args: PretrainLMArguments, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_attention_heads,
        max_position_embeddings=max(args.max_length, 128),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (the tokenizer's own specials) plus ``eos``, cut to `max_length`."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [(row + eos)[:max_length] for row in ids]


# ------------------------------------------------------------------------------------------------- training
def _train(args: PretrainLMArguments, output_dir: str) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import DataCollatorForLanguageModeling, get_cosine_schedule_with_warmup

    start = time.perf_counter()
    texts = load_fortunes(args.categories)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    torch.manual_seed(args.seed)
    model = make_model(args, tokenizer)
    rows = [{"input_ids": ids} for ids in encode(tokenizer, texts, args.max_length)]
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        rows, batch_size=args.batch_size, shuffle=True, collate_fn=collate, generator=generator
    )
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.num_train_epochs * len(loader)))
    warmup = int(args.warmup_steps * total) if args.warmup_steps < 1 else int(args.warmup_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    model.train()
    step, running = 0, None
    with tqdm(total=total, desc="pretrain Llama on fortunes", unit="step") as bar:
        while step < total:
            for batch in loader:
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}")
                if step >= total:
                    break
    model.eval()
    metrics = {
        "train_loss": running,
        "train_steps": total,
        "quotations": len(texts),
        "tokens": sum(len(r["input_ids"]) for r in rows),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "total_seconds": round(time.perf_counter() - start, 2),
    }
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "pretrain_config.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": args.key_inputs(), "metrics": metrics}, f, indent=2)
    return metrics


def ensure_pretrained_lm(cfg) -> str:
    """The folder of the pre-trained LM for `cfg` (settings, dict or YAML path), trained first if not cached.

    Atomic (`hf_ens._io.atomic_directory`) and locked, as `pretrain_vit.ensure_pretrained_checkpoint` is.
    """
    import torch
    from filelock import FileLock

    from hf_ens._io import atomic_directory

    args = _as_args(cfg)
    final = args.checkpoint_dir()
    marker = os.path.join(final, "pretrain_config.json")
    if os.path.isfile(marker) and not args.force:
        return final
    os.makedirs(args.cache_dir, exist_ok=True)
    stamp = os.stat(marker).st_mtime_ns if os.path.isfile(marker) else None
    with FileLock(final + ".lock"):
        if os.path.isfile(marker) and (not args.force or os.stat(marker).st_mtime_ns != stamp):
            return final
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads())
        try:
            with atomic_directory(final) as tmp:
                metrics = _train(args, str(tmp))
        finally:
            torch.set_num_threads(threads)
    print(
        f"Pre-trained Llama ({metrics['num_parameters'] / 1e6:.2f}M params) on {metrics['quotations']} "
        f"quotations ({metrics['tokens']} tokens) in {metrics['total_seconds']:.0f} s, final train loss "
        f"{metrics['train_loss']:.3f} -> {final}"
    )
    return final


def main(argv: list[str] | None = None) -> str:
    (args,) = parse_config_and_args(PretrainLMArguments, argv, description=__doc__.splitlines()[0])
    path = ensure_pretrained_lm(args)
    print(json.dumps({"checkpoint": path}))
    return path


if __name__ == "__main__":
    run_cli(main)
