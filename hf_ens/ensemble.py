"""`EnsembleConfig` + `EnsembleModel`: K fine-tuned classifiers of one architecture as one transformers model.

The ensemble's ``logits`` are ``log(mean_k softmax(z_k))``: their softmax is the mean member probability, so
arg-max, cross-entropy, `Trainer.evaluate` and pipelines give ensemble results with no special case.
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
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import ModelOutput

from . import hub
from ._io import atomic_directory
from .checks import assert_finite
from .evaluation import _predict
from .hub import ENSEMBLE_CONFIG_NAME, HubPushError
from .members import (
    CAUSAL_LM_SUFFIXES,
    CLASSIFICATION_SUFFIXES,
    EnsembleLoadError,
    load_member,
    load_processor,
    member_class,
    refuse_remote_code,
)

__all__ = [
    "EnsembleConfig",
    "EnsembleModel",
    "EnsembleOutput",
    "EnsembleLoadError",
    "HubPushError",
    "ENSEMBLE_CONFIG_NAME",
]

FORMAT_VERSION = 2  # 2: ensemble_config.json is an EnsembleConfig (1: a plain dict without the member config)
_load_member = load_member  # the name `hf_ens.soups` imports
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
    # The Trainer concatenates outputs along dim 0; member_logits is [K, B, C], so keep it out of there.
    keys_to_ignore_at_inference = ["member_logits"]

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
        super().__post_init__(**kwargs)
        self.members = list(self.members or [])
        self.metadata = dict(self.metadata or {})
        if self.member_config is not None:  # the members' labels are the ensemble's labels
            self.id2label = dict(self.member_config.id2label)
            self.label2id = dict(self.member_config.label2id or {v: k for k, v in self.id2label.items()})
            self.problem_type = self.member_config.problem_type
            self.architecture = self.architecture or (self.member_config.architectures or [None])[0]

    @property
    def num_members(self) -> int:
        return len(self.members)

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
        kwargs.setdefault("_configuration_file", ENSEMBLE_CONFIG_NAME)
        hub_kwargs = {
            k: kwargs[k]
            for k in ("cache_dir", "force_download", "local_files_only", "revision", "token")
            if k in kwargs
        }
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        where = f"{ENSEMBLE_CONFIG_NAME} of {pretrained_model_name_or_path}"
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


@dataclass
class EnsembleOutput(ModelOutput):
    """Output of `EnsembleModel`.

    Args:
        loss: cross-entropy of the ensemble prediction (when ``labels`` are passed).
        logits: ``log(mean_k softmax(member_logits[k]))``, [B, C]; its softmax is the ensemble probability.
        member_logits: raw logits of each member, shape [K, B, C].
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    member_logits: torch.Tensor | None = None


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
    for i, m in enumerate(members[1:], start=1):
        if type(m) is not type(ref):
            raise ValueError(
                f"All members must share one architecture: member 0 is {type(ref).__name__}, member {i} is "
                f"{type(m).__name__}."
            )
        if dict(m.config.id2label) != dict(ref.config.id2label):
            raise ValueError(
                f"All members must share one label set: member 0 has id2label={dict(ref.config.id2label)}, "
                f"member {i} has {dict(m.config.id2label)}."
            )
    from .soups import _check_like  # the weight names/shapes check soups need too

    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    try:
        for i, m in enumerate(members[1:], start=1):
            _check_like(ref, ref_shapes, m, i)
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
            cls = member_class(config.member_config)
            members = [cls(copy.deepcopy(config.member_config)) for _ in config.members]
        members = list(members)
        _check_compatible(members, self._member_suffixes)
        if len(members) != config.num_members:
            raise ValueError(f"EnsembleConfig lists {config.num_members} members; got {len(members)} models.")
        super().__init__(config)
        self.members = nn.ModuleList(members)
        self.main_input_name = members[0].main_input_name
        self.processor = processor
        self.post_init()

    def init_weights(self) -> None:
        """Nothing to initialise: every member initialised itself when built, and trained members passed in
        must keep their weights (transformers' default would re-draw any module it finds uninitialised)."""

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
        model_cls = cls._class_for(type(models[0]).__name__)
        return model_cls(EnsembleConfig.for_members(models, metadata), members=models, processor=processor)

    @classmethod
    def _class_for(cls, architecture: str | None) -> type[EnsembleModel]:
        """The ensemble class for members of `architecture`: ``EnsembleModel.from_members`` /
        ``from_pretrained`` on causal-LM members give an `EnsembleModelForCausalLM` (it generates)."""
        if cls is EnsembleModel and architecture and architecture.endswith(CAUSAL_LM_SUFFIXES):
            from .ensemble_lm import EnsembleModelForCausalLM

            return EnsembleModelForCausalLM
        return cls

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
        **kwargs,
    ) -> EnsembleModel:
        """Load a saved ensemble from a local directory or a Hub repo id, with transformers' usual keywords.

        Hub repos are fetched with `huggingface_hub.snapshot_download` (`revision`, `token`, `cache_dir`,
        `force_download`, `local_files_only`; members, configs and processor; never ``.py`` files, not the
        root soup weights), then loaded like a local directory; ``revision="main"`` on a local directory is
        ignored with a warning, any other revision there is an error. No repo code ever runs: a config with
        an ``auto_map`` is refused before transformers sees it (``trust_remote_code=True`` is refused). Every
        file is checked against the SHA-256 recorded in ``ensemble_config.json`` (repos saved before digests
        were recorded load unverified). `dtype` (or legacy `torch_dtype`), `device_map` (``"auto"``,
        ``"cpu"``, a device) and `attn_implementation` go to each member's ``from_pretrained``. `config`: an
        `EnsembleConfig` to use instead of the saved one (the Auto classes pass it); it must list the same
        members. Non-finite member weights give a warning (see `hf_ens.members.load_member`).

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
            raise EnsembleLoadError(
                f"Missing {path / ENSEMBLE_CONFIG_NAME}: not an hf-ens ensemble "
                "(see EnsembleModel.save_pretrained)."
            )
        refuse_remote_code(path)  # before anything else reads the configs
        saved = _read_config(path)
        for name in saved.members:
            refuse_remote_code(path / name)
        hub.verify_digests(path, saved.files)
        if config is not None and list(config.members) != saved.members:
            raise EnsembleLoadError(
                f"The config passed lists members {config.members}; {path / ENSEMBLE_CONFIG_NAME} lists "
                f"{saved.members}."
            )
        member_kwargs = dict(dtype=dtype, device_map=device_map, attn_implementation=attn_implementation)
        if saved.member_format == "peft_lora":
            from .adapters import AdapterEnsembleModel

            hub_kwargs = dict(
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
                token=token,
            )
            return AdapterEnsembleModel._from_saved(
                path, saved, config, base_model, hub_kwargs=hub_kwargs, **member_kwargs
            )
        if saved.member_format != "full":
            raise EnsembleLoadError(
                f"Unknown member_format {saved.member_format!r} in {path / ENSEMBLE_CONFIG_NAME}."
            )
        if base_model is not None:
            raise TypeError("base_model applies to ensembles of adapter members only.")
        members = [load_member(path / name, **member_kwargs) for name in saved.members]
        model_cls = cls._class_for(saved.architecture)
        model = model_cls(
            config if config is not None else saved, members=members, processor=load_processor(path)
        )
        return model.eval()

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
        """Run every member and average their probabilities; extra kwargs go to every member."""
        kwargs.pop("num_items_in_batch", None)  # a Trainer loss kwarg, not a model input
        inputs = dict(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
        )
        inputs = {k: v for k, v in {**inputs, **kwargs}.items() if v is not None}
        member_logits = torch.stack([self._member_logits(m, inputs) for m in self.members])
        logits = torch.logsumexp(torch.log_softmax(member_logits.float(), dim=-1), dim=0) - math.log(
            len(self.members)
        )
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels.to(logits.device).long())
        if return_dict is False:
            return tuple(x for x in (loss, logits, member_logits) if x is not None)
        return EnsembleOutput(loss=loss, logits=logits, member_logits=member_logits)

    def _member_logits(self, member: PreTrainedModel, inputs: dict) -> torch.Tensor:
        """One member's logits, on member 0's device: with ``device_map`` members may sit on different devices
        (a member dispatched over several devices moves its inputs itself)."""
        if getattr(member, "hf_device_map", None) is None:
            inputs = _on_device(inputs, member.device)
        return member(**inputs).logits.to(self.members[0].device)

    def predict(self, dataloader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """Member logits [K, N, C] and labels [N] of a labelled loader (for `metrics.ensemble_metrics`)."""
        return _predict(
            self,
            dataloader,
            output="member_logits",
            desc="ensemble predict",
            empty_error="EnsembleModel.predict got an empty dataloader.",
        )

    def soup(self, bn_dataloader: Iterable | None = None) -> PreTrainedModel:
        """Uniform weight average of the members (`hf_ens.uniform_soup`): one model at 1x inference cost."""
        from .soups import uniform_soup

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
        **push_kwargs,
    ) -> Path:
        """Write the ensemble repo layout (members, root soup, processor, ensemble_config.json, README.md).

        The repo is built complete in a hidden sibling and swapped in with ONE rename
        (`hf_ens._io.atomic_directory`): a crash at any point leaves the complete old or the complete new
        ensemble, so members, soup config and soup weights always change together. In an existing directory
        only the ensemble's own entries (``member_XX/``, ``model.safetensors`` and its shards,
        ``ensemble_config.json``, the configs, processor files and card it writes) are replaced; anything else
        (``training_args.bin``, ``model-best.safetensors``, ``notes.txt``) survives. Modes follow the umask.

        Refuses (`hf_ens.NonFiniteError`) a member or soup with NaN/Inf weights. `soup` replaces the uniform
        soup at the root (e.g. one with recomputed BatchNorm statistics); `metrics`
        (`hf_ens.metrics.ensemble_metrics`) and `repo_id` go into the card. transformers' keywords:
        `max_shard_size` shards every member and the soup (the digests cover every shard); only safetensors
        are written (``safe_serialization=False`` is refused); `is_main_process=False` writes nothing (the
        other ranks of a distributed run); ``push_to_hub=True`` then pushes the directory to `repo_id`
        (default: its name) with `token` and `push_kwargs` (``commit_message``, ``commit_description``,
        ``private``, ``create_pr``, ``revision``). A `state_dict` is refused: the ensemble saves
        its own members.
        """
        from .cards import render_model_card

        _check_save_kwargs(safe_serialization, state_dict, push_kwargs)
        target = Path(save_directory)
        if not is_main_process:
            return target
        self._check_finite_members()
        soup = soup if soup is not None else self.soup()
        assert_finite(soup, "the soup (root weights)")
        with atomic_directory(target, keep=lambda name: not hub.owned(name)) as tmp:
            self._save_members(tmp, max_shard_size)
            soup.save_pretrained(tmp, max_shard_size=max_shard_size)
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

    def _check_finite_members(self) -> None:
        for k, member in enumerate(self.members):
            assert_finite(member, f"member {k} (member_{k:02d})")

    def _save_members(self, folder: Path, max_shard_size: int | str) -> None:
        """Each member (and the processor) into ``folder/member_XX``."""
        for name, member in zip(self.config.members, self.members, strict=True):
            member.save_pretrained(folder / name, max_shard_size=max_shard_size)
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


# `import hf_ens` makes the ensemble a model transformers' Auto classes and pipelines know.
AutoConfig.register(EnsembleConfig.model_type, EnsembleConfig, exist_ok=True)
for _auto in (AutoModelForImageClassification, AutoModelForSequenceClassification):
    _auto.register(EnsembleConfig, EnsembleModel, exist_ok=True)
