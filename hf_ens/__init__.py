"""hf-ens: ensembles and soups of fine-tuned Hugging Face models.

The library layer: it never imports `trainers`.
"""

from . import registry
from .basin import barrier, distances_to, interpolate, interpolation_profile, plot_profile, weight_distance
from .checks import NonFiniteError, assert_finite, nonfinite_tensors
from .ensemble import (
    EnsembleConfig,
    EnsembleForImageClassification,
    EnsembleForSequenceClassification,
    EnsembleLoadError,
    EnsembleModel,
    EnsembleOutput,
    HubPushError,
)
from .ensemble_lm import EnsembleModelForCausalLM
from .ensemble_token import EnsembleForTokenClassification
from .evaluate_metrics import EVALUATE_METRICS, load_metric
from .evaluation import (
    evaluate_ensemble,
    evaluate_loss_error,
    loss_error,
    make_accuracy_eval_fn,
    make_loss_error_fn,
    predict,
)
from .lm_metrics import (
    compute_lm_metrics,
    compute_token_metrics,
    evaluate_lm_ensemble,
    lm_ensemble_metrics,
    lm_metrics,
    make_lm_eval_fn,
    token_uncertainty,
)
from .merges import MERGE_METHODS, lora_merge, merge_models, task_arithmetic
from .metrics import fit_temperature, temperature_scaled
from .pipelines import pipeline
from .soups import greedy_soup, recompute_batchnorm, uniform_soup, weighted_average

__version__ = "0.1.0"

# LoRA members (`hf_ens.adapters`) import peft: loaded on first use, so full-model users never pay for it.
# Loading a saved adapter ensemble imports the modules that register its member format and task classes.
registry.declare_provider("peft_lora", "hf_ens.adapters", "hf_ens.adapters_lm", "hf_ens.adapters_token")
_ADAPTER_NAMES = ("AdapterEnsembleModel", "lora_uniform_soup", "lora_soup_adapter")


def __getattr__(name: str):
    if name in _ADAPTER_NAMES:
        from . import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module 'hf_ens' has no attribute {name!r}")


__all__ = [
    "EnsembleConfig",
    "EnsembleModel",
    "EnsembleForImageClassification",
    "EnsembleForSequenceClassification",
    "EnsembleOutput",
    "EnsembleModelForCausalLM",
    "EnsembleForTokenClassification",
    "EnsembleLoadError",
    "HubPushError",
    "NonFiniteError",
    "assert_finite",
    "nonfinite_tensors",
    "uniform_soup",
    "greedy_soup",
    "weighted_average",
    "MERGE_METHODS",
    "merge_models",
    "task_arithmetic",
    "lora_merge",
    "recompute_batchnorm",
    "make_accuracy_eval_fn",
    "predict",
    "evaluate_ensemble",
    "loss_error",
    "evaluate_loss_error",
    "make_loss_error_fn",
    "interpolate",
    "interpolation_profile",
    "barrier",
    "weight_distance",
    "distances_to",
    "plot_profile",
    "EVALUATE_METRICS",
    "load_metric",
    "fit_temperature",
    "temperature_scaled",
    "pipeline",
    "lm_metrics",
    "lm_ensemble_metrics",
    "evaluate_lm_ensemble",
    "token_uncertainty",
    "make_lm_eval_fn",
    "compute_lm_metrics",
    "compute_token_metrics",
    *_ADAPTER_NAMES,
]
