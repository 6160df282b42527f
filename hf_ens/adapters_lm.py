"""`AdapterEnsembleModelForCausalLM`: K LoRA causal-LM members on ONE base that score and generate.

The members of `hf_ens.adapters.AdapterEnsembleModel` (adapters on one shared base) with the causal-LM
behaviour of `hf_ens.ensemble_lm.EnsembleModelForCausalLM`: token NLL of the averaged distribution,
``generate()`` with a KV cache per member, the exact merged soup at the repo root. Built by
``AdapterEnsembleModel.from_adapters`` / ``EnsembleModel.from_pretrained`` when the base is a causal LM.

Two ways to run the K members: ONE base forward over the K members' rows stacked, each row routed to its
adapter by peft's mixed-adapter batches (``adapter_names=``; ``batch_members=True``, the default in eval
mode): the base weights are read once per step for all K members, which is what memory-bound decoding on a
GPU pays for; or one base forward per member, its adapter active (``batch_members=False``, and always in
train mode, where peft refuses mixed batches). Both give the same numbers (within float rounding).
``benchmarks/lm_ensemble_generate.py`` measures them.
"""

from __future__ import annotations

import torch

from . import registry
from .adapters import PEFT_FORMAT, AdapterEnsembleModel
from .ensemble_lm import _CACHE_KEY, EnsembleCache, EnsembleModelForCausalLM
from .members import CAUSAL_LM_SUFFIXES

__all__ = ["AdapterEnsembleModelForCausalLM"]

# Per-row model inputs: repeated once per member when the members run in one batch.
_ROW_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds")


class AdapterEnsembleModelForCausalLM(AdapterEnsembleModel, EnsembleModelForCausalLM):
    """An `EnsembleModelForCausalLM` whose K members are LoRA adapters on one shared base.

    ``batch_members`` (default True): in eval mode, run the K members in one forward over the shared base
    (peft's ``adapter_names=`` mixed batches) instead of one forward per member. Set it before
    ``generate()``: a cache built one way cannot be continued the other way.
    """

    def __init__(self, config, peft_model, processor=None, batch_members: bool = True):
        AdapterEnsembleModel.__init__(self, config, peft_model, processor=processor)
        self._setup_generation()
        self.batch_members = batch_members

    def _batched(self) -> bool:
        return self.batch_members and not self.training

    def _run_members(self, inputs: dict, cache: EnsembleCache | None):
        if not self._batched():
            return super()._run_members(inputs, cache)
        k = self.num_members
        if cache is not None and cache.members_in_batch != k:
            raise ValueError("This EnsembleCache was built with members run one by one; batch_members=True.")
        rows = next(inputs[name].shape[0] for name in ("input_ids", "inputs_embeds") if name in inputs)
        stacked = {
            name: value.repeat(k, *([1] * (value.ndim - 1))) if name in _ROW_INPUTS else value
            for name, value in inputs.items()
        }
        stacked = {n: v.to(self.device) if isinstance(v, torch.Tensor) else v for n, v in stacked.items()}
        if cache is not None:
            stacked[self._member_cache_key] = cache.caches[0]
        names = [name for name in self.config.members for _ in range(rows)]
        out = self.peft_model(**stacked, adapter_names=names, return_dict=True)
        logits = out.logits.view(k, rows, *out.logits.shape[1:])
        outputs = [  # member i's rows of each hidden state / attention map
            {
                name: None
                if out.get(name) is None
                else tuple(t[i * rows : (i + 1) * rows] for t in out[name])
                for name in ("hidden_states", "attentions")
            }
            for i in range(k)
        ]
        new_cache = out.get("cache")
        if new_cache is None:
            return logits, None, outputs
        if cache is not None:
            cache.caches = [new_cache]
            return logits, cache, outputs
        return logits, EnsembleCache([new_cache], members_in_batch=k), outputs

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        if not self._batched() or model_kwargs.get(_CACHE_KEY) is not None:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        if generation_config.use_cache is False:
            return
        k, member_kwargs = self.num_members, {key: v for key, v in model_kwargs.items() if key != _CACHE_KEY}
        self._member_model(0)._prepare_cache_for_generation(
            generation_config, member_kwargs, generation_mode, batch_size * k, max_cache_length
        )
        if member_kwargs.get(_CACHE_KEY) is not None:
            model_kwargs[_CACHE_KEY] = EnsembleCache([member_kwargs[_CACHE_KEY]], members_in_batch=k)


registry.register_task_class(PEFT_FORMAT, CAUSAL_LM_SUFFIXES, AdapterEnsembleModelForCausalLM)
