"""hf-ens: ensembles and soups of fine-tuned Hugging Face models.

The library layer: it never imports `trainers`.
"""

from .basin import barrier, distances_to, interpolate, interpolation_profile, plot_profile, weight_distance
from .checks import NonFiniteError, assert_finite, nonfinite_tensors
from .ensemble import EnsembleConfig, EnsembleLoadError, EnsembleModel, EnsembleOutput, HubPushError
from .evaluate_metrics import EVALUATE_METRICS, load_metric
from .metrics import fit_temperature, temperature_scaled
from .soups import greedy_soup, make_accuracy_eval_fn, recompute_batchnorm, uniform_soup, weighted_average

__version__ = "0.1.0"

__all__ = [
    "EnsembleConfig",
    "EnsembleModel",
    "EnsembleOutput",
    "EnsembleLoadError",
    "HubPushError",
    "NonFiniteError",
    "assert_finite",
    "nonfinite_tensors",
    "uniform_soup",
    "greedy_soup",
    "weighted_average",
    "recompute_batchnorm",
    "make_accuracy_eval_fn",
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
]
