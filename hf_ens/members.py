"""Loading one saved member (or processor) strictly: safetensors only, every weight present, no repo code.

The bottom of the library: `ensemble`, `hub` and `soups` use it, it imports none of them.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel

from .checks import nonfinite_tensors

__all__ = ["EnsembleLoadError", "refuse_remote_code", "member_class", "load_member", "load_processor"]

CLASSIFICATION_SUFFIXES = ("ForImageClassification", "ForSequenceClassification")
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # GPT2 is GPT2LMHeadModel
SUPPORTED_SUFFIXES = CLASSIFICATION_SUFFIXES + CAUSAL_LM_SUFFIXES
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json")


class EnsembleLoadError(OSError):
    """A saved ensemble is incomplete, corrupted, unsafe or inconsistent with its ``ensemble_config.json``."""


def refuse_remote_code(directory: str | os.PathLike) -> None:
    """Raise `EnsembleLoadError` if a JSON file in `directory` has an ``auto_map`` (the repo's own code).

    Runs before any transformers call: with an ``auto_map`` transformers may offer to import the repo's
    ``.py`` files ("run the custom code? [y/N]"). hf-ens never runs repo code, so such a repo is refused
    outright instead of relying on ``trust_remote_code=False`` alone. Unreadable JSON is left to the loader,
    which names the file.
    """
    for file in sorted(Path(directory).glob("*.json")):
        try:
            content = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and "auto_map" in content:
            raise EnsembleLoadError(
                f"{file} has an 'auto_map' entry {content['auto_map']!r}: it asks to run the repository's "
                "own Python code, which hf-ens never does (trust_remote_code=False). Remove the entry if the "
                "model is a transformers class, or load it with transformers yourself if you trust the code."
            )


def member_class(config) -> type[PreTrainedModel]:
    """The transformers class named in a member config (no remote code: only classes transformers ships)."""
    names = [a for a in (getattr(config, "architectures", None) or []) if a.endswith(SUPPORTED_SUFFIXES)]
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise EnsembleLoadError(
            f"Member config names architectures={getattr(config, 'architectures', None)}; hf-ens loads only "
            f"transformers' own {' / '.join('*' + s for s in SUPPORTED_SUFFIXES)} classes (no remote code)."
        )
    return cls


def load_member(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | torch.device | int | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load one member directory strictly: safetensors only, every weight present, nothing unexpected.

    `dtype`, `device_map` and `attn_implementation` mean what they mean to transformers' ``from_pretrained``.

    Non-finite (NaN/Inf) weights give a warning naming the member rather than an error: loading is how a user
    inspects a broken run or an old repo (saving and pushing refuse them, see `hf_ens.assert_finite`), and
    the warning says that its predictions are meaningless.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EnsembleLoadError(f"Missing member file {config_file}.")
    weights = [path / "model.safetensors", path / "model.safetensors.index.json"]
    if not any(w.is_file() for w in weights):
        raise EnsembleLoadError(f"Missing member file {weights[0]} (hf-ens loads safetensors weights only).")
    refuse_remote_code(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise EnsembleLoadError(f"Could not read member file {config_file}: {type(e).__name__}: {e}") from e
    try:
        model, info = member_class(config).from_pretrained(
            path,
            config=config,
            use_safetensors=True,
            output_loading_info=True,
            dtype=dtype,
            device_map=device_map,
            attn_implementation=attn_implementation,
            trust_remote_code=False,
        )
    except EnsembleLoadError:
        raise
    except Exception as e:  # corrupted JSON / safetensors header, truncated file, ...
        bad = next((w for w in weights if w.is_file()), path)
        raise EnsembleLoadError(f"Could not load member {path} (file {bad}): {type(e).__name__}: {e}") from e
    problems = {
        k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if problems:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:8]}" for k, v in problems.items())
        raise EnsembleLoadError(
            f"Member weights in {weights[0]} do not match {type(model).__name__}: {detail}."
        )
    bad = nonfinite_tensors(model)
    if bad:
        warnings.warn(
            f"Member {path.name} ({path}) has non-finite (NaN/Inf) weights in {len(bad)} tensor(s), e.g. "
            f"{bad[0]}: its predictions are meaningless. It was saved by a diverged run or damaged.",
            UserWarning,
            stacklevel=2,
        )
    return model


def load_processor(path: str | os.PathLike):
    """The processor saved in `path` (image processor, tokenizer or processor), or None if there is none."""
    path = Path(path)
    if not any((path / n).is_file() for n in PROCESSOR_FILES):
        return None
    refuse_remote_code(path)
    try:
        return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise EnsembleLoadError(
            f"Could not load the processor saved in {path}: {type(e).__name__}: {e}"
        ) from e
