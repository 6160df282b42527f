"""Accuracy, NLL, ECE and Brier score of a classifier or an ensemble, as an `evaluate` metric.

A thin wrapper over `hf_ens.metrics.classification_metrics` (one implementation, two front doors), so it
gives exactly the numbers of `hf_ens.metrics`. Conventions:
  * inputs: ``predictions`` are logits [N, C] (or probabilities with ``probabilities=True``), or the member
    logits of an ensemble [N, K, C] (sample first, as `evaluate` batches by sample), which are scored as the
    ensemble ``log(mean_k softmax(z_k))``; ``references`` are integer labels [N].
  * ``nll``: mean negative log-likelihood of the true class (natural log).
  * ``ece``: 15 equal-width bins on [0, 1] over the confidence = maximum probability;
    ``ece = sum_b (n_b / N) * |accuracy_b - mean confidence_b|``; bin b holds ``(lo_b, hi_b]``.
  * ``brier``: sum over classes of ``(p_c - onehot_c)^2``, averaged over samples (range [0, 2]; not divided
    by the number of classes).
"""

import datasets
import evaluate
import numpy as np

from hf_ens.metrics import classification_metrics, ensemble_log_probs, logits_from_probabilities

_DESCRIPTION = __doc__

_CITATION = """\
@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle={ICML},
  year={2017}
}
@article{brier1950verification,
  title={Verification of forecasts expressed in terms of probability},
  author={Brier, Glenn W.},
  journal={Monthly Weather Review},
  year={1950}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: logits [N, C], probabilities [N, C] (with probabilities=True), or ensemble member logits
        [N, K, C] (scored as the ensemble's mean probability).
    references: integer class labels [N].
    probabilities: the predictions are probabilities (rows sum to 1), not logits. Default False.
Returns:
    accuracy, nll, ece (15 equal-width bins over the max probability), brier (sum over classes, mean over
    samples): floats.
Example:
    >>> import hf_ens
    >>> calibration = hf_ens.load_metric("calibration")
    >>> calibration.compute(predictions=[[2.0, 0.0], [0.0, 1.0]], references=[0, 0])["accuracy"]
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Calibration(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float64")),
                        "references": datasets.Value("int64"),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                        "references": datasets.Value("int64"),
                    }
                ),
            ],
            reference_urls=["https://arxiv.org/abs/1706.04599"],
        )

    def _compute(self, predictions, references, probabilities: bool = False) -> dict:
        scores = _stack(predictions, probabilities)
        if scores.ndim == 3:  # [N, K, C] member logits -> the ensemble's log mean probability
            scores = ensemble_log_probs(scores.swapaxes(0, 1))
        return classification_metrics(scores, np.asarray(references))


def _stack(predictions, probabilities: bool) -> np.ndarray:
    """The stored predictions as one float64 array (logits), whatever nesting `evaluate` returns them in."""
    if len(predictions) == 0:
        raise ValueError("The calibration metric needs at least one sample; got no predictions.")
    scores = np.stack([np.asarray(p, dtype=np.float64) for p in predictions])
    return logits_from_probabilities(scores).numpy() if probabilities else scores
