"""`EnsembleConfig` + `EnsembleModel`: K fine-tuned classifiers of one architecture as one transformers model.

The ensemble's ``logits`` follow the members' problem type (`hf_ens.tasks`): ``log(mean_k softmax(z_k))`` for
single-label members (their softmax is the mean member probability), the logit of the mean sigmoid for
multi-label members, the mean value for regression members (their spread beside it); so arg-max, the loss,
`Trainer.evaluate` and pipelines give ensemble results with no special case.
`EnsembleConfig` (model type ``hf_ens_ensemble``) is registered with `AutoConfig` and `EnsembleModel` with
`AutoModelForImageClassification` / `AutoModelForSequenceClassification` when `hf_ens` is imported, so
pipelines accept an ensemble without a "not supported" message.

On disk and on the Hub an ensemble is an ordinary model repo::

    member_00/ ... member_{K-1}/   plain ``save_pretrained`` outputs (+ processor): load one with transformers
    config.json, model.safetensors the uniform soup: ``AutoModelFor...from_pretrained(repo)`` gives the soup
    preprocessor/tokenizer files   the members' processor
    ensemble_config.json           the `EnsembleConfig` (members, shared member config, method metadata) and
                                   the SHA-256 of every file
    README.md                      model card

The root ``config.json`` stays the soup's, so that plain transformers loads the soup from the repo; the
ensemble's config lives in ``ensemble_config.json`` (``EnsembleConfig.from_pretrained(repo)`` reads it). A
repo id alone therefore means the soup to transformers (also ``pipeline(task, model=repo)``); the ensemble is
``EnsembleModel.from_pretrained(repo)``, or an Auto class given
``config=EnsembleConfig.from_pretrained(repo)``, and a pipeline takes that model object.

Loading is strict (every member weight present, nothing unexpected), safetensors only, no remote code.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.integrations.accelerate import check_and_set_device_map
from transformers.utils import CONFIG_NAME, ModelOutput

from . import hub, registry, tasks
from ._io import atomic_directory
from .cards import render_model_card
from .checks import assert_finite
from .evaluation import predict
from .hub import ENSEMBLE_CONFIG_NAME, HubPushError
from .members import (
    CAUSAL_LM_SUFFIXES,
    CLASSIFICATION_SUFFIXES,
    LOADER_READS,
    EnsembleLoadError,
    check_like,
    check_repo_tree,
    load_member,
    load_processor,
    member_class,
    refuse_remote_code,
    repo_path,
    weight_dtypes,
)
from .soups import uniform_soup

__all__ = [
    "EnsembleConfig",
    "EnsembleModel",
    "EnsembleForImageClassification",
    "EnsembleForSequenceClassification",
    "EnsembleOutput",
    "EnsembleLoadError",
    "HubPushError",
    "ENSEMBLE_CONFIG_NAME",
]

FORMAT_VERSION = 2  # 2: ensemble_config.json is an EnsembleConfig (1: a plain dict without the member config)
# Keywords the Auto classes and pipelines pass to `from_pretrained` that mean nothing for an ensemble.
_IGNORED_LOAD_KWARGS = ("_from_auto", "_from_pipeline", "adapter_kwargs", "code_revision")
_PUSH_KWARGS = ("commit_message", "commit_description", "private", "create_pr", "revision")


class EnsembleConfig(PreTrainedConfig):
    r"""Configuration of an `EnsembleModel`: which members, of what shared config, trained how.

    Args:
        members: sub-paths of the members in the repo (``["member_00", "member_01", ...]``).
        member_config: the members' shared config (a `PreTrainedConfig` or its dict); ``id2label``,
            ``label2id`` and ``problem_type`` are taken from it, so pipelines label ensemble predictions.
        architecture: the members' class name (e.g. ``"ViTForImageClassification"``).
        metadata: how the members were trained (method, cycle hyper-parameters, base model, seed...).
        root_weights: what the repo root holds (``"uniform_soup"``).
        member_format: ``"full"`` (each member a whole ``save_pretrained`` model) or ``"peft_lora"`` (each
            member a LoRA adapter directory on one shared base, see `hf_ens.adapters`).
        base_model: for adapter members, the checkpoint they sit on (a Hub id, or ``local:<name>``).
        base_weights_sha256: for adapter members, the SHA-256 of the base weights they were trained on.
        files: SHA-256 of every file of a saved repo (filled by `EnsembleModel.save_pretrained`).

    Saved as ``ensemble_config.json`` (not ``config.json``, which is the root soup's):
    ``EnsembleConfig.from_pretrained(repo_or_dir)`` reads that file, locally or from the Hub.
    """

    model_type = "hf_ens_ensemble"
    sub_configs_defaults = {
        "member_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True)
    }
    # The Trainer concatenates outputs along dim 0; member_logits is [K, B, C], so keep it out of there (and
    # the regression spread, so that the Trainer's predictions stay the logits, as for any model).
    keys_to_ignore_at_inference = ["member_logits", "spread"]

    members: list[str] | None = None
    member_config: dict | PreTrainedConfig | None = None
    architecture: str | None = None
    metadata: dict | None = None
    root_weights: str = "uniform_soup"
    member_format: str = "full"
    base_model: str | None = None
    base_weights_sha256: str | None = None
    hf_ens_format_version: int = FORMAT_VERSION
    files: dict | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop("num_members", None)  # format 1 stored it; it is len(members)
        if isinstance(self.member_config, dict) and "model_type" not in self.member_config:
            raise ValueError(  # transformers would silently build the sub-config's default type (a ViT)
                "EnsembleConfig(member_config=...) needs the members' 'model_type' (e.g. 'bert'); got a dict "
                f"without one (keys {sorted(self.member_config)[:8]})."
            )
        super().__post_init__(**kwargs)
        self.members = list(self.members or [])
        self.metadata = dict(self.metadata or {})
        if self.member_config is not None:  # the members' labels are the ensemble's labels
            self.id2label = dict(self.member_config.id2label)
            self.label2id = dict(self.member_config.label2id or {v: k for k, v in self.id2label.items()})
            # named explicitly (num_labels=1 means regression to the members' forward, a sigmoid to a
            # pipeline): the ensemble combines, scores and is post-processed by this one rule
            self.problem_type = tasks.problem_type_of(self.member_config)
            self.architecture = self.architecture or (self.member_config.architectures or [None])[0]

    @property
    def num_members(self) -> int:
        return len(self.members)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The members' text config (the ensemble has no text settings of its own)."""
        if self.member_config is None:
            return super().get_text_config(decoder=decoder, encoder=encoder)
        return self.member_config.get_text_config(decoder=decoder, encoder=encoder)

    @classmethod
    def for_members(cls, members: Sequence[PreTrainedModel], metadata: dict | None = None) -> EnsembleConfig:
        """The config of an ensemble of these (already checked) member models."""
        member_config = copy.deepcopy(members[0].config)
        member_config.architectures = [type(members[0]).__name__]  # what `EnsembleModel(config)` builds
        return cls(
            members=[f"member_{k:02d}" for k in range(len(members))],
            member_config=member_config,
            architecture=type(members[0]).__name__,
            metadata={**(metadata or {}), "num_members": len(members)},
        )

    @classmethod
    def for_adapters(
        cls, peft_model, names: Sequence[str], metadata: dict | None = None, base_model: str | None = None
    ) -> EnsembleConfig:
        """The config of an ensemble of the LoRA adapters `names` of one peft model (`hf_ens.adapters`)."""
        base = peft_model.get_base_model()
        member_config = copy.deepcopy(base.config)
        member_config.architectures = [type(base).__name__]
        return cls(
            members=list(names),
            member_config=member_config,
            architecture=type(base).__name__,
            metadata={**(metadata or {}), "num_members": len(names)},
            member_format="peft_lora",
            base_model=base_model,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> EnsembleConfig:
        """Read ``ensemble_config.json`` of a local ensemble directory or a Hub repo (transformers' hub
        kwargs: revision, token, cache_dir, local_files_only...). A config with an ``auto_map`` is refused.
        An ensemble saved in format 1 gets its member config from ``member_00/config.json``."""
        kwargs.setdefault("_configuration_file", _config_file_name(pretrained_model_name_or_path, kwargs))
        hub_kwargs = {
            k: kwargs[k]
            for k in ("cache_dir", "force_download", "local_files_only", "revision", "token")
            if k in kwargs
        }
        config_file = kwargs["_configuration_file"]
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        where = f"{config_file} of {pretrained_model_name_or_path}"
        if not isinstance(config_dict, dict) or not isinstance(config_dict.get("members"), list):
            raise EnsembleLoadError(f"Corrupted {where}: no 'members' list (not an hf-ens ensemble?).")
        if "auto_map" in config_dict:
            raise EnsembleLoadError(
                f"{where} has an 'auto_map' entry: it asks to run the repository's own Python code, which "
                "hf-ens never does (trust_remote_code=False)."
            )
        if config_dict.get("model_type") != cls.model_type:  # format 1: model_type was the members'
            config_dict = {k: v for k, v in config_dict.items() if k != "model_type"}
        if config_dict.get("member_config") is None and config_dict["members"]:
            member_dict, _ = PreTrainedConfig.get_config_dict(
                pretrained_model_name_or_path, subfolder=config_dict["members"][0], **hub_kwargs
            )
            if "auto_map" in member_dict:
                raise EnsembleLoadError(f"{config_dict['members'][0]}/config.json has an 'auto_map' entry.")
            config_dict["member_config"] = member_dict
        return cls.from_dict(config_dict, **kwargs)


def _config_file_name(pretrained_model_name_or_path: str | os.PathLike, kwargs: dict) -> str:
    """``ensemble_config.json`` (a saved ensemble, whose ``config.json`` is the root soup's), or
    ``config.json`` in a local directory holding only what ``EnsembleConfig.save_pretrained`` wrote."""
    folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
    if folder.is_dir() and not (folder / ENSEMBLE_CONFIG_NAME).is_file():
        try:
            content = json.loads((folder / CONFIG_NAME).read_text())
        except (OSError, ValueError):
            return ENSEMBLE_CONFIG_NAME  # the loader names the missing file
        if isinstance(content, dict) and content.get("model_type") == EnsembleConfig.model_type:
            return CONFIG_NAME
    return ENSEMBLE_CONFIG_NAME


@dataclass
class EnsembleOutput(ModelOutput):
    """Output of `EnsembleModel`.

    Args:
        loss: the members' loss applied to the ensemble prediction (when ``labels`` are passed): cross-entropy
            (single-label), binary cross-entropy of the mean probabilities (multi-label), MSE (regression).
        logits: [B, C] (token classification: [B, T, C], per token): ``log(mean_k softmax(member_logits[k]))``
            (its softmax is the ensemble probability),
            the logit of the mean member sigmoid (multi-label), or the mean member value (regression); see
            `hf_ens.tasks`.
        member_logits: raw logits of each member, shape [K, B, C] (token classification: [K, B, T, C]).
        spread: regression only: the standard deviation of the member values, [B, C] (0 for one member).
        hidden_states: with ``output_hidden_states=True``, a tuple over the K members of each member's
            ``hidden_states`` (there is no ensemble hidden state: each member has its own basis).
        attentions: with ``output_attentions=True``, a tuple over the K members of each member's
            ``attentions``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    member_logits: torch.Tensor | None = None
    spread: torch.Tensor | None = None
    hidden_states: tuple[tuple[torch.Tensor, ...], ...] | None = None
    attentions: tuple[tuple[torch.Tensor, ...], ...] | None = None


def _check_members_given(members: Sequence) -> None:
    if not members:
        raise ValueError("An ensemble needs at least one member; got an empty list.")
    for i, m in enumerate(members):
        if not isinstance(m, PreTrainedModel):
            raise TypeError(f"Member {i} is a {type(m).__name__}; expected a transformers PreTrainedModel.")


def _check_compatible(
    members: Sequence[PreTrainedModel], suffixes: tuple[str, ...] = CLASSIFICATION_SUFFIXES
) -> None:
    _check_members_given(members)
    ref = members[0]
    if not type(ref).__name__.endswith(suffixes):
        hint = (
            " (causal-LM members: use EnsembleModelForCausalLM, or EnsembleModel.from_members / "
            "from_pretrained, which pick it)"
            if type(ref).__name__.endswith(CAUSAL_LM_SUFFIXES)
            else ""
        )
        raise ValueError(
            f"This ensemble class supports {' and '.join('*' + s for s in suffixes)} members; got "
            f"{type(ref).__name__}{hint}."
        )
    tasks.problem_type_of(ref.config)  # an unknown problem type: refused before any work
    for i, m in enumerate(members[1:], start=1):
        if type(m) is not type(ref):
            raise ValueError(
                f"All members must share one architecture: member 0 is {type(ref).__name__}, member {i} is "
                f"{type(m).__name__}."
            )
        kinds = tasks.problem_type_of(ref.config), tasks.problem_type_of(m.config)
        if kinds[0] != kinds[1]:
            raise ValueError(
                f"All members must share one problem type: member 0 is {kinds[0]!r}, member {i} is "
                f"{kinds[1]!r} (their outputs combine differently)."
            )
        if dict(m.config.id2label) != dict(ref.config.id2label):
            raise ValueError(
                f"All members must share one label set: member 0 has id2label={dict(ref.config.id2label)}, "
                f"member {i} has {dict(m.config.id2label)}."
            )
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    try:
        for i, m in enumerate(members[1:], start=1):
            check_like(ref, ref_shapes, m, i)
    except ValueError as e:  # same class, other depth or width: averaging or ensembling them is a mistake
        raise ValueError(f"All members must have the same depth and width: {e}") from None


def _on_device(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


class EnsembleModel(PreTrainedModel):
    """Average of the predicted probabilities of K classifiers of one architecture (e.g. StarSSE snapshots).

    Build with `EnsembleModel.from_members([...])` or `EnsembleModel.from_pretrained(repo_id_or_dir)`;
    ``EnsembleModel(config)`` (what ``AutoModelFor...from_config`` calls) builds K freshly initialised members
    from ``config.member_config``. ``config`` is an `EnsembleConfig` (labels from the members, so pipelines
    work), ``members`` an ``nn.ModuleList``, ``metadata`` how the members were trained. Inference costs K
    member forward passes; `soup()` gives a single model at 1x cost.
    """

    config_class = EnsembleConfig
    base_model_prefix = "members"
    _member_suffix: str | None = None  # the task subclasses accept only members of their task
    _member_suffixes = CLASSIFICATION_SUFFIXES  # the member classes this ensemble class averages
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(
        self,
        config: EnsembleConfig,
        members: Sequence[PreTrainedModel] | None = None,
        processor: Any | None = None,
    ):
        if not isinstance(config, EnsembleConfig):
            raise TypeError(
                f"EnsembleModel takes an EnsembleConfig, got {type(config).__name__}; build an ensemble of "
                "models with EnsembleModel.from_members([...])."
            )
        if members is None:  # from the config alone (Auto from_config): fresh members
            if config.member_format != "full":
                raise ValueError(
                    f"An ensemble of {config.member_format} members is loaded with "
                    "EnsembleModel.from_pretrained(repo) (its base model and adapters), not from a config."
                )
            if config.member_config is None or not config.members:
                raise ValueError("EnsembleConfig needs `members` and `member_config` to build an ensemble.")
            member_config = config.member_config
            # Labels set on the ensemble's config after it was made (as transformers' tests and users do:
            # `config.num_labels = 1; config.problem_type = "regression"`) are the members' labels.
            if config.num_labels != member_config.num_labels:
                member_config.num_labels = config.num_labels
            problem_type = config.problem_type
            if problem_type is not None and problem_type != tasks.problem_type_of(member_config):
                member_config.problem_type = problem_type
            cls = member_class(config.member_config)
            # One config object shared by all members: it IS the ensemble's sub-config (as in transformers'
            # composite models), so a change to `config.member_config` reaches every member.
            members = [cls(config.member_config) for _ in config.members]
        members = list(members)
        _check_compatible(members, self._member_suffixes)
        if self._member_suffix and not type(members[0]).__name__.endswith(self._member_suffix):
            raise ValueError(
                f"{type(self).__name__} ensembles *{self._member_suffix} members; got "
                f"{type(members[0]).__name__} (use the Ensemble class of that task, or EnsembleModel)."
            )
        if len(members) != config.num_members:
            raise ValueError(f"EnsembleConfig lists {config.num_members} members; got {len(members)} models.")
        super().__init__(config)
        self.members = nn.ModuleList(members)
        if type(self).main_input_name != members[0].main_input_name:  # the task-agnostic EnsembleModel
            self.main_input_name = members[0].main_input_name
        self._sync_attn_implementation()
        self.processor = processor
        self.post_init()

    def _sync_attn_implementation(self) -> None:
        """The ensemble's config says what attention its members run (what they resolved at load time)."""
        member_config = getattr(self.members[0], "config", None)
        if member_config is not None and member_config._attn_implementation is not None:
            self.config._attn_implementation_internal = member_config._attn_implementation

    @property
    def supports_gradient_checkpointing(self) -> bool:  # type: ignore[override]
        """Whether every member supports it: `gradient_checkpointing_enable` then reaches their layers."""
        members = self._modules.get("members") or ()
        return bool(members) and all(getattr(m, "supports_gradient_checkpointing", False) for m in members)

    def set_attn_implementation(self, attn_implementation: str | dict, **kwargs) -> None:
        super().set_attn_implementation(attn_implementation, **kwargs)
        self._sync_attn_implementation()

    def post_init(self) -> None:
        self._keep_member_weights = True
        try:
            super().post_init()
        finally:
            self._keep_member_weights = False

    def init_parallel_plans(self) -> None:
        """transformers' parallel plans, with the members' under ``members.*.``: transformers collects the
        plans of a model's direct children, and the members sit in a ``ModuleList`` it does not look into, so
        ``ens.tp_plan`` would be empty and tensor parallelism would shard nothing. (transformers matches layer
        indices as ``*``, so one entry covers every member.)"""
        super().init_parallel_plans()
        for member in self._modules.get("members") or ():
            for attr in ("_tp_plan", "_ep_plan", "_fsdp_plan"):
                plan = getattr(member, attr, None) or {}
                getattr(self, attr).update({f"members.*.{key}": v for key, v in plan.items()})

    def init_weights(self) -> None:
        """transformers' ``init_weights`` (each member's own ``_init_weights``, e.g. after building on the
        meta device and ``to_empty``), except while the ensemble is built (`post_init`): every member
        initialised itself when built, and trained members passed in must keep their weights (transformers'
        default would re-draw any module it finds unflagged)."""
        if not getattr(self, "_keep_member_weights", False):
            super().init_weights()

    @property
    def metadata(self) -> dict:
        """How the members were trained (``config.metadata``): method, hyper-parameters, base model..."""
        return self.config.metadata

    # --- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_members(
        cls,
        members: Sequence[PreTrainedModel | str | os.PathLike],
        processor: Any | None = None,
        metadata: dict | None = None,
    ) -> EnsembleModel:
        """Build from loaded models or member directories (``save_pretrained`` outputs, loaded strictly).

        When `processor` is None and the members are directories, the processor of the first one is used.
        """
        models = []
        for m in members:
            if isinstance(m, (str, os.PathLike)):
                models.append(load_member(m))
                if processor is None:
                    processor = load_processor(m)
            else:
                models.append(m)
        _check_members_given(models)
        config = EnsembleConfig.for_members(models, metadata)
        return cls._task_class(config)(config, members=models, processor=processor)

    @classmethod
    def _from_config(cls, config: EnsembleConfig, **kwargs) -> EnsembleModel:
        """``AutoModel.from_config`` / ``EnsembleModel._from_config``: the class of the members' task."""
        return PreTrainedModel._from_config.__func__(cls._task_class(config), config, **kwargs)

    @classmethod
    def _task_class(cls, config: EnsembleConfig) -> type[EnsembleModel]:
        """`EnsembleModel` builds the ensemble class of its members' task (`EnsembleForImageClassification`,
        `EnsembleForSequenceClassification`, `EnsembleForTokenClassification`, `EnsembleModelForCausalLM`,
        which generates); a subclass builds itself."""
        if cls is not EnsembleModel:
            return cls
        return registry.task_class("full", config.architecture) or cls

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        config: EnsembleConfig | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | dict | torch.device | int | None = None,
        attn_implementation: str | None = None,
        base_model: str | os.PathLike | PreTrainedModel | None = None,
        require_digests: bool = False,
        **kwargs,
    ) -> EnsembleModel:
        """Load a saved ensemble from a local directory or a Hub repo id, with transformers' usual keywords.

        Hub repos are fetched with `huggingface_hub.snapshot_download` (`revision`, `token`, `cache_dir`,
        `force_download`, `local_files_only`; members, configs and processor; never ``.py`` files, not the
        root soup weights), then loaded like a local directory; ``revision="main"`` on a local directory is
        ignored with a warning, any other revision there is an error. No repo code ever runs: a config with
        an ``auto_map`` is refused before transformers sees it (``trust_remote_code=True`` is refused). Every
        file is checked against the SHA-256 recorded in ``ensemble_config.json``; a loaded file no digest
        covers (a repo saved before digests were recorded, or whose digests were removed) gives a warning, an
        error with ``require_digests=True``. Every path the repo names (members, shards, digest keys,
        links) must lie inside it once symlinks are followed. `dtype` (or legacy `torch_dtype`),
        `device_map` (``"auto"``, ``"cpu"``, a device) and `attn_implementation` go to each member's
        ``from_pretrained``. `config`: an `EnsembleConfig` to use instead of the saved one (the Auto classes
        pass it); it must list the same members. Non-finite member weights, or weights stored in another
        dtype than the members' config, are refused (see `hf_ens.members.load_member`).

        A repo of LoRA members (``member_format: "peft_lora"``) gives an
        `hf_ens.adapters.AdapterEnsembleModel`: the base named in ``ensemble_config.json`` is loaded once
        (`base_model`: another Hub id, path or loaded model to use instead, e.g. for a base that was a local
        checkpoint), its frozen weights are checked against the recorded SHA-256, and the adapters are
        attached by name.
        """
        if model_args:
            raise TypeError(
                f"EnsembleModel.from_pretrained takes no extra positional arguments; got {model_args}."
            )
        check_and_set_device_map(device_map)  # transformers' own error under a meta-device context
        output_loading_info = kwargs.pop("output_loading_info", False)
        state_dict = kwargs.pop("state_dict", None)
        num_labels = kwargs.pop("num_labels", None)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        if pretrained_model_name_or_path is None:  # transformers' "config + state_dict, no checkpoint"
            if config is None:
                raise ValueError("from_pretrained(None, ...) needs config= (and optionally state_dict=).")
            model = cls._task_class(config)(config)
            if state_dict is not None:
                model.load_state_dict(state_dict, strict=True)
            model = model.eval()
            return (model, _loading_info()) if output_loading_info else model
        if state_dict is not None:
            raise ValueError(
                "state_dict= with a checkpoint is not supported for an ensemble: its members are loaded "
                "strictly from the repo (load a state_dict into the loaded ensemble with load_state_dict)."
            )
        if kwargs.pop("trust_remote_code", None):
            raise ValueError("hf-ens never runs repository code: trust_remote_code=True is not supported.")
        if kwargs.pop("use_safetensors", True) is False:
            raise ValueError("hf-ens loads safetensors weights only: use_safetensors=False is not supported.")
        if kwargs.pop("subfolder", "") not in ("", None):
            raise ValueError(
                "An ensemble is a whole repo: `subfolder` is not supported (load members directly)."
            )
        for name in _IGNORED_LOAD_KWARGS:
            kwargs.pop(name, None)
        if kwargs:
            raise TypeError(
                f"EnsembleModel.from_pretrained got unexpected keyword argument(s) {sorted(kwargs)}."
            )
        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise ValueError(
                    f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype."
                )
            dtype = torch_dtype
        if config is not None and not isinstance(config, EnsembleConfig):
            raise TypeError(f"config must be an EnsembleConfig; got {type(config).__name__}.")

        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            if path.exists():
                raise EnsembleLoadError(f"{path} is a file, not an ensemble directory.")
            path = hub.download(
                str(pretrained_model_name_or_path),
                revision,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
                token=token,
            )
        elif revision is not None and str(revision) == "main":
            warnings.warn(f"revision='main' ignored: {path} is a local directory.", UserWarning, stacklevel=2)
        elif revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos; {path} is a local directory.")
        if not (path / ENSEMBLE_CONFIG_NAME).is_file():
            inside = sorted(p.parent.name for p in path.glob(f"*/{ENSEMBLE_CONFIG_NAME}"))
            hint = (  # e.g. a recipe's output_dir, whose repo is its ensemble_repo/ sub-folder
                f"; {path / inside[0]} is one: load that folder"
                if inside
                else " (see EnsembleModel.save_pretrained)"
            )
            raise EnsembleLoadError(f"Missing {path / ENSEMBLE_CONFIG_NAME}: not an hf-ens ensemble{hint}.")
        for name in sorted(os.listdir(path)):  # what the loader may open: no link out of the repo
            if name.startswith("member_") or any(fnmatch(name, p) for p in LOADER_READS):
                repo_path(path, name, "file")
        refuse_remote_code(path)  # before anything else reads the configs
        saved = _read_config(path)
        for name in saved.members:
            check_repo_tree(repo_path(path, name, "member directory"), path)
            refuse_remote_code(path / name)
        hub.verify_digests(path, saved.files, require=require_digests)
        if config is not None and list(config.members) != saved.members:
            raise EnsembleLoadError(
                f"The config passed lists members {config.members}; {path / ENSEMBLE_CONFIG_NAME} lists "
                f"{saved.members}."
            )
        member_kwargs = dict(dtype=dtype, device_map=device_map, attn_implementation=attn_implementation)
        if saved.member_format != "full":  # e.g. "peft_lora": the format's own loader (`hf_ens.registry`)
            fmt = registry.member_format(saved.member_format)
            if fmt is None:
                raise EnsembleLoadError(
                    f"Unknown member_format {saved.member_format!r} in {path / ENSEMBLE_CONFIG_NAME}."
                )
            hub_kwargs = dict(
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
                token=token,
            )
            return fmt.load(path, saved, config, base_model, num_labels, hub_kwargs, **member_kwargs)
        if base_model is not None:
            raise TypeError("base_model applies to ensembles of adapter members only.")
        config = config if config is not None else saved
        info = _loading_info()
        member_config = None  # transformers' meaning of config= and num_labels=: load into that config
        if num_labels is not None and num_labels != config.num_labels:  # K fresh heads
            member_config = copy.deepcopy(config.member_config)
            member_config.num_labels = num_labels
        elif not _same_config(config.member_config, saved.member_config):
            member_config = config.member_config
        if member_config is not None:
            members = []
            for k, name in enumerate(saved.members):
                member, member_info = _load_member_into(
                    path / name, member_config, ignore_mismatched_sizes, member_kwargs
                )
                members.append(member)
                info["mismatched_keys"] |= {
                    (f"members.{k}.{v[0]}", *v[1:]) for v in member_info["mismatched_keys"]
                }
            config.member_config = members[0].config
            config.id2label, config.label2id = (
                dict(members[0].config.id2label),
                dict(members[0].config.label2id),
            )
        else:
            members = [load_member(path / name, root=path, **member_kwargs) for name in saved.members]
        _check_same_dtypes(path, saved.members)  # after each member's own checks (they name the cause)
        model = cls._task_class(config)(config, members=members, processor=load_processor(path)).eval()
        return (model, info) if output_loading_info else model

    # --- inference --------------------------------------------------------------------------------------
    @property
    def num_members(self) -> int:
        return len(self.members)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EnsembleOutput | tuple:
        """Run every member and combine their outputs by the members' problem type (`hf_ens.tasks`): mean
        probability (single- or multi-label) or mean value (regression); extra kwargs go to every member."""
        kwargs.pop("num_items_in_batch", None)  # a Trainer loss kwarg, not a model input
        if kwargs.get("inputs_embeds") is not None:
            self._check_shared_input_embeddings()
        flags = self._member_output_flags(kwargs)
        inputs = dict(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
        )
        inputs = {k: v for k, v in {**inputs, **kwargs, **flags}.items() if v is not None}
        outputs = [self._member_outputs(m, inputs) for m in self.members]
        member_logits = torch.stack([o.logits.to(self.members[0].device) for o in outputs])
        problem_type = self.config.problem_type or tasks.problem_type_of(self.config)
        logits, spread = tasks.combine(member_logits, problem_type)
        loss = None if labels is None else tasks.loss(logits, labels, problem_type)
        per_member = {  # K sets, one per member (each in its own basis): a tuple over members
            name: tuple(getattr(o, name) for o in outputs) if flags[f"output_{name}"] else None
            for name in ("hidden_states", "attentions")
        }
        if return_dict is False:
            return tuple(
                x for x in (loss, logits, member_logits, spread, *per_member.values()) if x is not None
            )
        return EnsembleOutput(
            loss=loss, logits=logits, member_logits=member_logits, spread=spread, **per_member
        )

    def _member_model(self, k: int) -> PreTrainedModel:
        """The transformers model that runs member k (adapter ensembles: the shared base)."""
        return self.members[k]

    def _check_shared_input_embeddings(self) -> None:
        """``inputs_embeds`` are vectors of ONE embedding table: every member gets them, so the members must
        share their input embeddings (adapters on one base, or embeddings frozen in training); otherwise
        every member would read member 0's vectors, a silently wrong ensemble."""
        tables = [self._member_model(k).get_input_embeddings().weight for k in range(self.num_members)]
        first = tables[0]
        for k, table in enumerate(tables[1:], start=1):
            if table is not first and (
                table.shape != first.shape or not torch.equal(table.to(first.device), first)
            ):
                raise ValueError(
                    f"inputs_embeds are given to every member, but member {k}'s input embeddings differ from "
                    "member 0's (each member reads tokens through its own table): pass input_ids instead."
                )

    def _member_output_flags(self, kwargs: dict) -> dict[str, Any]:
        """``output_hidden_states`` / ``output_attentions`` from the call (a bool, or transformers' list of
        layer indices to capture), else from the ensemble's config; given to every member as they are."""
        return {
            flag: kwargs.pop(flag) if kwargs.get(flag) is not None else getattr(self.config, flag, False)
            for flag in ("output_hidden_states", "output_attentions")
        }

    def _member_outputs(self, member: PreTrainedModel, inputs: dict):
        """One member's outputs: with ``device_map`` members may sit on different devices (a member dispatched
        over several devices moves its inputs itself)."""
        if getattr(member, "hf_device_map", None) is None:
            inputs = _on_device(inputs, member.device)
        return member(**inputs)

    def predict(self, dataloader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """Member logits [K, N, C] and labels [N] of a labelled loader (for `metrics.ensemble_metrics`)."""
        return predict(
            self,
            dataloader,
            output="member_logits",
            desc="ensemble predict",
            empty_error="EnsembleModel.predict got an empty dataloader.",
        )

    def soup(self, bn_dataloader: Iterable | None = None) -> PreTrainedModel:
        """Uniform weight average of the members (`hf_ens.uniform_soup`): one model at 1x inference cost."""
        return uniform_soup(list(self.members), bn_dataloader=bn_dataloader)

    # --- persistence ------------------------------------------------------------------------------------
    def ensemble_config(self) -> dict:
        """The content of ``ensemble_config.json`` (without the file digests, which `save_pretrained` adds).

        Local paths in the metadata (e.g. a locally pre-trained base model) are stored as ``local:<name>``: a
        saved or pushed repo never carries the machine's directory names.
        """
        config = copy.deepcopy(self.config)
        config.metadata = hub.public_metadata(config.metadata)
        config.architectures = [type(self).__name__]
        config.files = None
        if config.base_model is not None:
            config.base_model = hub.public_metadata({"base_model": config.base_model})["base_model"]
        content = config.to_dict()
        for cfg in (content, content["member_config"]):  # where the members were loaded from: a local path
            cfg.pop("_name_or_path", None)
        return {**content, "num_members": self.num_members}  # num_members: for readers of the file

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "50GB",
        safe_serialization: bool = True,
        token: str | bool | None = None,
        soup: PreTrainedModel | None = None,
        metrics: dict | None = None,
        repo_id: str | None = None,
        save_original_format: bool = True,
        **push_kwargs,
    ) -> Path:
        """Write the ensemble repo layout (members, root soup, processor, ensemble_config.json, README.md).

        The repo is built complete in a hidden sibling and swapped in with ONE rename
        (`hf_ens._io.atomic_directory`): a crash at any point leaves the complete old or the complete new
        ensemble, so members, soup config and soup weights always change together. In an existing directory
        only the ensemble's own entries (``member_XX/``, ``model.safetensors`` and its shards,
        ``ensemble_config.json``, the configs, processor files and card it writes) are replaced; anything else
        (``training_args.bin``, ``model-best.safetensors``, ``notes.txt``) survives, including files another
        process writes there during the save. The directory keeps its mode, owner and group (a new one
        follows the umask); a symlinked target is written through; a mount point is refused (`OSError`).

        Refuses (`hf_ens.NonFiniteError`) a member or soup with NaN/Inf weights. `soup` replaces the uniform
        soup at the root (e.g. one with recomputed BatchNorm statistics); `metrics`
        (`hf_ens.metrics.ensemble_metrics`) and `repo_id` go into the card. transformers' keywords:
        `max_shard_size` shards every member and the soup (the digests cover every shard); only safetensors
        are written (``safe_serialization=False`` is refused); `is_main_process=False` writes nothing (the
        other ranks of a distributed run); ``push_to_hub=True`` then pushes the directory to `repo_id`
        (default: its name) with `token` and `push_kwargs` (``commit_message``, ``commit_description``,
        ``private``, ``create_pr``, ``revision``); `save_original_format` goes to each member's and the
        soup's ``save_pretrained`` (transformers' checkpoint key format). A `state_dict` is refused: the
        ensemble saves its own members.
        """
        _check_save_kwargs(safe_serialization, state_dict, push_kwargs)
        target = Path(save_directory)
        if not is_main_process:
            return target
        self._check_finite_members()
        if soup is not None:
            self._check_soup(soup)
        soup = soup if soup is not None else self.soup()
        assert_finite(soup, "the soup (root weights)")
        with atomic_directory(target, keep=lambda name: not hub.owned(name)) as tmp:
            self._save_members(tmp, max_shard_size, save_original_format=save_original_format)
            soup.save_pretrained(
                tmp, max_shard_size=max_shard_size, save_original_format=save_original_format
            )
            if self.processor is not None:
                self.processor.save_pretrained(tmp)
            ens_cfg = {**self.ensemble_config(), "files": hub.file_digests(tmp)}
            (tmp / ENSEMBLE_CONFIG_NAME).write_text(json.dumps(ens_cfg, indent=2, sort_keys=True) + "\n")
            render_model_card(self.metadata, metrics, repo_id, ensemble_config=ens_cfg).save(
                tmp / "README.md"
            )
        if push_to_hub:
            self._upload(target, repo_id or target.name, token=token, **push_kwargs)
        return target

    def _check_soup(self, soup: PreTrainedModel) -> None:
        """The root soup is the members' model: same class, labels and tensor shapes, or the repo would
        give plain transformers a model that is not this ensemble's."""
        problems = []
        if type(soup).__name__ != self.config.architecture:
            problems.append(f"it is a {type(soup).__name__}, the members are {self.config.architecture}")
        labels = {int(k): v for k, v in (getattr(soup.config, "id2label", None) or {}).items()}
        if labels != {int(k): v for k, v in self.config.id2label.items()}:
            problems.append(f"its labels {labels} differ from the members' {self.config.id2label}")
        reference = self.members[0] if isinstance(self.members[0], nn.Module) else None
        if not problems and reference is not None:
            ref = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
            got = {k: tuple(v.shape) for k, v in soup.state_dict().items()}
            diff = sorted(k for k in set(ref) | set(got) if ref.get(k) != got.get(k))
            if diff:
                problems.append(f"{len(diff)} tensor(s) differ in name or shape, e.g. {diff[0]!r}")
        if problems:
            raise ValueError(f"soup= does not match the ensemble's members: {'; '.join(problems)}.")

    def _check_finite_members(self) -> None:
        for k, member in enumerate(self.members):
            assert_finite(member, f"member {k} (member_{k:02d})")

    def _save_members(
        self, folder: Path, max_shard_size: int | str, save_original_format: bool = True
    ) -> None:
        """Each member (and the processor) into ``folder/member_XX``."""
        for name, member in zip(self.config.members, self.members, strict=True):
            member.save_pretrained(
                folder / name, max_shard_size=max_shard_size, save_original_format=save_original_format
            )
            if self.processor is not None:
                self.processor.save_pretrained(folder / name)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "50GB",
        safe_serialization: bool = True,
        soup: PreTrainedModel | None = None,
        metrics: dict | None = None,
    ):
        """Push the whole ensemble repo to the Hub in ONE commit; returns the `CommitInfo`.

        The repo is first saved to a temporary directory (`save_pretrained`: refuses non-finite weights; with
        `max_shard_size`) and uploaded with `HfApi.upload_folder` (`commit_message`, `commit_description`,
        `private`, `token`, `revision`, `create_pr`: the commit opens a pull request, ``refs/pr/N``), so the
        Hub never sees a partial ensemble; stale members or soup shards of an earlier push are deleted in that
        same commit. On failure raises `HubPushError` (no commit was made; local files are untouched).
        """
        _check_save_kwargs(safe_serialization, None, {})
        with tempfile.TemporaryDirectory(prefix="hf-ens-push-") as tmp:
            folder = self.save_pretrained(
                Path(tmp) / "repo", max_shard_size=max_shard_size, soup=soup, metrics=metrics, repo_id=repo_id
            )
            return self._upload(
                folder,
                repo_id,
                token=token,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                revision=revision,
                create_pr=create_pr,
            )

    def _upload(
        self, folder: Path, repo_id: str, token, commit_message: str | None = None, private=None, **kw
    ):
        message = commit_message or f"Upload hf-ens ensemble of {self.num_members} members"
        return hub.upload(folder, repo_id, token=token, private=private, commit_message=message, **kw)


def _check_save_kwargs(safe_serialization: bool, state_dict: dict | None, push_kwargs: dict) -> None:
    """Refuse what the ensemble cannot honour rather than drop it silently."""
    if not safe_serialization:
        raise ValueError(
            "hf-ens writes safetensors only (pickle-free repos): safe_serialization=False is refused."
        )
    if state_dict is not None:
        raise ValueError(
            "EnsembleModel.save_pretrained saves its own members; a state_dict is not supported (load it "
            "into the ensemble with load_state_dict first)."
        )
    unknown = sorted(set(push_kwargs) - set(_PUSH_KWARGS))
    if unknown:
        raise TypeError(
            f"EnsembleModel.save_pretrained got unexpected keyword argument(s) {unknown}; push options are "
            f"{list(_PUSH_KWARGS)}."
        )


def _check_same_dtypes(path: Path, names: list[str]) -> None:
    """Members of one ensemble are stored alike: a member whose tensors differ in dtype was tampered with."""
    reference = weight_dtypes(path / names[0], path)
    for name in names[1:]:
        dtypes = weight_dtypes(path / name, path)
        diff = sorted(k for k in set(reference) | set(dtypes) if reference.get(k) != dtypes.get(k))
        if diff:
            raise EnsembleLoadError(
                f"Member {name} ({path / name}) stores {diff[0]!r} as {dtypes.get(diff[0])}, {names[0]} as "
                f"{reference.get(diff[0])} ({len(diff)} tensor(s) differ): members of one ensemble are saved "
                "alike, so the files were damaged or tampered with; refused."
            )


def _loading_info() -> dict[str, set | list]:
    """What ``output_loading_info=True`` returns (transformers' keys and types): members load strictly
    (anything missing or unexpected is an `EnsembleLoadError`), so only ``mismatched_keys`` can be non-empty:
    the weights re-initialised (``members.<k>.<key>``) for another ``num_labels`` or ``config`` with
    ``ignore_mismatched_sizes=True``."""
    return {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}


def _same_config(a: PreTrainedConfig | None, b: PreTrainedConfig | None) -> bool:
    """Whether two member configs describe the same model (ignoring where they were loaded from)."""

    def public(config) -> dict:
        return {
            k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"
        }

    return a is b or (a is not None and b is not None and public(a) == public(b))


def _load_member_into(
    path: Path, member_config: PreTrainedConfig, ignore_mismatched_sizes: bool, member_kwargs: dict
) -> tuple[PreTrainedModel, dict]:
    """One member loaded into another config (a new ``num_labels``, or the ``config=`` passed), with
    transformers' meaning: a size mismatch is its ``RuntimeError``, or with ``ignore_mismatched_sizes`` a
    fresh weight ("Reinit due to size mismatch") listed in ``mismatched_keys``. Missing or unexpected weights
    are refused as in `load_member`. The caller has checked the repo (digests, no remote code)."""
    model, info = member_class(member_config).from_pretrained(
        path,
        config=copy.deepcopy(member_config),
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        output_loading_info=True,
        use_safetensors=True,
        trust_remote_code=False,
        **member_kwargs,
    )
    problems = {k: sorted(map(str, info[k]))[:8] for k in ("missing_keys", "unexpected_keys") if info.get(k)}
    if problems:
        raise EnsembleLoadError(f"Member weights in {path} do not match {type(model).__name__}: {problems}.")
    return model, info


def _read_config(path: Path) -> EnsembleConfig:
    """The `EnsembleConfig` of a local ensemble directory, checked against the member folders it holds."""
    cfg_file = path / ENSEMBLE_CONFIG_NAME
    try:
        config = EnsembleConfig.from_pretrained(path)
    except EnsembleLoadError:
        raise
    except Exception as e:
        raise EnsembleLoadError(f"Corrupted {cfg_file}: {type(e).__name__}: {e}") from e
    found = sorted(p.name for p in path.glob("member_*") if p.is_dir())
    if sorted(config.members) != found or config.metadata.get("num_members", config.num_members) != len(
        found
    ):
        raise EnsembleLoadError(
            f"{cfg_file} lists {config.num_members} members {config.members} but {path} holds {found}."
        )
    return config


class EnsembleForImageClassification(EnsembleModel):
    """An `EnsembleModel` of *ForImageClassification members (what `AutoModelForImageClassification` and
    ``EnsembleModel.from_pretrained`` / ``from_members`` of image classifiers build)."""

    main_input_name = "pixel_values"
    _member_suffix = "ForImageClassification"

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EnsembleOutput | tuple:
        """`EnsembleModel.forward` with the images first (positional calls, ``main_input_name``)."""
        return super().forward(pixel_values=pixel_values, labels=labels, return_dict=return_dict, **kwargs)


class EnsembleForSequenceClassification(EnsembleModel):
    """An `EnsembleModel` of *ForSequenceClassification members (what `AutoModelForSequenceClassification` and
    ``EnsembleModel.from_pretrained`` / ``from_members`` of text classifiers build)."""

    main_input_name = "input_ids"
    _member_suffix = "ForSequenceClassification"

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EnsembleOutput | tuple:
        """`EnsembleModel.forward` with the token ids first (positional calls, ``main_input_name``)."""
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            labels=labels,
            return_dict=return_dict,
            **kwargs,
        )


for _cls in (EnsembleForImageClassification, EnsembleForSequenceClassification):
    registry.register_task_class("full", (_cls._member_suffix,), _cls)

# `import hf_ens` makes the ensemble a model transformers' Auto classes and pipelines know.
AutoConfig.register(EnsembleConfig.model_type, EnsembleConfig, exist_ok=True)
AutoModelForImageClassification.register(EnsembleConfig, EnsembleForImageClassification, exist_ok=True)
AutoModelForSequenceClassification.register(EnsembleConfig, EnsembleForSequenceClassification, exist_ok=True)
AutoModel.register(EnsembleConfig, EnsembleModel, exist_ok=True)  # builds the class of its members' task
