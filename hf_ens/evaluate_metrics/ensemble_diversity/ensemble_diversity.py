"""Diversity of an ensemble's members (disagreement, KL to the ensemble), as an `evaluate` metric.

A thin wrapper over `hf_ens.metrics.disagreement` and `hf_ens.metrics.kl_to_ensemble` (one implementation,
two front doors), so it gives exactly the numbers of `hf_ens.metrics`. Conventions:
  * inputs: ``predictions`` are the member logits of each sample, [N, K, C] (sample first, as `evaluate`
    batches by sample; ``EnsembleModel`` returns [K, N, C]: pass ``member_logits.transpose(0, 1)``), or
    member probabilities with ``probabilities=True``. Diversity needs no labels: ``references`` passed by
    `evaluate.combine` (e.g. together with ``calibration``) are ignored.
  * ``disagreement``: mean over member pairs of the fraction of samples predicted differently (0 for K=1).
  * ``kl_to_ensemble``: mean over members and samples of KL(member || ensemble), with the ensemble the mean
    member probability (a generalised Jensen-Shannon divergence; zero iff all members agree exactly).
"""

import datasets
import evaluate
import numpy as np

from hf_ens.metrics import disagreement, kl_to_ensemble, logits_from_probabilities

_DESCRIPTION = __doc__

_CITATION = """\
@inproceedings{fort2019deep,
  title={Deep Ensembles: A Loss Landscape Perspective},
  author={Fort, Stanislav and Hu, Huiyi and Lakshminarayanan, Balaji},
  year={2019},
  eprint={1912.02757}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: member logits [N, K, C] (or member probabilities with probabilities=True).
    probabilities: the predictions are probabilities (rows sum to 1), not logits. Default False.
Returns:
    disagreement, kl_to_ensemble: floats.
Example:
    >>> import hf_ens
    >>> diversity = hf_ens.load_metric("ensemble_diversity")
    >>> diversity.compute(predictions=[[[2.0, 0.0], [0.0, 2.0]]])["disagreement"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EnsembleDiversity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float64")))}
            ),
            reference_urls=["https://arxiv.org/abs/1912.02757"],
        )

    def _compute(self, predictions, probabilities: bool = False) -> dict:
        if len(predictions) == 0:
            raise ValueError("The ensemble_diversity metric needs at least one sample; got no predictions.")
        scores = np.stack([np.asarray(p, dtype=np.float64) for p in predictions])
        if probabilities:
            scores = logits_from_probabilities(scores).numpy()
        member_logits = scores.swapaxes(0, 1)  # [K, N, C], hf_ens.metrics' layout
        return {"disagreement": disagreement(member_logits), "kl_to_ensemble": kl_to_ensemble(member_logits)}
