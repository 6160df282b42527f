"""What a StarSSE checkpoint holds, when it is complete, which run made it, and how old runs leave the way.

A checkpoint is COMPLETE when its cycle state (``starsse_state.json``) exists: it is written last, through
``hf_ens._io.atomic_file``, after every process has written its files, and it lists each file of the
checkpoint with its size. A kill anywhere while a checkpoint is written therefore leaves a checkpoint that
:func:`checkpoint_problems` reports (and ``resume_from_checkpoint=True`` skips), never one that resumes from
half the files. The cycle state also records the run configuration (:func:`run_config`), so a resume can
refuse a checkpoint of another run instead of silently continuing it.

This module also holds the run directory's policy, in one place for the trainer and the recipe: what counts
as an earlier run (:func:`earlier_run`), which checkpoint a resume continues and the ONE refusal of another
run's checkpoint or probe file (:func:`refuse_other_run`), all applied by :func:`prepare_output_dir` before
any weight is touched.

Whole directories (old checkpoints, an old ``members/``) are removed with ``hf_ens._io.discard`` (renamed
into a hidden trash directory, one atomic step each, then deleted); trash a kill leaves behind is removed by
the next start (:func:`remove_leftovers`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import safetensors
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_ens import _io

# The run directory: {output_dir}/members/member_XX, checkpoint-N/, branches/member_XX/, basin_probe.json
MEMBERS_DIR = "members"
BRANCHES_DIR = "branches"
PROBE_FILE = "basin_probe.json"
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
# With the basin guard (cycle_learning_rate="auto" or basin_guard=True) these decide the chosen LR too.
# Recorded only then, so that checkpoints of runs without it (also those made before these fields existed)
# keep resuming.
AUTO_RUN_FIELDS = (
    "basin_guard",
    "cycle_lr_grid",
    "probe_search",
    "probe_fraction",
    "basin_tolerance",
    "probe_loss_ratio",
)


def run_config(args) -> dict[str, Any]:
    """The values of :data:`RUN_FIELDS` as JSON would store them (enums as their value)."""
    names = RUN_FIELDS + (AUTO_RUN_FIELDS if getattr(args, "probes_cycle_learning_rate", False) else ())
    values = {name: getattr(args, name, None) for name in names}
    values = {k: getattr(v, "value", v) for k, v in values.items()}
    return json.loads(json.dumps(values, default=str))


# What a branch does not depend on: how many processes share the run (trainers.branches).
PROCESS_FIELDS = ("world_size", "gradient_accumulation_steps")


def member_run_config(args) -> dict[str, Any]:
    """:func:`run_config` without :data:`PROCESS_FIELDS`: what a member trained alone depends on."""
    return {k: v for k, v in run_config(args).items() if k not in PROCESS_FIELDS}


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
    """``hf_ens._io.discard`` with this run's trash prefix (so :func:`remove_leftovers` finds its trash)."""
    _io.discard(paths, trash_prefix=TRASH_PREFIX)


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
                _io.delete(leftover)
    return removed


def refuse_other_run(
    where: str | os.PathLike, saved: dict[str, Any], ours: dict[str, Any], hint: str = ""
) -> None:
    """THE refusal of a checkpoint (the loop's, a branch's, model 1's) or probe file that a run with other
    settings made: a ValueError naming every differing field (``saved``: the recorded values)."""
    differences = config_differences(saved, ours)
    if differences:
        raise ValueError(
            f"Cannot resume from {where}: it was made by a run with other settings: {'; '.join(differences)}"
            + (f" ({hint})" if hint else "")
            + ". Resume with the same settings, or start a new run with overwrite_output_dir=True."
        )


def earlier_run(output_dir: str | os.PathLike, also: tuple[str, ...] = ()) -> list[str]:
    """What an earlier run left in `output_dir` (checkpoints oldest first, members, branches, the probe file,
    and the caller's own outputs `also`): a new run there must resume it or overwrite it."""
    out = Path(output_dir)
    found = [p.name for p in reversed(list_checkpoints(out))]
    return found + [name for name in (BRANCHES_DIR, MEMBERS_DIR, PROBE_FILE, *also) if (out / name).exists()]


def prepare_output_dir(
    args, member_paths: list[str], resume_from_checkpoint, branches_only: bool
) -> str | None:
    """Before any weight is touched: remove what a killed run left, then either pick the checkpoint to resume
    from (the newest complete one for ``True``; refused if another run configuration made it), or move the
    previous run out of the way (``overwrite_output_dir``), or refuse to mix two runs.

    `branches_only`: ``parallel_members`` with model 1 already written, so the branches resume alone, from
    their own checkpoints; model 1's newest checkpoint, if any, must still come from this run's settings.
    Returns the checkpoint for ``Trainer.train`` (None: start fresh, or the branches resume alone).
    """
    out = args.output_dir  # writable: StarSSETrainer.__init__ and trainers.run_lock checked it
    if args.should_save:
        remove_leftovers(out, member_paths)
    if resume_from_checkpoint in (None, False, ""):
        if args.overwrite_output_dir:
            if args.should_save:  # checkpoints first: a kill in between cannot resume them
                old = [Path(out) / BRANCHES_DIR, Path(out) / MEMBERS_DIR, Path(out) / PROBE_FILE]
                discard(list_checkpoints(out) + old)
        elif existing := earlier_run(out):
            raise ValueError(
                f"output_dir {out!r} already holds {existing}; pass resume_from_checkpoint=... to "
                "continue that run or overwrite_output_dir=True to replace it."
            )
        return None
    if branches_only:
        checkpoint, _ = newest_complete_checkpoint(out)
        if checkpoint is not None:
            refuse_other_run(checkpoint, read_cycle_state(checkpoint).get("run", {}), member_run_config(args))
        return None
    if resume_from_checkpoint is True:
        checkpoint, skipped = newest_complete_checkpoint(out)
        for path, problems in skipped.items():
            warnings.warn(f"Skipping incomplete checkpoint {path}: {'; '.join(problems)}.", stacklevel=5)
        if checkpoint is None:
            raise ValueError(
                f"No complete checkpoint in {out!r} to resume from"
                + (f" (incomplete: {[p.name for p in skipped]})" if skipped else "")
                + "; start a new run with overwrite_output_dir=True."
            )
    else:
        checkpoint = resume_from_checkpoint
    saved = read_cycle_state(checkpoint)  # a ValueError naming any missing or damaged file
    refuse_other_run(checkpoint, saved.get("run", {}), run_config(args))
    return str(checkpoint)


def rotate_checkpoints(run_dir: str | os.PathLike, limit: int | None, best: str | None) -> None:
    """``save_total_limit`` as the Trainer applies it (the newest `limit` and the best one stay), but every
    checkpoint leaves in one rename (:func:`discard`)."""
    if not limit or limit <= 0:
        return
    checkpoints = list_checkpoints(run_dir)  # newest first
    keep = set(checkpoints[:limit])
    if best is not None:
        keep.add(Path(best))
    discard([p for p in checkpoints if p not in keep])


def load_model_weights(model, checkpoint: str | os.PathLike, plain: bool = True) -> bool:
    """Restore `model`'s weights from a Trainer checkpoint strictly; False when the Trainer's own loader must
    do it (not a ``PreTrainedModel``, or FSDP / DeepSpeed: `plain` False).

    transformers 5.24's ``Trainer._load_from_checkpoint`` loads the legacy key names that ``save_pretrained``
    writes without converting them (upstream #48805): for ViT it silently keeps wrong weights. Loading a fresh
    copy with ``from_pretrained`` and copying it in with ``strict=True`` either restores every tensor or
    raises. A peft model restores its adapter only (the base is frozen and never saved).
    """
    from transformers import PreTrainedModel

    from hf_ens import adapters

    if adapters.is_peft_model(model):
        try:
            adapters.load_adapter_weights(model, checkpoint)
        except OSError as err:
            raise ValueError(f"Checkpoint {checkpoint} does not match the model: {err}") from err
        return True
    if not (isinstance(model, PreTrainedModel) and plain):
        return False
    loaded, info = type(model).from_pretrained(checkpoint, output_loading_info=True, dtype=model.dtype)
    problems = {
        k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if problems:
        raise ValueError(f"Checkpoint {checkpoint} does not match the model: {problems}")
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    return True
