"""Configuration of StarSSE / SSE / Local DE runs: ``TrainingArguments`` plus the ensemble fields."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

METHODS = ("starsse", "sse", "local_de")
AUTO = "auto"
DEFAULT_CYCLE_LR_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass
class StarSSEConfig(TrainingArguments):
    r"""``TrainingArguments`` for :class:`~hf_ens.trainers.StarSSETrainer`, plus the ensemble fields.

    The configuration class of the trainer (TRL's ``XConfig`` / ``XTrainer`` pattern). Only the parameters
    specific to the ensemble are listed here; for the rest see ``transformers.TrainingArguments``.

    ``num_train_epochs``, ``learning_rate``, ``lr_scheduler_type`` and ``warmup_steps`` describe model 1, an
    ordinary fine-tune. Cycles 2..K restart at ``cycle_learning_rate`` and anneal by cosine over
    ``cycle_epochs`` (Sadrtdinov et al., NeurIPS 2023).

    Parameters:
        > Parameters that control the ensemble

        method (`str`, *optional*, defaults to `"starsse"`):
            Where each later cycle starts: `"starsse"` from model 1, `"sse"` from the previous member,
            `"local_de"` from the original pre-trained weights with a fresh head, a member-specific seed and
            model 1's full schedule.
        num_members (`int`, *optional*, defaults to `5`):
            Number of ensemble members K, model 1 included (K >= 1).

        > Parameters that control the cycles 2..K

        cycle_epochs (`float` or `None`, *optional*, defaults to `None`):
            Length of each later cycle in epochs; `None`: `num_train_epochs`. Ignored by `"local_de"`.
        cycle_learning_rate (`float`, `"auto"` or `None`, *optional*, defaults to `None`):
            Peak LR of each later cycle (cosine annealed to ~0); `None`: `learning_rate`; `"auto"`: chosen
            after model 1 by the basin guard (`trainers.probe`): the largest LR of `cycle_lr_grid` that stays
            in the pre-train basin.
        basin_guard (`bool`, *optional*, defaults to `False`):
            The basin guard as a safety net for a numeric `cycle_learning_rate`: one probe after model 1
            checks it; it is kept if it stays in the basin, else the largest `cycle_lr_grid` LR below it that
            stays is used.
        cycle_warmup_steps (`float`, *optional*, defaults to `0`):
            Linear warmup inside each later cycle: optimizer steps, or a fraction of a cycle if < 1.
        reset_optimizer (`bool`, *optional*, defaults to `True`):
            Clear the optimizer state (momentum, Adam moments and step) at every cycle start.

        > Parameters that control the basin guard (`cycle_learning_rate="auto"` or `basin_guard=True`)

        cycle_lr_grid (`list[float]`, *optional*, defaults to `[0.25, 0.5, 1, 2, 4, 8, 16]`):
            The candidate cycle LRs, as multiples of `learning_rate` (at least two, each > 0).
        probe_search (`str`, *optional*, defaults to `"bisect"`):
            Which candidates are probed: `"bisect"` halves the bracket each round, `"linear"` probes in
            increasing order up to the first that leaves the basin.
        probe_fraction (`float`, *optional*, defaults to `0.25`):
            Length of one probe as a fraction of a cycle, in (0, 0.25]; all probes together cost at most one
            cycle.
        basin_tolerance (`float`, *optional*, defaults to `0.1`):
            The largest loss barrier (model 1 -> probe end) that still counts as inside the basin, as a
            fraction of model 1's eval loss.
        probe_loss_ratio (`float`, *optional*, defaults to `2.0`):
            A probe whose eval loss exceeds this multiple of model 1's has left the basin, whatever its
            barrier.

        > Parameters that control processes and the run directory

        parallel_members (`bool`, *optional*, defaults to `False`):
            Under N processes, train the members that do not depend on each other (StarSSE's after model 1,
            all of Local DE's) at the same time, one per process, with model 1's batch; not for `"sse"`.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Remove the previous run's members and checkpoints in `output_dir` before training.
        logging_nan_inf_filter (`bool`, *optional*, defaults to `False`):
            `TrainingArguments`' filter, off here: a NaN/Inf loss stops the run with `NonFiniteError`.
    """

    method: str = field(
        default="starsse",
        metadata={
            "help": "Where each later cycle starts: 'starsse' (model 1's weights), 'sse' (the previous "
            "member) or 'local_de' (the original pre-trained weights, new head and data order per member).",
            "choices": list(METHODS),
        },
    )
    num_members: int = field(
        default=5, metadata={"help": "Number of ensemble members K, model 1 included (K >= 1)."}
    )
    cycle_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Length of cycles 2..K in epochs (float). Default: num_train_epochs. "
            "Ignored by 'local_de', whose members all follow model 1's schedule."
        },
    )
    # `float | str | None`: HfArgumentParser then hands the command line's value over as a string ("auto" or
    # "3e-4"), which __post_init__ turns into "auto" or a float.
    cycle_learning_rate: float | str | None = field(
        default=None,
        metadata={
            "help": "Peak LR of cycles 2..K (cosine annealed to ~0 inside each cycle): a number, or 'auto' "
            "to choose it after model 1 with short probe cycles (the largest LR of cycle_lr_grid that stays "
            "in the pre-train basin on eval_dataset; 'starsse' and 'sse' only). Unset (None): learning_rate. "
            "Too high leaves the pre-train basin and loses the transfer benefit; ignored by 'local_de'."
        },
    )
    basin_guard: bool = field(
        default=False,
        metadata={
            "help": "A safety net for a numeric cycle_learning_rate (or learning_rate when unset): after "
            "model 1, one probe cycle checks it on eval_dataset; it is kept if it stays in the pre-train "
            "basin, and only if it leaves is the largest cycle_lr_grid LR below it that stays used instead. "
            "Not with 'auto' (which already chooses inside the basin)."
        },
    )
    cycle_lr_grid: list[float] = field(
        default_factory=lambda: list(DEFAULT_CYCLE_LR_GRID),
        metadata={
            "help": "cycle_learning_rate='auto': the candidate cycle LRs, as multiples of learning_rate "
            "(at least two, each > 0), sorted; probe_search decides which of them are probed."
        },
    )
    probe_search: str = field(
        default="bisect",
        metadata={
            "help": "cycle_learning_rate='auto': which candidates to probe. 'bisect' halves the bracket "
            "each round (3 probes for 7 candidates; assumes the barrier grows with the LR); 'linear' probes "
            "in increasing order up to the first that leaves (every candidate up to it, never stepping over "
            "a failure).",
            "choices": ["bisect", "linear"],
        },
    )
    probe_fraction: float = field(
        default=0.25,
        metadata={
            "help": "cycle_learning_rate='auto': length of one probe cycle as a fraction of a cycle, in "
            "(0, 0.25]. All probes together never exceed one cycle: each is at most 1/len(cycle_lr_grid)."
        },
    )
    basin_tolerance: float = field(
        default=0.1,
        metadata={
            "help": "cycle_learning_rate='auto': the largest loss barrier a probe may show and still "
            "count as inside the basin, as a fraction of model 1's eval loss (mean cross-entropy, nats): "
            "the barrier of the straight path model 1 -> probe end, max_t L(t) - ((1-t) L(0) + t L(1)), "
            "must be <= basin_tolerance x model 1's eval loss (0.1: a tenth)."
        },
    )
    probe_loss_ratio: float = field(
        default=2.0,
        metadata={
            "help": "cycle_learning_rate='auto': a backstop for paths without a bump; a probe whose eval "
            "loss exceeds probe_loss_ratio x model 1's has left the basin whatever its barrier (>= 1). "
            "A probe is short and unconverged, so its loss is above model 1's even at small LRs: keep "
            "this loose."
        },
    )
    cycle_warmup_steps: float = field(
        default=0,
        metadata={
            "help": "Linear warmup inside each later cycle: optimizer steps, or a fraction of a cycle if < 1."
        },
    )
    reset_optimizer: bool = field(
        default=True,
        metadata={
            "help": "Clear the optimizer state (momentum, Adam moments and step) at every cycle start."
        },
    )

    parallel_members: bool = field(
        default=False,
        metadata={
            "help": "Under torchrun / accelerate launch with N processes: train the members after model 1 "
            "('starsse') or all members ('local_de') at the same time, each on one process (round-robin), "
            "alone: no DDP, no gradient traffic. A member's batch stays model 1's data-parallel batch "
            "(per_device_train_batch_size x gradient_accumulation_steps x N), reached on one process by "
            "accumulating gradient_accumulation_steps x N micro-batches. Each member's randomness comes from "
            "(seed, k) only, so the members do not depend on N. Not for 'sse' (sequential by nature)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start clean: the previous run's members and checkpoints in output_dir are removed "
            "before training (other files stay)."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "TrainingArguments' filter, off by default here: a NaN/Inf loss stops the run with "
            "NonFiniteError (checked at logging, evaluation, checkpoint and member steps) instead of being "
            "left out of the logged loss, and the filter would make the host wait for the device after "
            "every step."
        },
    )

    def __post_init__(self):
        """``TrainingArguments`` first (TRL's order), then refuse every value of ours that would fail (or
        silently mislead) later, before any model is touched."""
        if self.cycle_epochs is None:
            self.cycle_epochs = self.num_train_epochs
        if self.cycle_learning_rate is None:
            self.cycle_learning_rate = self.learning_rate
        self.cycle_learning_rate = _cycle_learning_rate(self.cycle_learning_rate)
        _refuse_deepspeed(self)  # before TrainingArguments imports deepspeed for it
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {', '.join(METHODS)}.")
        _check_integer("num_members", self.num_members, low=1, why=" (model 1 included)")
        # An LR of 0 would make every member the initial weights while the metadata says otherwise.
        for name in ("learning_rate", "cycle_learning_rate", "num_train_epochs", "cycle_epochs"):
            if not (name == "cycle_learning_rate" and self.cycle_learning_rate == AUTO):
                _check_real(name, getattr(self, name), low=0.0, inclusive=False)
        _check_probe_settings(self)
        for name in ("cycle_warmup_steps", "warmup_steps", "weight_decay"):
            _check_real(name, getattr(self, name), low=0.0, inclusive=True)
        if self.max_grad_norm is not None:
            _check_real("max_grad_norm", self.max_grad_norm, low=0.0, inclusive=True)
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            _check_integer(name, getattr(self, name), low=1)
        _check_integer("seed", self.seed, low=None)
        if self.data_seed is not None:
            _check_integer("data_seed", self.data_seed, low=None)
        _check_integer("max_steps", self.max_steps, low=None)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"max_steps must be -1 (the run's own length) or its total step count, got {self.max_steps}."
            )
        _check_output_dir(self.output_dir)
        if self.parallel_members:
            _check_parallel_members(self)
        if self.basin_guard and self.auto_cycle_learning_rate:
            raise ValueError(
                "basin_guard=True guards a numeric cycle_learning_rate; cycle_learning_rate='auto' already "
                "chooses an LR inside the basin. Use one of them."
            )
        if self.probes_cycle_learning_rate:
            _check_auto(self)
        if (version := fsdp_version(self)) is not None:
            check_fsdp(self, version)

    @property
    def auto_cycle_learning_rate(self) -> bool:
        """Whether the run chooses the cycle LR itself after model 1 (``cycle_learning_rate="auto"``)."""
        return self.cycle_learning_rate == AUTO

    @property
    def probes_cycle_learning_rate(self) -> bool:
        """Whether the basin guard probes after model 1: ``"auto"`` (it chooses) or ``basin_guard`` (it checks
        the set LR and steps down only if that one leaves the basin)."""
        return self.auto_cycle_learning_rate or bool(self.basin_guard)

    @property
    def guard_mode(self) -> str | None:
        """``"auto"``, ``"guard"`` or None: how the probes' result is named in metadata and cards."""
        if self.auto_cycle_learning_rate:
            return "auto"
        return "guard" if self.basin_guard else None


def _cycle_learning_rate(value):
    """``"auto"`` (any case), or the number a string spells (the command line's); the rest checked later."""
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        try:
            return float(value)
        except ValueError:
            raise ValueError(
                f"cycle_learning_rate must be a finite number > 0 or 'auto', got {value!r}."
            ) from None
    return value


def _check_probe_settings(args: StarSSEConfig) -> None:
    """The basin guard's own fields: checked whatever cycle_learning_rate is, so a typo never waits."""
    grid = args.cycle_lr_grid
    if not isinstance(grid, (list, tuple)) or isinstance(grid, str):
        raise ValueError(f"cycle_lr_grid must be a list of multipliers of learning_rate, got {grid!r}.")
    for value in grid:
        _check_real("cycle_lr_grid", value, low=0.0, inclusive=False)
    if len(grid) < 2:
        raise ValueError(
            f"cycle_lr_grid={list(grid)} has {len(grid)} point(s); cycle_learning_rate='auto' chooses among "
            "at least two candidate cycle LRs (for one known LR, set cycle_learning_rate to it)."
        )
    if len(set(map(float, grid))) != len(grid):
        raise ValueError(f"cycle_lr_grid={list(grid)} repeats a multiplier.")
    args.cycle_lr_grid = sorted(float(v) for v in grid)
    _check_real("probe_fraction", args.probe_fraction, low=0.0, inclusive=False)
    if args.probe_fraction > 0.25:
        raise ValueError(
            f"probe_fraction must be in (0, 0.25] (a probe costs at most a quarter of a cycle), got "
            f"{args.probe_fraction!r}."
        )
    _check_real("basin_tolerance", args.basin_tolerance, low=0.0, inclusive=True)
    if args.probe_search not in ("bisect", "linear"):
        raise ValueError(f"probe_search must be 'bisect' or 'linear', got {args.probe_search!r}.")
    _check_real("probe_loss_ratio", args.probe_loss_ratio, low=1.0, inclusive=True)


def _check_auto(args: StarSSEConfig) -> None:
    """What the basin guard (cycle_learning_rate='auto' or basin_guard=True) cannot honour (an eval_dataset is
    checked when training starts)."""
    what = "cycle_learning_rate='auto'" if args.auto_cycle_learning_rate else "basin_guard=True"
    off = "a numeric cycle_learning_rate" if args.auto_cycle_learning_rate else "basin_guard=False"
    if args.method == "local_de":
        raise ValueError(
            f"{what} probes the LR of StarSSE / SSE cycles after model 1; method='local_de' has no cycle LR "
            f"(every member replays model 1's schedule). Use method='starsse' or 'sse', or {off}."
        )
    if args.num_members < 2:
        raise ValueError(
            f"{what} probes the LR of cycles 2..K; num_members=1 has none. Use num_members >= 2 or {off}."
        )
    if args.fp16:
        raise ValueError(f"{what} runs its probe cycles without fp16 loss scaling; use bf16 or fp32.")


def _check_parallel_members(args: StarSSEConfig) -> None:
    """What a member trained alone, on one process, cannot honour."""
    if args.method == "sse":
        raise ValueError(
            "parallel_members=True does not apply to method='sse': each SSE cycle starts from the previous "
            "member, so its cycles are sequential by nature. Use method='starsse' or 'local_de', or "
            "parallel_members=False."
        )
    if not args.reset_optimizer:
        raise ValueError(
            "parallel_members=True starts every member with a fresh optimizer; reset_optimizer=False (one "
            "cycle's optimizer state carried into the next) exists only in a sequential run."
        )
    if args.fp16:
        raise ValueError("parallel_members=True supports bf16 and fp32 training, not fp16 loss scaling.")


def _refuse_deepspeed(args: StarSSEConfig) -> None:
    if args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError(DEEPSPEED_REFUSAL)


DEEPSPEED_REFUSAL = (
    "StarSSETrainer does not run under DeepSpeed: its anchor restore and member snapshots gather and "
    "scatter the full weights, which is built for FSDP2 only (ZeRO-3's gather/scatter is not). For a model "
    "larger than one GPU use FSDP2: accelerate launch --use_fsdp --fsdp_version 2, or fsdp=True."
)


def fsdp_version(args) -> int | None:
    """The FSDP version this run will use (``fsdp=True`` / ``fsdp_config``, else ``accelerate launch
    --use_fsdp``'s environment: accelerate's default version there is 1), or None without FSDP."""
    if args.fsdp and args.fsdp_plugin_args is not None:
        return int(args.fsdp_plugin_args.get("fsdp_version", 2))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def check_fsdp(args, version: int) -> None:
    """What StarSSETrainer cannot honour under FSDP (trainers.sharded): refused before any training."""
    if version != 2:
        raise ValueError(
            f"StarSSETrainer supports FSDP2 only, got FSDP version {version} (FSDP1 is deprecated by "
            "transformers and its gather/scatter is not built here). Use fsdp_config={'version': 2} or "
            "accelerate launch --use_fsdp --fsdp_version 2."
        )
    if args.parallel_members:
        raise ValueError(
            "parallel_members=True trains each member alone on one process with the whole model; under FSDP "
            "the model is sharded over all processes. Use parallel_members=False with FSDP."
        )
    if args.probes_cycle_learning_rate:
        raise ValueError(
            "cycle_learning_rate='auto' is not supported under FSDP, nor basin_guard=True: their probes "
            "interpolate and train whole models on each process alone (not built for sharded weights). Set a "
            "numeric cycle_learning_rate and basin_guard=False."
        )
    if args.method == "local_de":
        raise ValueError(
            "method='local_de' is not supported under FSDP: its new task head is re-drawn with the head "
            "layers' reset_parameters(), which does not work on FSDP2's sharded (DTensor) parameters. Use "
            "method='starsse' or 'sse', or train without FSDP."
        )


def _check_real(name: str, value, *, low: float, inclusive: bool) -> None:
    """A ValueError naming `name` unless `value` is a finite real above `low` (or equal if inclusive)."""
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (is_real and math.isfinite(value) and (value >= low if inclusive else value > low)):
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")


def _check_integer(name: str, value, *, low: int | None, why: str = "") -> None:
    """A ValueError naming `name` unless `value` is an integer (>= `low` when given)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or (low is not None and value < low)
    ):
        bound = f" >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be an integer{bound}{why}, got {value!r}.")


def _check_output_dir(output_dir) -> None:
    """Find an output_dir that cannot be created or written now, not after (pre-)training.

    Looks at the nearest existing ancestor only, so building a config creates nothing.
    """
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise ValueError(f"output_dir must be a path, got {output_dir!r}.")
    path = os.path.abspath(os.path.expanduser(os.fspath(output_dir)))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if not os.path.isdir(existing) else "is not writable"
        raise ValueError(f"output_dir {output_dir!r} cannot be written: {existing!r} {what}.")
