"""`hf_ens.pipeline`: a transformers pipeline of an ensemble, with the ensemble's own tokenizer or processor.

``transformers.pipeline(task, model=obj)`` guesses a tokenizer or image processor only from a model *name*
(a string); given a model object without ``tokenizer=`` it stops with "Impossible to guess which tokenizer
to use", although an `EnsembleModel` carries its processor (``ens.processor``). `pipeline` passes it, and the
task the members were trained for, so ``hf_ens.pipeline(model=ens)`` is enough. The scores are the
ensemble's: mean member probabilities (softmax or sigmoid by the members' problem type) or the mean value
for regression (see `hf_ens.tasks`).
"""

from __future__ import annotations

import os
from typing import Any

import transformers
from transformers import PreTrainedModel

__all__ = ["pipeline", "pipeline_task"]

_TASKS = {
    "ForSequenceClassification": "text-classification",
    "ForImageClassification": "image-classification",
    "ForTokenClassification": "token-classification",
}


def pipeline_task(model: PreTrainedModel) -> str:
    """The pipeline task of an ensemble (or any model) from its members' architecture."""
    config = model.config
    names = [getattr(config, "architecture", None), *(getattr(config, "architectures", None) or [])]
    member_config = getattr(config, "member_config", None)
    names += list(getattr(member_config, "architectures", None) or [])
    for name in filter(None, names):
        for suffix, task in _TASKS.items():
            if name.endswith(suffix):
                return task
    raise ValueError(f"No pipeline task known for {type(model).__name__} ({names}); pass task=...")


def _components(processor: Any) -> dict:
    """The pipeline keywords a processor fills: a tokenizer, an image processor, or a processor's parts."""
    if processor is None:
        return {}
    if isinstance(processor, transformers.PreTrainedTokenizerBase):
        return {"tokenizer": processor}
    if isinstance(processor, transformers.image_processing_utils.BaseImageProcessor):
        return {"image_processor": processor}
    parts = {
        "tokenizer": getattr(processor, "tokenizer", None),
        "image_processor": getattr(processor, "image_processor", None),
    }
    return {k: v for k, v in parts.items() if v is not None}


def pipeline(task: str | None = None, model: PreTrainedModel | str | os.PathLike | None = None, **kwargs):
    """``transformers.pipeline`` for an ensemble: the task and tokenizer / image processor come from it.

    `model`: an `EnsembleModel` (or any model with a ``processor``), or an ensemble directory / Hub repo id
    (loaded with `EnsembleModel.from_pretrained`, not as the root soup). Keywords you pass (``tokenizer=``,
    ``top_k=``, ``device=``...) win over what the ensemble carries.
    """
    if model is None:
        raise ValueError("hf_ens.pipeline needs model=<an EnsembleModel or an ensemble repo>.")
    if isinstance(model, (str, os.PathLike)):
        from .ensemble import EnsembleModel

        model = EnsembleModel.from_pretrained(model)
    task = task or pipeline_task(model)
    for key, value in _components(getattr(model, "processor", None)).items():
        kwargs.setdefault(key, value)
    return transformers.pipeline(task, model=model, **kwargs)
