"""Loading one saved member (or processor) strictly: safetensors only, every weight present, no repo code.

The bottom of the library: `ensemble`, `hub`, `soups` and `merges` use it (loading, and `check_like`, the
one check that two members hold the same weights), it imports none of them.
"""

from __future__ import annotations

import json
import os
from fnmatch import fnmatch
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel

from .checks import nonfinite_tensors

__all__ = [
    "EnsembleLoadError",
    "repo_path",
    "check_repo_tree",
    "refuse_remote_code",
    "member_class",
    "load_member",
    "load_processor",
    "weight_dtypes",
    "check_like",
]

CLASSIFICATION_SUFFIXES = ("ForImageClassification", "ForSequenceClassification")
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # GPT2 is GPT2LMHeadModel
TOKEN_CLASSIFICATION_SUFFIXES = ("ForTokenClassification",)
SUPPORTED_SUFFIXES = CLASSIFICATION_SUFFIXES + CAUSAL_LM_SUFFIXES + TOKEN_CLASSIFICATION_SUFFIXES
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json")
# Files of a repo root the processor loader reads: digests must cover them.
PROCESSOR_READS = (
    *PROCESSOR_FILES,
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.jinja",
)
# Root files a loader may open (configs, processor and tokenizer files): none may lead out of the repo.
LOADER_READS = ("*.json", "*.model", "vocab.*", "merges.txt", "*.jinja")


class EnsembleLoadError(OSError):
    """A saved ensemble is incomplete, corrupted, unsafe or inconsistent with its ``ensemble_config.json``."""


# --- the path rule: a repo names files inside itself only ----------------------------------------------
def _allowed_roots(root: str | os.PathLike) -> list[str]:
    """Where the files of the repo at `root` may really lie: the repo itself, and for a Hub download (a
    ``snapshots/<commit>`` folder of the HF cache, whose files link to ``../../blobs``) that repo's blobs."""
    real = os.path.realpath(root)
    roots = [real]
    for folder in (Path(real), *Path(real).parents):  # snapshots/<commit>[/member_00]
        if folder.parent.name == "snapshots":
            blobs = str(folder.parent.parent / "blobs")
            if os.path.isdir(blobs) and os.path.realpath(blobs) == blobs:  # not itself a link elsewhere
                roots.append(blobs)
            break
    return roots


def repo_path(root: str | os.PathLike, name: str | os.PathLike, what: str = "file") -> Path:
    """``root / name``, refused (`EnsembleLoadError` naming it) unless it stays inside the repo at `root`
    once every symlink is followed. Every path a repo names (members, shards of a ``weight_map``, digest
    keys, processor files) goes through here BEFORE it is opened: a repo must never make the loader read,
    hash or report on a file of the loader's own machine (``../../x``, ``/etc/hostname``, a link out)."""
    name = os.fspath(name)
    if not isinstance(name, str) or not name or "\0" in name:
        raise EnsembleLoadError(f"Invalid {what} name {name!r} in the repository {root}.")
    path = os.path.join(os.fspath(root), name)
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, r]) == r for r in _allowed_roots(root)):
        raise EnsembleLoadError(
            f"The {what} {name!r} of the repository {root} lies outside it (it resolves to {real}); refused "
            "before opening it: a repository may only name files inside itself."
        )
    return Path(path)


def check_repo_tree(tree: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """Refuse a symlink under `tree` (a member directory, a weight file...) that leads outside the repo at
    `root` (default: `tree`)."""
    root = tree if root is None else root
    for dirpath, dirnames, filenames in os.walk(tree):
        for entry in dirnames + filenames:
            full = os.path.join(dirpath, entry)
            if os.path.islink(full):
                repo_path(root, os.path.relpath(full, root), "link")


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
        except RecursionError as e:
            raise EnsembleLoadError(f"{file} is nested too deeply to be a config: refused.") from e
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


_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def weight_dtypes(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, str]:
    """The safetensors dtype (``"F32"``, ``"I64"``...) of every tensor of the member saved in `path`, from the
    file headers alone. Every shard a ``model.safetensors.index.json`` names must lie inside `root` (default:
    `path`): this is also where the index's ``weight_map`` is checked before transformers opens a shard."""
    from safetensors import safe_open

    path, root = Path(path), Path(root if root is not None else path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        repo_path(root, index.relative_to(root), "weight index")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise EnsembleLoadError(f"Corrupted {index}: {type(e).__name__}: {e}") from e
        files = []
        for shard in shards:
            if not isinstance(shard, str):
                raise EnsembleLoadError(f"Corrupted {index}: shard name {shard!r} is not a string.")
            files.append(repo_path(root, os.path.relpath(path / shard, root), f"shard named in {index}"))
    else:
        files = [repo_path(root, (path / "model.safetensors").relative_to(root), "weight file")]
    dtypes: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                dtypes.update({name: f.get_slice(name).get_dtype() for name in f.keys()})
        except Exception as e:
            raise EnsembleLoadError(f"Could not read member file {file}: {type(e).__name__}: {e}") from e
    return dtypes


def _check_dtypes(path: Path, config, model: PreTrainedModel, dtypes: dict[str, str]) -> None:
    """Refuse a weight file whose dtypes were rewritten: an integer tensor where the model has a float one
    (raw float bits read as integers are ~1e9), or float tensors in another dtype than the config records."""
    state = model.state_dict()
    for name, dt in dtypes.items():
        tensor = state.get(name)
        if tensor is not None and tensor.is_floating_point() and dt not in _FLOAT_DTYPES:
            raise EnsembleLoadError(
                f"Member {path.name} ({path}): tensor {name!r} is stored as {dt} but {type(model).__name__} "
                "holds floating-point weights there: the file was damaged or tampered with; refused."
            )
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    stored = {_FLOAT_DTYPES[dt] for dt in dtypes.values() if dt in _FLOAT_DTYPES}
    allowed = {recorded}
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None):
        allowed.add(torch.float32)  # such classes save some modules in float32 whatever the model's dtype
    if isinstance(recorded, torch.dtype) and stored - allowed:
        raise EnsembleLoadError(
            f"Member {path.name} ({path}): its config records dtype {recorded} but its weights are stored as "
            f"{sorted(map(str, stored))}: the files were damaged or tampered with; refused."
        )


def load_member(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | torch.device | int | None = None,
    attn_implementation: str | None = None,
    root: str | os.PathLike | None = None,
) -> PreTrainedModel:
    """Load one member directory strictly: safetensors only, every weight present, nothing unexpected.

    `dtype`, `device_map` and `attn_implementation` mean what they mean to transformers' ``from_pretrained``.
    `root`: the repo the member belongs to (default: the member directory): no file it reads, shards
    included, may lie outside it, even through a symlink.

    Refused (`EnsembleLoadError` naming the member and tensor): weights stored in another dtype than the
    config records or as integers where the model has floats, and non-finite (NaN/Inf) weights, whose
    predictions are meaningless (inspect such a member with transformers' own ``from_pretrained``).
    """
    path = Path(path)
    root = Path(root) if root is not None else path
    repo_path(root, path.relative_to(root) if path != root else ".", "member directory")
    check_repo_tree(path, root)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EnsembleLoadError(f"Missing member file {config_file}.")
    weights = [path / "model.safetensors", path / "model.safetensors.index.json"]
    if not any(w.is_file() for w in weights):
        raise EnsembleLoadError(f"Missing member file {weights[0]} (hf-ens loads safetensors weights only).")
    refuse_remote_code(path)
    dtypes = weight_dtypes(path, root)
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
    _check_dtypes(path, config, model, dtypes)
    bad = nonfinite_tensors(model)
    if bad:
        raise EnsembleLoadError(
            f"Member {path.name} ({path}) has non-finite (NaN/Inf) weights in {len(bad)} tensor(s), e.g. "
            f"{bad[0]}: its predictions would be meaningless (it was saved by a diverged run or damaged); "
            "refused. Inspect it with transformers' own from_pretrained if needed."
        )
    return model


def load_processor(path: str | os.PathLike):
    """The processor saved in `path` (image processor, tokenizer or processor), or None if there is none."""
    path = Path(path)
    if not any((path / n).is_file() for n in PROCESSOR_FILES):
        return None
    for name in os.listdir(path):  # the processor loader opens files by name: none may lead out
        if any(fnmatch(name, p) for p in LOADER_READS):
            repo_path(path, name, "processor file")
    refuse_remote_code(path)
    try:
        return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise EnsembleLoadError(
            f"Could not load the processor saved in {path}: {type(e).__name__}: {e}"
        ) from e


def check_like(ref: nn.Module, ref_shapes: dict[str, tuple], model: nn.Module, i: int) -> dict:
    """`model`'s state dict, after checking it has `ref`'s class, weight names and shapes (`ref_shapes`):
    members of one soup, merge or ensemble must be the same network (`i`: the member's index, for errors)."""
    if type(model) is not type(ref):
        raise ValueError(
            f"Cannot average weights of different architectures: member 0 is {type(ref).__name__}, "
            f"member {i} is {type(model).__name__}."
        )
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != ref_shapes:
        diff = sorted(set(ref_shapes.items()) ^ set(shapes.items()))[:5]
        raise ValueError(
            f"Cannot average weights of different architectures: member {i} has different weight names or "
            f"shapes than member 0, e.g. {diff}."
        )
    return state
