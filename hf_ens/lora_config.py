"""Which peft adapters hf-ens accepts as members: plain LoRA, whose merged weight is ``W0 + scale B A``.

Shared by `hf_ens.adapters` (members, soups, the ensemble) and `hf_ens.merges` (LoRA merges); imports
neither, so the two never import each other's internals.
"""

from __future__ import annotations

from collections.abc import Sequence

from peft import LoraConfig, PeftModel

__all__ = ["check_lora", "check_adapter_names"]

_LINEAR_INITS = (True, False, "gaussian")  # the LoRA inits that leave the base weights untouched


def check_lora(model_or_config: PeftModel | LoraConfig, adapter: str | None = None) -> LoraConfig:
    """The LoRA config of `adapter`, refused (ValueError) unless its merged weight is ``W0 + scale B A``.

    That linearity is what makes member averaging exact and what a Local DE re-draw reproduces: DoRA (a
    per-column norm), LoRA biases and inits that rewrite the base weights (PiSSA, OLoRA, LoftQ, ...) are
    refused, as are other peft methods.
    """
    if isinstance(model_or_config, PeftModel):
        adapter = adapter or model_or_config.active_adapter
        config = model_or_config.peft_config[adapter]
    else:
        config = model_or_config
    problems = []
    if not isinstance(config, LoraConfig):
        problems.append(f"it is a {type(config).__name__}, hf-ens supports LoRA adapters only")
    else:
        if config.use_dora:
            problems.append("use_dora=True (a DoRA member is not W0 + scale B A)")
        if getattr(config, "lora_bias", False):
            problems.append("lora_bias=True")
        if getattr(config, "layer_replication", None):
            problems.append("layer_replication (it rebuilds the base model's layers)")
        if config.init_lora_weights not in _LINEAR_INITS:
            problems.append(
                f"init_lora_weights={config.init_lora_weights!r} rewrites the base weights; use True or "
                "'gaussian'"
            )
    if problems:
        raise ValueError(
            f"Unsupported peft adapter{f' {adapter!r}' if adapter else ''}: {'; '.join(problems)}."
        )
    return config


def check_adapter_names(model: PeftModel, adapters: Sequence[str]) -> list[str]:
    """`adapters` as a list, refused (ValueError) if empty, unknown to `model` or not plain LoRA."""
    adapters = list(adapters)
    if not adapters:
        raise ValueError("A soup needs at least one adapter; got an empty list.")
    unknown = [a for a in adapters if a not in model.peft_config]
    if unknown:
        raise ValueError(f"Unknown adapters {unknown}; the model holds {sorted(model.peft_config)}.")
    for a in adapters:
        check_lora(model, a)
    return adapters
