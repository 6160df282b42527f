"""`EnsembleModelForCausalLM`: K causal LMs of one architecture as one model that scores and generates text.

The ensemble's ``logits`` are ``log(mean_k softmax(z_k))`` per token, so ``loss`` with ``labels`` is the token
NLL of the averaged next-token distribution (shifted, ``-100`` ignored: transformers' own causal-LM loss), and
``Trainer.evaluate`` reports the ensemble's loss (``exp`` of it is its perplexity) with no special case.

``generate()`` is transformers' `GenerationMixin` (greedy, sampling, beam search, ``max_new_tokens``, eos
and padding, left-padded batches, logits processors) over the averaged distribution. Each member keeps its own
KV cache: `EnsembleCache` holds the K member caches and answers the `Cache` calls generation makes (sequence
length, beam reordering, cropping), so each step feeds each member only the new token, never the prefix again.

Saved and loaded like `hf_ens.EnsembleModel` (the same repo layout, digests and Hub round trip): the root
holds the uniform soup as a plain ``AutoModelForCausalLM`` checkpoint (tied embeddings stay tied), and the
tokenizer travels in the repo (``ens.processor``). ``EnsembleModel.from_members`` / ``from_pretrained`` on
causal-LM members return this class.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, GenerationMixin
from transformers.cache_utils import Cache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.utils import ModelOutput

from . import registry
from .ensemble import EnsembleConfig, EnsembleModel, _on_device
from .members import CAUSAL_LM_SUFFIXES
from .tasks import log_mean_softmax

__all__ = ["EnsembleModelForCausalLM", "EnsembleCache", "EnsembleCausalLMOutput"]

# transformers 5.x renamed the cache keyword `past_key_values` -> `cache` (the old name is deprecated): use
# the name the installed GenerationMixin passes, and accept both in `forward`.
_CACHE_KEY = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)


class EnsembleCache(Cache):
    """The KV caches of the K members of an ensemble, one `Cache` per member, as one `Cache` for generation.

    Generation asks a cache for its length, to reorder it (beam search), crop it or repeat it; each call is
    passed to every member cache. The members read and write their own cache (``caches[k]``) in their forward.

    With ``members_in_batch=K`` it holds ONE cache whose batch is the K members' rows stacked member-major
    (``[member 0's B rows, member 1's B rows, ...]``): the cache of K LoRA members run in one forward over
    their shared base. Beam reordering then applies the same permutation inside every member's block.
    """

    def __init__(self, caches: list[Cache], members_in_batch: int = 1):
        super().__init__(layers=[])  # no layers of its own: every call goes to the member caches
        if not caches or not all(isinstance(c, Cache) for c in caches):
            raise TypeError(f"EnsembleCache holds one transformers Cache per member; got {caches!r}.")
        if members_in_batch > 1 and len(caches) != 1:
            raise ValueError("An EnsembleCache of members batched together holds exactly one cache.")
        self.caches = list(caches)
        self.members_in_batch = members_in_batch

    def __repr__(self) -> str:
        layout = (
            f"{self.num_members} members in one batch"
            if self.members_in_batch > 1
            else (f"{self.num_members} members")
        )
        return f"EnsembleCache({layout}: {type(self.caches[0]).__name__})"

    def __len__(self) -> int:
        return len(self.caches[0])

    @property
    def num_members(self) -> int:
        return self.members_in_batch if self.members_in_batch > 1 else len(self.caches)

    def _member_major(self, indices: torch.Tensor, rows: int) -> torch.Tensor:
        """Row `indices` of one member's block of `rows` rows, repeated for every member's block."""
        return torch.cat([indices + k * rows for k in range(self.members_in_batch)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.caches[0].get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.caches[0].get_max_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.caches[0].get_mask_sizes(query_length, layer_idx)

    def _each(self, method: str, *args) -> None:
        for cache in self.caches:
            getattr(cache, method)(*args)

    def reset(self) -> None:
        self._each("reset")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.members_in_batch > 1:  # beam_idx permutes the rows of one member's block
            beam_idx = self._member_major(beam_idx, beam_idx.numel())
        self._each("reorder_cache", beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        self._each("crop", tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.members_in_batch > 1:
            raise NotImplementedError("Selecting rows of members batched together is not supported.")
        self._each("batch_select_indices", indices)

    def activate_past_recording(self) -> None:
        self._each("activate_past_recording")

    def early_initialization(self, *args, **kwargs) -> None:
        for cache in self.caches:
            cache.early_initialization(*args, **kwargs)

    @property
    def batch_size(self) -> int:
        """Rows per member (-1 before the first forward)."""
        size = self.caches[0].batch_size
        return size // self.members_in_batch if size > 0 else size

    @property
    def is_compileable(self) -> bool:
        return False  # the member loop is Python; generation must not try to compile the ensemble's call

    @property
    def is_initialized(self) -> bool:
        return all(c.is_initialized for c in self.caches)

    @property
    def is_croppable(self) -> bool:
        return all(c.is_croppable for c in self.caches)

    @property
    def is_sliding(self) -> list[bool]:
        return self.caches[0].is_sliding

    @property
    def is_linear(self) -> list[bool]:
        return self.caches[0].is_linear

    @property
    def is_dummy(self) -> list[bool]:
        return self.caches[0].is_dummy


@dataclass
class EnsembleCausalLMOutput(ModelOutput):
    """Output of `EnsembleModelForCausalLM`.

    Args:
        loss: token NLL of the averaged next-token distribution (when ``labels`` are passed).
        logits: ``log(mean_k softmax(member_logits[k]))``, [B, T, V] (float32): log-probabilities.
        member_logits: raw logits of each member, [K, B, T, V].
        cache: the members' KV caches (`EnsembleCache`) when ``use_cache``.
        hidden_states: with ``output_hidden_states=True``, a tuple over the K members of each member's
            ``hidden_states`` (there is no ensemble hidden state: each member has its own basis).
        attentions: with ``output_attentions=True``, a tuple over the K members of each member's
            ``attentions``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    member_logits: torch.Tensor | None = None
    cache: EnsembleCache | None = None
    hidden_states: tuple[tuple[torch.Tensor, ...], ...] | None = None
    attentions: tuple[tuple[torch.Tensor, ...], ...] | None = None


class EnsembleModelForCausalLM(EnsembleModel, GenerationMixin):
    """Average of the next-token probabilities of K causal LMs of one architecture (e.g. StarSSE snapshots).

    Build with `EnsembleModel.from_members([...])` (or this class's) or ``from_pretrained(repo_or_dir)``.
    ``generate()`` decodes from the averaged distribution with one KV cache per member; the generation
    defaults (eos, pad, bos, sampling settings) are member 0's ``generation_config``. For a pipeline pass the
    tokenizer: ``pipeline("text-generation", model=ens, tokenizer=ens.processor)``. Cost: K member forwards
    per step; `soup()` is one model at 1x cost.
    """

    _member_suffixes = CAUSAL_LM_SUFFIXES

    def __init__(self, config: EnsembleConfig, members=None, processor=None):
        super().__init__(config, members=members, processor=processor)
        self._setup_generation()

    def _setup_generation(self) -> None:
        """Decoding defaults and member keywords, read from member 0's transformers model."""
        model = self._member_model(0)
        # The members' decoding defaults (eos/pad/bos, max_length...), not ones derived from EnsembleConfig.
        self.generation_config = copy.deepcopy(model.generation_config)
        parameters = inspect.signature(model.forward).parameters
        self._member_cache_key = "cache" if "cache" in parameters else "past_key_values"
        self._member_logits_to_keep = "logits_to_keep" in parameters

    def get_input_embeddings(self) -> torch.nn.Module:
        return self._member_model(0).get_input_embeddings()  # what generation asks of a model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: EnsembleCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EnsembleCausalLMOutput | tuple:
        """Run every member (each with its own KV cache) and average their next-token probabilities.

        A KV cache is built and returned only with ``use_cache=True`` or a ``cache`` (generation passes
        them). ``labels`` are the input ids themselves (shifted inside, ``-100`` ignored), as for any
        transformers causal LM; ``num_items_in_batch`` (the Trainer's) makes the loss a sum over that many
        tokens. Other keyword arguments (``token_type_ids``, ``inputs_embeds``...) go to every member.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        legacy_cache = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy_cache
        if cache is not None and not isinstance(cache, EnsembleCache):
            raise TypeError(
                f"EnsembleModelForCausalLM takes an EnsembleCache (one cache per member); got "
                f"{type(cache).__name__}. Let generate() build it, or pass the one a previous call returned."
            )
        if cache is not None and cache.num_members != self.num_members:
            raise ValueError(
                f"The EnsembleCache holds {cache.num_members} caches for {self.num_members} members."
            )
        if kwargs.get("inputs_embeds") is not None:
            self._check_shared_input_embeddings()
        flags = self._member_output_flags(kwargs)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        inputs = {k: v for k, v in {**inputs, **flags}.items() if v is not None}
        # No cache unless asked (generate() asks): a Trainer's evaluation loop has no use for one.
        inputs["use_cache"] = bool(use_cache) or cache is not None
        if self._member_logits_to_keep:
            inputs["logits_to_keep"] = logits_to_keep
        member_logits, new_cache, outputs = self._run_members(inputs, cache)
        logits = log_mean_softmax(member_logits.float())
        loss = None
        if labels is not None or shift_labels is not None:
            loss = ForCausalLMLoss(
                logits,
                labels.to(logits.device) if labels is not None else None,
                vocab_size=logits.shape[-1],
                num_items_in_batch=num_items_in_batch,
                shift_labels=shift_labels,
            )
        per_member = {  # K sets, one per member (each in its own basis): a tuple over members
            name: tuple(o[name] for o in outputs) if flags[f"output_{name}"] else None
            for name in ("hidden_states", "attentions")
        }
        if return_dict is False:
            return tuple(
                x for x in (loss, logits, member_logits, new_cache, *per_member.values()) if x is not None
            )
        return EnsembleCausalLMOutput(
            loss=loss, logits=logits, member_logits=member_logits, cache=new_cache, **per_member
        )

    def _run_members(
        self, inputs: dict, cache: EnsembleCache | None
    ) -> tuple[torch.Tensor, EnsembleCache | None, list[dict]]:
        """Member logits [K, B, T, V] (on member 0's device), the members' caches and each member's
        ``hidden_states`` / ``attentions`` (when asked for): one forward each."""
        if cache is not None and cache.members_in_batch > 1:
            raise ValueError(
                "This EnsembleCache holds members batched together; these members run one by one."
            )
        member_logits, member_caches, outputs = [], [], []
        device = self.members[0].device
        for k, member in enumerate(self.members):
            member_inputs = (
                inputs if getattr(member, "hf_device_map", None) else _on_device(inputs, member.device)
            )
            if cache is not None:
                member_inputs = {**member_inputs, self._member_cache_key: cache.caches[k]}
            out = member(**member_inputs, return_dict=True)
            member_logits.append(out.logits.to(device))
            member_caches.append(out.get("cache"))
            outputs.append({name: out.get(name) for name in ("hidden_states", "attentions")})
        new_cache = None
        if all(isinstance(c, Cache) for c in member_caches):
            new_cache = cache if cache is not None else EnsembleCache(member_caches)
            new_cache.caches = member_caches
        return torch.stack(member_logits), new_cache, outputs

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """One cache per member, each built by the member's own rule (dynamic, static, offloaded...), held in
        an `EnsembleCache` under the key generation passes to `forward`."""
        user_cache = model_kwargs.get(_CACHE_KEY)
        if user_cache is not None:
            if not isinstance(user_cache, EnsembleCache):
                raise TypeError(
                    f"generate() got a {type(user_cache).__name__} cache; an ensemble needs an EnsembleCache "
                    "(one cache per member), e.g. the one a previous call returned."
                )
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        if generation_config.use_cache is False:
            return
        caches = []
        for k in range(self.num_members):
            member_kwargs = {key: v for key, v in model_kwargs.items() if key != _CACHE_KEY}
            self._member_model(k)._prepare_cache_for_generation(
                generation_config, member_kwargs, generation_mode, batch_size, max_cache_length
            )
            cache = member_kwargs.get(_CACHE_KEY)
            # Members that share one model (adapters on one base) must never share a cache object, e.g.
            # where a transformers version keeps and reuses a model's static cache: a repeat is copied.
            caches.append(copy.deepcopy(cache) if any(cache is c for c in caches) else cache)
        if all(isinstance(c, Cache) for c in caches):
            model_kwargs[_CACHE_KEY] = EnsembleCache(caches)

    def _supports_logits_to_keep(self) -> bool:
        return self._member_logits_to_keep


# `import hf_ens` makes the ensemble a causal LM transformers' Auto classes and pipelines know.
AutoModelForCausalLM.register(EnsembleConfig, EnsembleModelForCausalLM, exist_ok=True)
registry.register_task_class("full", CAUSAL_LM_SUFFIXES, EnsembleModelForCausalLM)
