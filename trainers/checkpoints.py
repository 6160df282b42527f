"""What a StarSSE checkpoint holds, when it is complete, which run made it, and how old runs leave the way.

A checkpoint is COMPLETE when its cycle state (``starsse_state.json``) exists: it is written last, through
``hf_ens._io.atomic_file``, after every process has written its files, and it lists each file of the
checkpoint with its size. A kill anywhere while a checkpoint is written therefore leaves a checkpoint that
:func:`checkpoint_problems` reports (and ``resume_from_checkpoint=True`` skips), never one that resumes from
half the files. The cycle state also records the run configuration (:func:`run_config`), so a resume can
refuse a checkpoint of another run instead of silently continuing it.

Whole directories (old checkpoints, an old ``members/``) are removed by first renaming them into a hidden
trash directory (one atomic step each) and then deleting that; trash a kill leaves behind is removed by the
next start (:func:`remove_leftovers`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_ens import _io

CYCLE_STATE_NAME = "starsse_state.json"
ANCHOR_NAME = "starsse_anchor.safetensors"
TRASH_PREFIX = ".starsse-trash-"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")

# The settings that decide what a run computes; a checkpoint only continues a run with the same values.
RUN_FIELDS = (
    "method",
    "num_members",
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "cycle_epochs",
    "cycle_learning_rate",
    "cycle_warmup_steps",
    "reset_optimizer",
    "seed",
    "data_seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "weight_decay",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "parallel_members",
)
# With cycle_learning_rate="auto" these decide the chosen LR too. Recorded only then, so that checkpoints of
# runs with a numeric cycle LR (also those made before these fields existed) keep resuming.
AUTO_RUN_FIELDS = ("cycle_lr_grid", "probe_search", "probe_fraction", "basin_tolerance", "probe_loss_ratio")


def run_config(args) -> dict[str, Any]:
    """The values of :data:`RUN_FIELDS` as JSON would store them (enums as their value)."""
    names = RUN_FIELDS + (AUTO_RUN_FIELDS if getattr(args, "cycle_learning_rate", None) == "auto" else ())
    values = {name: getattr(args, name, None) for name in names}
    values = {k: getattr(v, "value", v) for k, v in values.items()}
    return json.loads(json.dumps(values, default=str))


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"name (checkpoint: a, now: b)"`` for every field whose values differ (a missing one included)."""
    return [
        f"{name} (checkpoint: {saved.get(name, 'not recorded')!r}, now: {value!r})"
        for name, value in current.items()
        if saved.get(name, "not recorded") != value
    ]


def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` directories of `output_dir`, newest (largest N) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return sorted(found, key=checkpoint_step, reverse=True)


def write_cycle_state(checkpoint: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write the cycle state LAST, listing every file already in the checkpoint: the completion marker."""
    checkpoint = Path(checkpoint)
    files = {
        str(p.relative_to(checkpoint)): p.stat().st_size
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != CYCLE_STATE_NAME and not p.name.startswith(".")
    }
    with _io.atomic_file(checkpoint / CYCLE_STATE_NAME) as f:
        json.dump({**state, "files": files}, f, indent=2)


def read_cycle_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The cycle state of a complete checkpoint; a ValueError naming the file otherwise."""
    problems = checkpoint_problems(checkpoint)
    if problems:
        raise ValueError(f"Cannot resume from {checkpoint}: " + "; ".join(problems) + ".")
    with open(Path(checkpoint) / CYCLE_STATE_NAME) as f:
        return json.load(f)


def checkpoint_problems(checkpoint: str | os.PathLike) -> list[str]:
    """Why `checkpoint` cannot be resumed from (each problem names its file); empty when it is complete.

    Checks that the completion marker exists, that every file it lists is there with its recorded size, and
    that JSON and safetensors files parse (their headers only: cheap even for large models).
    """
    checkpoint = Path(checkpoint)
    marker = checkpoint / CYCLE_STATE_NAME
    if not checkpoint.is_dir():
        return [f"{checkpoint} is not a directory"]
    if not marker.is_file():
        return [
            f"{marker} is missing: the checkpoint was not finished (killed while being written) or was "
            "not written by StarSSETrainer"
        ]
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{marker} is damaged ({type(err).__name__}: {err})"]
    problems = []
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path} has {path.stat().st_size} bytes, {size} were written")
        elif (error := _parse_error(path)) is not None:
            problems.append(f"{path} is damaged ({error})")
    return problems


def _parse_error(path: Path) -> str | None:
    try:
        if path.suffix == ".json":
            with open(path) as f:
                json.load(f)
        elif path.suffix == ".safetensors":
            with safetensors.safe_open(str(path), framework="pt"):
                pass
    except Exception as err:  # noqa: BLE001 - any failure to parse means the file is damaged
        return f"{type(err).__name__}: {err}"
    return None


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, dict[Path, list[str]]]:
    """The newest complete checkpoint (or None) and the newer incomplete ones skipped, with their problems."""
    skipped = {}
    for checkpoint in list_checkpoints(output_dir):
        problems = checkpoint_problems(checkpoint)
        if not problems:
            return checkpoint, skipped
        skipped[checkpoint] = problems
    return None, skipped


def discard(paths: list[Path]) -> None:
    """Remove directories so that a kill leaves each one either in place or out of the way.

    Each is renamed into a hidden trash directory beside it (one atomic step), then the trash is deleted.
    """
    by_parent: dict[Path, list[Path]] = {}
    for path in paths:
        if path.exists():
            by_parent.setdefault(path.parent, []).append(path)
    for parent, children in by_parent.items():
        trash = Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=parent))
        for child in children:
            os.rename(child, trash / child.name)
        shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(output_dir: str | os.PathLike, member_paths: list[str]) -> list[Path]:
    """Delete what a killed run left: trash, half-written members (``.member_XX.*``, also the older
    ``.old_member_XX.*`` names), a half-written ``basin_probe.json`` and the writability probe. Returns what
    was removed."""
    removed: list[Path] = []
    for member in member_paths:
        removed += _io.remove_leftovers(member)  # first puts back a member cut between two renames
    members_dir = Path(member_paths[0]).parent if member_paths else None
    out = Path(output_dir)
    patterns = [(members_dir, ".member_*"), (members_dir, ".old_member_*")]
    patterns += [(out, f"{TRASH_PREFIX}*"), (out, ".write_test.*"), (out, ".basin_probe.json.tmp-*")]
    for folder, pattern in patterns:
        if folder is not None and folder.is_dir():
            for leftover in folder.glob(pattern):
                removed.append(leftover)
                _delete(leftover)
    return removed


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
