"""The ensemble repo as files: the names it owns, what is downloaded, integrity digests, the one-commit
push, and what may be published (Hub ids, never the machine's paths).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from fnmatch import fnmatch
from pathlib import Path

from .members import PROCESSOR_READS, EnsembleLoadError

__all__ = [
    "HubPushError",
    "OWN_PATTERNS",
    "ALLOW_PATTERNS",
    "owned",
    "download",
    "upload",
    "file_digests",
    "verify_digests",
    "is_hub_id",
    "local_name",
    "public_metadata",
]

ENSEMBLE_CONFIG_NAME = "ensemble_config.json"
# Top-level names an ensemble save writes and therefore replaces. Everything else in a directory saved into
# (a Trainer's training_args.bin, the user's model-best.safetensors or member_notes.txt) is left alone.
OWN_PATTERNS = (
    "member_[0-9][0-9]",
    "member_[0-9][0-9][0-9]",
    "model.safetensors",
    "model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors",
    "model.safetensors.index.json",
    "base_extra.safetensors",  # LoRA members: frozen base weights their base checkpoint lacks (adapters.py)
    ENSEMBLE_CONFIG_NAME,
)
# Files fetched from the Hub for an ensemble: configs, processor/tokenizer files and the member weights; never
# Python files (no repo code can run) and not the root soup weights (the ensemble does not use them).
ALLOW_PATTERNS = [
    "*.json",
    "*.txt",
    "*.model",
    "*.jinja",
    "README.md",
    "member_[0-9]*/*.safetensors",
    "base_extra.safetensors",
]
# Root soup weights: recorded in the digests, but not downloaded, so they are verified only when present.
_ROOT_WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
_UNDIGESTED = (ENSEMBLE_CONFIG_NAME, "README.md")  # the card is meant to be edited on the Hub


class HubPushError(RuntimeError):
    """`EnsembleModel.push_to_hub` failed before its single commit was made."""


def owned(name: str) -> bool:
    """Whether a top-level entry of a saved ensemble directory is one the ensemble writes."""
    return any(fnmatch(name, p) for p in OWN_PATTERNS)


# --- integrity ------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file of a freshly written ensemble folder (POSIX relative paths), except
    ``ensemble_config.json`` (which holds them) and ``README.md``."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        p.relative_to(folder).as_posix(): _sha256(p)
        for p in files
        if p.relative_to(folder).as_posix() not in _UNDIGESTED
    }


def verify_digests(folder: str | os.PathLike, digests: dict | None, require: bool = False) -> None:
    """Raise `EnsembleLoadError` naming the first file whose bytes differ from its recorded SHA-256.

    Every digest key must name a file inside `folder` (`hf_ens.members.repo_path`, checked before it is
    opened); a file listed under several names (``a``, ``./a``) is hashed once. A recorded file that is
    missing is an error, except the root soup weights, which a Hub download skips. Files the loader reads
    (every file of a member, the processor files of the root) that no digest covers, or no digests at
    all (a repo saved before digests were recorded, or whose digests were deleted), give a warning, or
    `EnsembleLoadError` with ``require=True``.
    """
    from .members import repo_path

    folder = Path(folder)
    if digests is not None and not isinstance(digests, dict):
        raise EnsembleLoadError(f"Corrupted {folder / ENSEMBLE_CONFIG_NAME}: 'files' must be a mapping.")
    hashed: dict[tuple[int, int], str] = {}
    for rel, expected in sorted((digests or {}).items()):
        path = repo_path(folder, rel, f"file listed in {ENSEMBLE_CONFIG_NAME}")
        if not path.is_file():
            if "/" in rel or not any(fnmatch(rel, p) for p in _ROOT_WEIGHTS):
                raise EnsembleLoadError(f"Missing file {path} (listed in {ENSEMBLE_CONFIG_NAME}).")
            continue
        st = path.stat()
        key = (st.st_dev, st.st_ino)
        if key not in hashed:
            hashed[key] = _sha256(path)
        actual = hashed[key]
        if actual != expected:
            raise EnsembleLoadError(
                f"File {path} is damaged or was changed: its SHA-256 differs from the one "
                f"{ENSEMBLE_CONFIG_NAME} records. Download or save the ensemble again."
            )
    read = [p for p in folder.glob("member_*/**/*") if p.is_file()]
    read += [p for p in folder.iterdir() if p.is_file() and any(fnmatch(p.name, q) for q in PROCESSOR_READS)]
    uncovered = sorted(
        p.relative_to(folder).as_posix()
        for p in read
        if p.name not in _UNDIGESTED and (p.stat().st_dev, p.stat().st_ino) not in hashed
    )
    if digests is None or uncovered:
        what = (
            "records no file digests"
            if digests is None
            else f"records no digest for {len(uncovered)} file(s) it loads, e.g. {uncovered[:3]}"
        )
        message = (
            f"{folder / ENSEMBLE_CONFIG_NAME} {what}: those files cannot be checked for damage or tampering "
            "(saved before hf-ens recorded digests, or the digests were removed)."
        )
        if require:
            raise EnsembleLoadError(message + " Refused (require_digests=True).")
        warnings.warn(message + " Pass require_digests=True to refuse such repos.", UserWarning, stacklevel=3)


# --- download and push ------------------------------------------------------------------------------------
def download(repo_id: str, revision: str | None, **hub_kwargs) -> Path:
    """Fetch an ensemble repo (not its root soup weights) into the HF cache; errors say what was missing.

    `hub_kwargs` (token, cache_dir, force_download, local_files_only) go to every download."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    where = f"ensemble {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, **hub_kwargs)
        )
    except RevisionNotFoundError as e:
        raise EnsembleLoadError(
            f"Revision {revision!r} not found in {repo_id!r}: no branch, tag or commit of that name."
        ) from e
    except RepositoryNotFoundError as e:
        raise EnsembleLoadError(
            f"Repository {repo_id!r} not found on the Hub (or it is private or gated and no valid token was "
            "given); a local directory of that name does not exist either."
        ) from e
    except Exception as e:
        error = e
    # Find out which file failed, so the error names it (snapshot_download's message often does not).
    try:
        info = HfApi(token=hub_kwargs.get("token")).model_info(
            repo_id, revision=revision, files_metadata=False
        )
    except Exception as e:
        raise EnsembleLoadError(f"Could not fetch {where}: {error}") from e
    wanted = [
        s.rfilename for s in info.siblings or [] if any(fnmatch(s.rfilename, p) for p in ALLOW_PATTERNS)
    ]
    for filename in wanted:
        try:
            hf_hub_download(repo_id, filename, revision=info.sha, **{**hub_kwargs, "force_download": True})
        except Exception as e:
            raise EnsembleLoadError(
                f"Could not download {filename} of {where}: {type(e).__name__}: {e}"
            ) from e
    raise EnsembleLoadError(f"Could not fetch {where}: {error}") from error


def upload(folder: Path, repo_id: str, token: str | None, private: bool | None, **commit_kwargs):
    """Upload a saved ensemble folder in ONE commit that also deletes stale members of an earlier push."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            # a repo that held a larger ensemble or a sharded soup must not keep stale parts
            delete_patterns=[q for p in OWN_PATTERNS for q in (p, f"{p}/*")],
            **commit_kwargs,
        )
    except Exception as e:
        raise HubPushError(
            f"Pushing the ensemble to {repo_id!r} failed ({type(e).__name__}: {e}). Nothing was committed "
            "(the upload is a single commit) and the local model and directories are intact; retry the push."
        ) from e


# --- what may be published ------------------------------------------------------------------------------
def local_name(value) -> str | None:
    """The base name of `value` if it is a path of this machine (absolute, ``~``, or an existing relative path
    with a separator), else None. Such values are never published as they are."""
    if not isinstance(value, str) or not value or "\n" in value:
        return None
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded) or (("/" in value or os.sep in value) and os.path.exists(expanded)):
        return Path(expanded.rstrip("/" + os.sep)).name or expanded
    return None


def is_hub_id(value) -> bool:
    """A real Hub repo id: passes `huggingface_hub.utils.validate_repo_id`, is not a local path, has no ':'
    (``offline:fashion_mnist``, ``local:name``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(value, str) or ":" in value or local_name(value) is not None:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def public_metadata(metadata: dict) -> dict:
    """`metadata` with every local path replaced by ``local:<base name>``: what ``ensemble_config.json`` and
    the card may carry (an absolute path names the user's machine and home directory)."""
    out = {}
    for key, value in metadata.items():
        name = local_name(value)
        out[key] = f"local:{name}" if name is not None else value
    return out
