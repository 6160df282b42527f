"""Configuration of StarSSE / SSE / Local DE runs: ``TrainingArguments`` plus the ensemble fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

METHODS = ("starsse", "sse", "local_de")


@dataclass
class StarSSEConfig(TrainingArguments):
    """``TrainingArguments`` for :class:`~trainers.StarSSETrainer` (TRL's ``XConfig``/``XTrainer`` pattern).

    ``num_train_epochs``, ``learning_rate``, ``lr_scheduler_type`` and ``warmup_steps`` describe model 1, an
    ordinary fine-tune. Cycles 2..K restart at ``cycle_learning_rate`` and anneal by cosine over
    ``cycle_epochs``. ``method`` decides where each later cycle starts: ``"sse"`` from the current weights,
    ``"starsse"`` from model 1 (Sadrtdinov et al., NeurIPS 2023), ``"local_de"`` from the original pre-trained
    weights with a fresh head, a member-specific seed and model 1's full schedule.
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
    cycle_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak LR of cycles 2..K (cosine annealed to ~0 inside each cycle). "
            "Default: learning_rate. Too high leaves the pre-train basin and loses the transfer "
            "benefit; ignored by 'local_de'."
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

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow a new run to replace members and checkpoints already in output_dir."},
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {', '.join(METHODS)}.")
        if (
            isinstance(self.num_members, bool)
            or not isinstance(self.num_members, int)
            or self.num_members < 1
        ):
            raise ValueError(
                f"num_members must be an integer >= 1 (model 1 included), got {self.num_members!r}."
            )
        if self.cycle_epochs is None:
            self.cycle_epochs = float(self.num_train_epochs)
        if not self.cycle_epochs > 0:
            raise ValueError(f"cycle_epochs must be > 0, got {self.cycle_epochs}.")
        if self.cycle_learning_rate is None:
            self.cycle_learning_rate = float(self.learning_rate)
        if not self.cycle_learning_rate > 0:
            raise ValueError(f"cycle_learning_rate must be > 0, got {self.cycle_learning_rate}.")
        if self.cycle_warmup_steps < 0:
            raise ValueError(f"cycle_warmup_steps must be >= 0, got {self.cycle_warmup_steps}.")
        if self.max_steps is not None and self.max_steps > 0 and self.num_train_epochs <= 0:
            raise ValueError(
                "StarSSEConfig sizes model 1 with num_train_epochs (> 0); "
                "max_steps may only repeat the total."
            )
        if not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs (model 1) must be > 0, got {self.num_train_epochs}.")
        super().__post_init__()
