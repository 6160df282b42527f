"""Trainer subclasses and their configs (imports hf_ens, never the reverse)."""

from .schedule import CyclePlan, plan_cycles, starsse_lr_lambda
from .starsse_config import StarSSEConfig
from .starsse_trainer import StarSSETrainer

__all__ = ["CyclePlan", "StarSSEConfig", "StarSSETrainer", "plan_cycles", "starsse_lr_lambda"]
