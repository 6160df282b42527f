"""LoRA (peft) members: K adapters on ONE frozen base, their exact soup, and the ensemble that serves them.

What a member *is* depends on the model: for a plain transformers model every weight, for a ``peft`` LoRA
model only the adapter tensors (``lora_A``/``lora_B``) and the modules trained in full through
``modules_to_save`` (the task head). :func:`member_weights` / :func:`load_member_weights` are the one answer
the trainer asks for (anchors, checkpoints, resets), so StarSSE, SSE and Local DE need no LoRA branch.

**Exact soups.** Averaging ``A`` and ``B`` separately is not the average of the members' weights
(``mean_k B_k A_k != mean_k B_k  mean_k A_k``). :func:`lora_uniform_soup` adds
``mean_k(scale_k B_k A_k)`` (peft's own ``get_delta_weight``) to every adapted base weight and averages the
``modules_to_save`` copies: exactly the uniform soup of the K merged members, delivered as a plain merged
transformers model. :func:`lora_soup_adapter` gives the same soup as one adapter of rank ``sum_k r_k`` (the
members' ``A`` stacked, their scaled ``B`` side by side): exact as well, not an approximation, for users
who want to keep the base frozen and shared.

**Serving.** :class:`AdapterEnsembleModel` is an `hf_ens.EnsembleModel` whose K members are adapters named
``member_00 ... member_{K-1}`` on one ``PeftModel``: the base is held once, each member's forward activates
its adapter. On disk and on the Hub::

    member_00/ ... member_{K-1}/   peft adapter directories (adapter_config.json, adapter_model.safetensors)
    config.json, model.safetensors the exact uniform soup, merged into a plain model (no peft needed)
    ensemble_config.json           member_format "peft_lora", the base model's name and the SHA-256 of the
                                   base weights the adapters were trained on, digests of every file
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import PreTrainedModel

from . import hub, registry
from .averaging import check_weights, weighted_mean
from .checks import assert_finite, nonfinite_tensors
from .ensemble import EnsembleConfig, EnsembleModel
from .lora_config import check_adapter_names as _check_names
from .lora_config import check_lora
from .members import EnsembleLoadError, member_class, refuse_remote_code

__all__ = [
    "PEFT_FORMAT",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AdapterMember",
    "AdapterEnsembleModel",
    "is_peft_model",
    "check_lora",
    "member_weights",
    "load_member_weights",
    "reinit_adapter",
    "save_adapter",
    "load_adapter",
    "load_adapter_weights",
    "lora_uniform_soup",
    "lora_soup_adapter",
    "merged_model",
    "base_weights_digest",
    "plain_base_model",
]

PEFT_FORMAT = "peft_lora"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# Frozen base weights the members were trained on that the base checkpoint does not hold (e.g. the pooler a
# masked-LM checkpoint lacks, drawn when it was loaded as a classifier): saved with the adapters.
BASE_EXTRA_NAME = "base_extra.safetensors"


# --------------------------------------------------------------------------------------------- the member
def is_peft_model(model: Any) -> bool:
    """Whether `model` is a peft model (its members are adapters, not whole models)."""
    return isinstance(model, PeftModel)


def _adapter_keys(model: nn.Module, adapter: str) -> list[str]:
    """State-dict names of `adapter`'s own tensors: LoRA factors and its ``modules_to_save`` copies."""
    keys = []
    for key in model.state_dict():
        parts = key.split(".")
        if adapter in parts and any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
            keys.append(key)
    return keys


def member_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what makes one member: every tensor of a plain model, the active adapter's of a peft model.

    What the trainer keeps as an anchor (model 1, the original weights) and restores at a cycle start.
    """
    state = model.state_dict()
    if is_peft_model(model):
        names = _adapter_keys(model, model.active_adapter)
        return {name: state[name].detach().clone() for name in names}
    return {name: t.detach().clone() for name, t in state.items()}


@torch.no_grad()
def load_member_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` (from :func:`member_weights`) back into `model`; a missing or unexpected name raises."""
    if not is_peft_model(model):
        model.load_state_dict(weights, strict=True)
        return
    state = model.state_dict()
    expected = set(_adapter_keys(model, model.active_adapter))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"Adapter weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    for name, value in weights.items():
        state[name].copy_(value)


@torch.no_grad()
def reinit_adapter(model: PeftModel, adapter: str | None = None) -> None:
    """Re-draw `adapter` from the current torch RNG: LoRA factors as peft initialises them (B = 0, so the
    member starts at the base) and every ``modules_to_save`` copy (the task head) with ``reset_parameters()``.

    Local DE's fresh start for member k (seed the RNG with the member's seed first).
    """
    adapter = adapter or model.active_adapter
    config = check_lora(model, adapter)
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if config.init_lora_weights is False:
                module.lora_A[adapter].reset_parameters()
                module.lora_B[adapter].reset_parameters()
            else:
                module.reset_lora_parameters(adapter, config.init_lora_weights)
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            layers = [m for m in module.modules_to_save[adapter].modules() if hasattr(m, "reset_parameters")]
            if not layers:
                raise ValueError(f"Cannot re-draw modules_to_save {type(module.original_module).__name__}.")
            for layer in layers:
                layer.reset_parameters()


# ------------------------------------------------------------------------------------------ adapter files
def save_adapter(model: PeftModel, adapter: str, directory: str | os.PathLike) -> None:
    """Write `adapter` as a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``),
    loadable with ``PeftModel.from_pretrained(base, directory)``; no README, no local paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.peft_config[adapter])
    config.base_model_name_or_path = None  # ensemble_config.json names the base; never a local path
    config.inference_mode = True
    config.save_pretrained(str(directory))
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    safetensors.torch.save_file(state, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """The LoRA config saved in `directory` (refused if it asks for repo code or is not plain LoRA)."""
    directory = Path(directory)
    file = directory / ADAPTER_CONFIG_NAME
    if not file.is_file():
        raise EnsembleLoadError(f"Missing adapter file {file}.")
    refuse_remote_code(directory)
    try:
        config = LoraConfig.from_pretrained(str(directory))
    except Exception as e:
        raise EnsembleLoadError(f"Could not read adapter file {file}: {type(e).__name__}: {e}") from e
    try:
        return check_lora(config)
    except ValueError as e:
        raise EnsembleLoadError(f"{file}: {e}") from None


def load_adapter(model: PeftModel, directory: str | os.PathLike, adapter: str) -> PeftModel:
    """Add the adapter saved in `directory` to `model` under the name `adapter`, strictly: every tensor
    present, nothing unexpected, safetensors only. The global RNG is left as it was (adding one draws)."""
    config = read_adapter_config(directory)
    with torch.random.fork_rng(devices=[]), _naming(directory):
        model.add_adapter(adapter, config)
    try:
        load_adapter_weights(model, directory, adapter)
    except EnsembleLoadError:
        model.delete_adapter(adapter)
        raise
    return model


def load_adapter_weights(model: PeftModel, directory: str | os.PathLike, adapter: str | None = None) -> None:
    """Copy the adapter weights saved in `directory` into `model`'s existing adapter (default: the active
    one), strictly: `EnsembleLoadError` naming the file if any tensor is missing or unexpected."""
    adapter = adapter or model.active_adapter
    weights_file = Path(directory) / ADAPTER_WEIGHTS_NAME
    if not weights_file.is_file():
        raise EnsembleLoadError(
            f"Missing adapter file {weights_file} (hf-ens loads safetensors weights only)."
        )
    try:
        state = safetensors.torch.load_file(str(weights_file))
    except Exception as e:
        raise EnsembleLoadError(f"Could not load adapter file {weights_file}: {type(e).__name__}: {e}") from e
    retyped = sorted(k for k, v in state.items() if not v.is_floating_point())
    bad = retyped or nonfinite_tensors(state)
    if bad:  # LoRA factors and heads are floats: integers are rewritten dtypes, NaN/Inf a diverged run
        raise EnsembleLoadError(
            f"Adapter weights in {weights_file} hold {'non-float' if retyped else 'non-finite (NaN/Inf)'} "
            f"tensors, e.g. {bad[0]!r}: damaged or tampered with; refused."
        )
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    missing = sorted(set(result.missing_keys) & set(_adapter_keys(model, adapter)))
    if missing or result.unexpected_keys:
        raise EnsembleLoadError(
            f"Adapter weights in {weights_file} do not match the base model: missing {missing[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}."
        )


# --------------------------------------------------------------------------------------------------- soups
@torch.no_grad()
def lora_uniform_soup(
    model: PeftModel, adapters: Sequence[str], weights: Sequence[float] | None = None
) -> PreTrainedModel:
    """The (weighted) average of the merged members, as ONE plain transformers model (no peft needed).

    Every adapted base weight becomes ``W0 + sum_k w_k scale_k B_k A_k / sum_k w_k`` (peft's
    ``get_delta_weight``, accumulated in float32), every ``modules_to_save`` module the average of the
    members' copies, every other weight stays the base's: exactly the average of the K merged members (what
    ``uniform_soup`` of ``merge_and_unload()`` copies gives, to float rounding) at the memory of one model
    copy. `model` is not modified.
    """
    adapters = _check_names(model, adapters)
    weights = check_weights(weights, len(adapters), "adapter")
    active = model.active_adapter
    soup = copy.deepcopy(model)
    for module in soup.modules():
        if isinstance(module, LoraLayer):
            names = [a for a in adapters if a in module.lora_A or a in module.lora_embedding_A]
            if len(names) not in (0, len(adapters)):
                raise ValueError(f"Adapters {adapters} do not all adapt the same layers.")
            if names:
                base = module.get_base_layer().weight
                delta = weighted_mean((module.get_delta_weight(a) for a in adapters), weights)
                base.copy_((base.to(delta.dtype) + delta.to(base.device)).to(base.dtype))
        elif isinstance(module, ModulesToSaveWrapper):
            names = [a for a in adapters if a in module.modules_to_save]
            if len(names) not in (0, len(adapters)):
                raise ValueError(f"Adapters {adapters} do not all train the same modules_to_save.")
            if names:
                target = module.modules_to_save[adapters[0]].state_dict()
                states = [module.modules_to_save[a].state_dict() for a in adapters]
                for name, value in target.items():
                    if value.is_floating_point():
                        value.copy_(weighted_mean((s[name] for s in states), weights).to(value.dtype))
    soup.set_adapter(adapters[0])  # unload() keeps the active adapter's modules_to_save copy
    plain = soup.unload()
    plain.train(model.training)
    if active != adapters[0]:
        model.set_adapter(active)
    return plain


def merged_model(model: PeftModel, adapter: str | None = None) -> PreTrainedModel:
    """`model` with `adapter` (default: the active one) merged, as a new plain transformers model: every
    adapted base weight ``W0 + scale B A`` (peft's ``get_delta_weight``) and the adapter's ``modules_to_save``
    head. The member's whole weights, for what compares members in weight space (basin profiles, the LR
    probe): interpolating the factors ``A`` and ``B`` themselves is no straight line between the merged
    weights. `model` is not modified."""
    return lora_uniform_soup(model, [adapter or model.active_adapter])


@torch.no_grad()
def lora_soup_adapter(model: PeftModel, adapters: Sequence[str], name: str = "soup") -> PeftModel:
    """Add the uniform soup of `adapters` to `model` as ONE LoRA adapter `name` of rank ``sum_k r_k``, and
    return `model`.

    ``mean_k s_k B_k A_k = [s_1 B_1 / K, ..., s_K B_K / K] @ [A_1; ...; A_K]``: stacking the members' ``A``
    and placing their scaled ``B`` side by side represents the soup's delta exactly (float rounding aside),
    with the base still frozen and shared (the adapter's scale is 1, folded into ``B``); ``modules_to_save``
    copies are averaged. No rank is truncated, so nothing is approximated: it costs K adapters of size.
    """
    adapters = _check_names(model, adapters)
    configs = [model.peft_config[a] for a in adapters]
    ref = configs[0]
    for a, c in zip(adapters[1:], configs[1:], strict=True):
        if c.target_modules != ref.target_modules or c.modules_to_save != ref.modules_to_save:
            raise ValueError(f"Adapter {a!r} adapts other modules than {adapters[0]!r}.")
    ranks: dict[str, int] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapters[0] in module.lora_A:
            if module.lora_embedding_A:
                raise ValueError("lora_soup_adapter supports Linear/Conv LoRA layers, not embeddings.")
            ranks[module_name] = sum(module.r[a] for a in adapters)
    total_rank = max(ranks.values())
    config = copy.deepcopy(ref)
    config.r, config.lora_alpha, config.use_rslora = total_rank, total_rank, False
    config.rank_pattern = {_pattern(k): r for k, r in ranks.items() if r != total_rank}
    config.alpha_pattern = {_pattern(k): r for k, r in ranks.items() if r != total_rank}
    with torch.random.fork_rng(devices=[]):
        model.add_adapter(name, config)
    k = len(adapters)
    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            a_new, b_new = module.lora_A[name].weight, module.lora_B[name].weight
            a_parts = [module.lora_A[a].weight for a in adapters]
            b_parts = [
                module.lora_B[a].weight * (module.scaling[a] / (module.scaling[name] * k)) for a in adapters
            ]
            a_new.copy_(torch.cat([p.to(a_new.dtype) for p in a_parts], dim=0))
            b_new.copy_(torch.cat([p.to(b_new.dtype) for p in b_parts], dim=1))
        elif isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
            target = module.modules_to_save[name].state_dict()
            states = [module.modules_to_save[a].state_dict() for a in adapters]
            for key, value in target.items():
                if value.is_floating_point():
                    value.copy_(weighted_mean((s[key] for s in states), [1.0] * k).to(value.dtype))
    return model


def _pattern(module_name: str) -> str:
    """The module's name as peft's rank_pattern matches it (relative to the transformers model)."""
    return module_name.removeprefix("base_model.model.")


# ----------------------------------------------------------------------------------------------- the base
def _base_items(model: PeftModel):
    """(plain name, tensor) of the frozen base weights: no adapter tensor, no head that adapters replace."""
    for key, value in model.get_base_model().state_dict().items():
        parts = key.split(".")
        if (
            "modules_to_save" in parts
            or "original_module" in parts
            or any(p.startswith("lora_") for p in parts)
        ):
            continue
        yield key.replace(".base_layer.", "."), value


def base_weights_digest(model: PeftModel) -> str:
    """SHA-256 of the frozen base weights the adapters sit on (names, shapes and float32 values): a wrong or
    changed base is refused at load time instead of giving silently different members."""
    digest = hashlib.sha256()
    for name, value in sorted(_base_items(model), key=lambda item: item[0]):
        if value.is_floating_point():
            value = value.float()
        data = value.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


@torch.no_grad()
def plain_base_model(model: PeftModel) -> PreTrainedModel:
    """A plain copy of the base under `model`'s adapters (what the ensemble's members share)."""
    base = copy.deepcopy(model)
    for adapter in list(base.peft_config)[1:]:
        base.delete_adapter(adapter)
    return base.unload()


# ------------------------------------------------------------------------------------------ the ensemble
class AdapterMember:
    """Member k of an :class:`AdapterEnsembleModel`: the shared base with adapter `name` active.

    A callable view with no weights of its own (so the ensemble's members are not K copies of the base); a
    plain model of its own is :meth:`merged`. Weight averaging goes through the ensemble (`soup()`), which
    knows that adapters must be merged before they are averaged.
    """

    def __init__(self, ensemble: AdapterEnsembleModel, name: str):
        self._ensemble, self.name = ensemble, name

    @property
    def device(self) -> torch.device:
        return self._ensemble.device

    @property
    def main_input_name(self) -> str:
        return self._ensemble.main_input_name

    hf_device_map = None

    def __call__(self, **inputs):
        with self._ensemble.active_member(self.name):
            return self._ensemble.peft_model(**inputs)

    def merged(self) -> PreTrainedModel:
        """This member as one plain model: base weights plus its merged adapter (and its head)."""
        return merged_model(self._ensemble.peft_model, self.name)

    def __repr__(self) -> str:
        return f"AdapterMember({self.name!r})"


class AdapterEnsembleModel(EnsembleModel):
    """An `EnsembleModel` whose K members are LoRA adapters on ONE base (``peft_model``).

    Build with :meth:`from_adapters` (a trainer's ``ensemble()`` does) or ``EnsembleModel.from_pretrained``
    of a repo saved by one. ``members`` are :class:`AdapterMember` views; forward runs the base K times,
    once per adapter, and averages the probabilities as for full members; `soup()` is the exact merged
    soup (:func:`lora_uniform_soup`), a plain transformers model; `merged_members()` the K merged models.
    """

    base_model_prefix = "peft_model"

    def __init__(self, config: EnsembleConfig, peft_model: PeftModel, processor: Any | None = None):
        if not isinstance(config, EnsembleConfig) or config.member_format != PEFT_FORMAT:
            raise TypeError("AdapterEnsembleModel takes an EnsembleConfig with member_format='peft_lora'.")
        missing = [m for m in config.members if m not in peft_model.peft_config]
        if missing:
            raise ValueError(f"The peft model holds no adapters {missing}.")
        PreTrainedModel.__init__(self, config)
        self.peft_model = peft_model
        self._layers: list[nn.Module] | None = None  # the adapted layers, found on the first forward
        self.members = tuple(AdapterMember(self, name) for name in config.members)
        self.main_input_name = peft_model.get_base_model().main_input_name
        self.processor = processor
        self.post_init()

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_adapters(
        cls,
        base_model: PreTrainedModel | PeftModel,
        adapters: Sequence[str | os.PathLike],
        processor: Any | None = None,
        metadata: dict | None = None,
        base_model_name_or_path: str | None = None,
    ) -> AdapterEnsembleModel:
        """K adapter directories (peft ``save_pretrained`` outputs) attached by name to ONE copy of the base.

        `base_model`: the plain pre-trained model, or a peft model whose base is it (its adapters are not
        kept); it is copied, not modified. `base_model_name_or_path` (default: the base config's
        ``_name_or_path``) is what ``ensemble_config.json`` names as the base to load the repo with.
        """
        if not adapters:
            raise ValueError("An ensemble needs at least one member; got an empty list.")
        if is_peft_model(base_model):
            name = (
                base_model_name_or_path
                or base_model.peft_config[base_model.active_adapter].base_model_name_or_path
            )
            base = plain_base_model(base_model)
        elif isinstance(base_model, PreTrainedModel):
            name, base = base_model_name_or_path, copy.deepcopy(base_model)
        else:
            raise TypeError(
                f"base_model must be a transformers or peft model, got {type(base_model).__name__}."
            )
        name = name or getattr(base.config, "_name_or_path", None) or None
        names = [f"member_{k:02d}" for k in range(len(adapters))]
        peft_model = _attach(base, adapters, names)
        if processor is None:
            from .members import load_processor

            processor = load_processor(adapters[0])
        config = EnsembleConfig.for_adapters(peft_model, names, metadata, base_model=name)
        return cls._class_for(config.architecture)(config, peft_model, processor=processor).eval()

    @classmethod
    def _class_for(cls, architecture: str | None) -> type[AdapterEnsembleModel]:
        """Adapters on a causal-LM base give an `AdapterEnsembleModelForCausalLM` (it generates)."""
        if cls is not AdapterEnsembleModel:
            return cls
        return registry.task_class(PEFT_FORMAT, architecture) or cls

    @classmethod
    def _from_saved(
        cls,
        path: Path,
        saved: EnsembleConfig,
        config: EnsembleConfig | None,
        base_model: str | os.PathLike | PreTrainedModel | None,
        dtype=None,
        device_map=None,
        attn_implementation=None,
        hub_kwargs: dict | None = None,
    ) -> AdapterEnsembleModel:
        """Load the base named in `saved` (or `base_model`), check its weights' digest, attach adapters."""
        extra_file = path / BASE_EXTRA_NAME
        extra = safetensors.torch.load_file(str(extra_file)) if extra_file.is_file() else {}
        base = _load_base(saved, base_model, device_map, attn_implementation, hub_kwargs or {}, extra)
        names = list(saved.members)
        peft_model = _attach(base, [path / n for n in names], names)
        expected = saved.base_weights_sha256
        if expected is not None and base_weights_digest(peft_model) != expected:
            raise EnsembleLoadError(
                f"The base model {_base_ref(saved, base_model)!r} does not hold the weights these adapters "
                f"were trained on (SHA-256 of its frozen weights differs from {expected} in "
                f"{path.name}/ensemble_config.json). Pass base_model=<the checkpoint they were trained from>."
            )
        if dtype is not None:
            peft_model.to(dtype=_dtype(dtype))
        from .members import load_processor

        model_cls = cls._class_for(saved.architecture)
        model = model_cls(config if config is not None else saved, peft_model, processor=load_processor(path))
        return model.eval()

    # --- inference ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def active_member(self, name: str):
        """Activate adapter `name` (and its head) for the duration of the block, gradients untouched.

        Sets the active adapter of each adapted layer directly (peft's ``set_adapter`` walks every module
        and resets ``requires_grad``: a cost K times per forward); the forward tests against merged members
        fail loudly if peft changes where a layer keeps its active adapter.
        """
        if self._layers is None:
            self._layers = [
                m for m in self.peft_model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))
            ]
        previous = [m._active_adapter for m in self._layers]
        for m in self._layers:
            m._active_adapter = name if isinstance(m, ModulesToSaveWrapper) else [name]
        try:
            yield
        finally:
            for m, value in zip(self._layers, previous, strict=True):
                m._active_adapter = value

    def soup(self, bn_dataloader=None) -> PreTrainedModel:
        """The exact uniform soup (:func:`lora_uniform_soup`): one plain model, the average of the merged
        members."""
        from .soups import _finish

        return _finish(lora_uniform_soup(self.peft_model, list(self.config.members)), bn_dataloader, True)

    def soup_adapter(self, name: str = "default", rank: int | None = None) -> PeftModel:
        """A copy of the shared peft model holding only the soup, as one adapter: exact, of rank ``sum_k r_k``
        (`lora_soup_adapter`), or with `rank` the truncated SVD of the soup's deltas (`hf_ens.merges`).

        Named ``"default"``, so ``soup_adapter().save_pretrained(dir)`` writes the adapter into `dir` itself
        (peft puts any other name into ``dir/<name>/``) and ``PeftModel.from_pretrained(base, dir)`` loads
        it. Its config is clean: ``modules_to_save`` listed once, and ``base_model_name_or_path`` a Hub id
        or nothing (never this machine's directory).
        """
        from .hub import is_hub_id

        if rank is not None:
            from .merges import lora_merge

            model = lora_merge(self.peft_model, list(self.config.members), rank=rank, name=name)
        else:
            model = copy.deepcopy(self.peft_model)
            lora_soup_adapter(model, list(self.config.members), name=name)
            model.set_adapter(name)
            for adapter in list(self.config.members):
                model.delete_adapter(adapter)
        config = model.peft_config[name]
        if config.modules_to_save:
            config.modules_to_save = list(dict.fromkeys(config.modules_to_save))
        base = self.config.base_model
        config.base_model_name_or_path = base if is_hub_id(base) else None
        return model

    def _member_model(self, k: int) -> PreTrainedModel:
        return self.peft_model.get_base_model()  # every adapter runs on the one shared base

    def merged_members(self) -> list[PreTrainedModel]:
        """Each member merged into a plain model (K model copies: for tools that need whole weights)."""
        return [m.merged() for m in self.members]

    # --- persistence ----------------------------------------------------------------------------------
    def _check_finite_members(self) -> None:
        for k, name in enumerate(self.config.members):
            state = {
                n: t
                for n, t in self.peft_model.state_dict().items()
                if n in _adapter_keys(self.peft_model, name)
            }
            assert_finite(state, f"member {k} ({name})")

    def _save_members(self, folder: Path, max_shard_size, save_original_format: bool = True) -> None:
        extra = self._base_extra()
        if extra:
            safetensors.torch.save_file(extra, str(folder / BASE_EXTRA_NAME), metadata={"format": "pt"})
        for name in self.config.members:
            save_adapter(self.peft_model, name, folder / name)
            if self.processor is not None:
                self.processor.save_pretrained(folder / name)

    def _base_extra(self) -> dict[str, torch.Tensor]:
        """The frozen base weights that the base checkpoint (a local directory) does not hold: without them a
        reload from that checkpoint cannot rebuild the members. A Hub base is not read (no download)."""
        names = _checkpoint_names(self.config.base_model)
        if names is None:
            return {}
        base = self.peft_model.get_base_model()
        prefix = base.base_model_prefix
        names = _as_loaded(base, names, {name for name, _ in _base_items(self.peft_model)})
        return {  # a checkpoint of the bare body (e.g. a BertModel) names its weights without the prefix
            name: value.detach().to("cpu").contiguous()
            for name, value in _base_items(self.peft_model)
            if name.split(".")[0] == prefix
            and name not in names
            and name.removeprefix(f"{prefix}.") not in names
        }

    def ensemble_config(self) -> dict:
        content = super().ensemble_config()
        content["base_weights_sha256"] = base_weights_digest(self.peft_model)
        return content


def _activate(model: PeftModel, name: str) -> None:
    """``set_adapter`` without making the adapter trainable (an inference view changes no requires_grad)."""
    model.set_adapter(name, inference_mode=True)


@contextlib.contextmanager
def quiet_peft_wrap():
    """peft reads ``model.is_gradient_checkpointing`` when it wraps a model, an alias that transformers 5
    deprecates with a FutureWarning on every wrap: nothing a user can act on, so that warning is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def _attach(
    base: PreTrainedModel, directories: Sequence[str | os.PathLike], names: Sequence[str]
) -> PeftModel:
    """Wrap `base` (in place) with the first adapter, then add the others by name; the first is active."""
    config = read_adapter_config(directories[0])
    with torch.random.fork_rng(devices=[]), _naming(directories[0]), quiet_peft_wrap():
        peft_model = PeftModel(base, config, adapter_name=names[0])
    load_adapter_weights(peft_model, directories[0], names[0])
    for directory, name in zip(directories[1:], names[1:], strict=True):
        load_adapter(peft_model, directory, name)
    _activate(peft_model, names[0])
    return peft_model.eval()


@contextlib.contextmanager
def _naming(directory: str | os.PathLike):
    """peft's errors for a config it cannot apply (``layer_replication``, target modules the base lacks) name
    no file: re-raise them as `EnsembleLoadError` naming the adapter config."""
    try:
        yield
    except EnsembleLoadError:
        raise
    except Exception as e:
        raise EnsembleLoadError(
            f"The adapter config {Path(directory) / ADAPTER_CONFIG_NAME} cannot be applied to the base "
            f"model: {type(e).__name__}: {e}"
        ) from e


def _base_ref(saved, base_model) -> str:
    if base_model is not None and not isinstance(base_model, (str, os.PathLike)):
        return type(base_model).__name__
    return str(base_model or saved.base_model)


def _checkpoint_names(ref) -> set[str] | None:
    """The weight names a local safetensors checkpoint holds (None: not a local checkpoint)."""
    if not ref or not Path(str(ref)).is_dir():
        return None
    path = Path(str(ref))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    if (path / "model.safetensors").is_file():
        with safetensors.safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    return None


def _as_loaded(model: PreTrainedModel, names: set[str], model_names: set[str]) -> set[str]:
    """`names` (a checkpoint's) plus the names `from_pretrained` loads them as into `model`.

    transformers 5 renames some weights at load time (ViT's ``encoder.layer.0.attention.attention.query`` is
    ``layers.0.attention.q_proj`` in the model) and ``save_pretrained`` writes the original names back, so a
    checkpoint's names are not the model's: compared as they were, every renamed base weight looked missing
    and ``base_extra.safetensors`` held a second copy of the base (a LoRA repo of 2x one model on disk and in
    memory). transformers 4 renames nothing (no conversion mapping): the names are returned as they are."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return set(names)
    try:
        mapping = get_model_conversion_mapping(model)
    except Exception:  # a model the mapping cannot be built for: nothing renamed
        return set(names)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = dict.fromkeys(model_names, True)
    loaded = set(names)
    for name in names:
        loaded.add(rename_source_key(name, renamings, converters, model.base_model_prefix, meta)[0])
    return loaded


@torch.no_grad()
def _load_base(
    saved, base_model, device_map, attn_implementation, hub_kwargs: dict, extra: dict | None = None
) -> PreTrainedModel:
    """The base the adapters sit on: `base_model` if given, else the checkpoint ``ensemble_config.json`` names
    (a Hub id or a local directory), loaded as the members' class with the members' config (labels). `extra`
    (``base_extra.safetensors``): frozen weights the checkpoint lacks, copied in."""
    extra = extra or {}
    if isinstance(base_model, PreTrainedModel):
        base = copy.deepcopy(base_model)
        _copy_extra(base, extra)
        return base
    ref = str(base_model) if base_model is not None else saved.base_model
    if not ref:
        raise EnsembleLoadError("ensemble_config.json names no base model; pass base_model=<path or Hub id>.")
    if ref.startswith("local:") or ref.startswith("offline:"):
        raise EnsembleLoadError(
            f"The adapters were trained on {ref!r}, a checkpoint that is not on the Hub; pass "
            "base_model=<its local path or Hub id> (its weights are checked against the recorded SHA-256)."
        )
    if base_model is None and not hub.is_hub_id(ref):
        raise EnsembleLoadError(
            f"ensemble_config.json names the base model {ref!r}, which is not a Hub repo id (a path of the "
            "loading machine, or invalid): a repository may not make the loader open local files. Pass "
            "base_model=<the checkpoint> explicitly if you trust it."
        )
    if Path(ref).is_dir():
        refuse_remote_code(ref)
        hub_kwargs = {}
    member_config = copy.deepcopy(saved.member_config)
    try:
        base, info = member_class(member_config).from_pretrained(
            ref,
            config=member_config,
            use_safetensors=True,
            output_loading_info=True,
            device_map=device_map,
            attn_implementation=attn_implementation,
            trust_remote_code=False,
            **hub_kwargs,
        )
    except Exception as e:
        raise EnsembleLoadError(f"Could not load the base model {ref!r}: {type(e).__name__}: {e}") from e
    heads = {n for n, _ in base.named_children() if n != base.base_model_prefix}
    missing = [k for k in info.get("missing_keys", []) if k.split(".")[0] not in heads and k not in extra]
    if missing:
        raise EnsembleLoadError(f"The base model {ref!r} lacks weights {sorted(missing)[:8]}.")
    _copy_extra(base, extra)
    return base


def _copy_extra(base: PreTrainedModel, extra: dict[str, torch.Tensor]) -> None:
    state = base.state_dict()
    unknown = sorted(set(extra) - set(state))
    if unknown:
        raise EnsembleLoadError(f"{BASE_EXTRA_NAME} holds weights the base model has not: {unknown[:8]}.")
    for name, value in extra.items():
        state[name].copy_(value)


def _dtype(dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _load_saved(path, saved, config, base_model, num_labels, hub_kwargs, **member_kwargs):
    """The ``peft_lora`` member format's loader (`hf_ens.registry`), for `EnsembleModel.from_pretrained`."""
    if num_labels is not None and num_labels != saved.num_labels:
        raise ValueError(
            "num_labels= for an ensemble of LoRA adapters is not supported: each adapter carries its "
            "trained head; build new adapters (a trainer) for a new label set."
        )
    return AdapterEnsembleModel._from_saved(
        path, saved, config, base_model, hub_kwargs=hub_kwargs, **member_kwargs
    )


registry.register_member_format(registry.MemberFormat(PEFT_FORMAT, _load_saved))
