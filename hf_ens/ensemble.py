"""`EnsembleModel`: K fine-tuned classifiers of one architecture behind one `PreTrainedModel` interface.

The ensemble's ``logits`` are ``log(mean_k softmax(z_k))``: their softmax is the mean member probability, so
arg-max, cross-entropy, `Trainer.evaluate` and pipelines give ensemble results with no special case.

On disk and on the Hub an ensemble is an ordinary model repo::

    member_00/ ... member_{K-1}/   plain ``save_pretrained`` outputs (+ processor): load one with transformers
    config.json, model.safetensors the uniform soup: ``AutoModelFor...from_pretrained(repo)`` gives the soup
    preprocessor/tokenizer files   the members' processor
    ensemble_config.json           members, method, cycle hyper-parameters, base model
    README.md                      model card

Loading is strict (every member weight present, nothing unexpected), safetensors only, no remote code.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .evaluation import _predict

__all__ = ["EnsembleModel", "EnsembleOutput", "EnsembleLoadError", "HubPushError", "ENSEMBLE_CONFIG_NAME"]

ENSEMBLE_CONFIG_NAME = "ensemble_config.json"
FORMAT_VERSION = 1
_SUPPORTED_SUFFIXES = ("ForImageClassification", "ForSequenceClassification")
# Files fetched from the Hub for an ensemble: configs, processors and the members; not the root soup weights.
_HUB_ALLOW_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "README.md", "member_*/*"]
# Files of an earlier ensemble push that the new commit deletes unless it uploads them again.
_STALE_PATTERNS = [
    "member_*",
    "member_*/*",
    "model*.safetensors",
    "model.safetensors.index.json",
    ENSEMBLE_CONFIG_NAME,
]


class EnsembleLoadError(OSError):
    """A saved ensemble is incomplete, corrupted or inconsistent with its ``ensemble_config.json``."""


class HubPushError(RuntimeError):
    """`EnsembleModel.push_to_hub` failed before its single commit was made."""


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


def _member_class(config) -> type[PreTrainedModel]:
    """The transformers class named in a member config (no remote code: only classes transformers ships)."""
    names = [a for a in (getattr(config, "architectures", None) or []) if a.endswith(_SUPPORTED_SUFFIXES)]
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise EnsembleLoadError(
            f"Member config names architectures={getattr(config, 'architectures', None)}; hf-ens loads only "
            f"transformers' own *{_SUPPORTED_SUFFIXES[0]} / *{_SUPPORTED_SUFFIXES[1]} classes"
            " (no remote code)."
        )
    return cls


def _load_member(path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """Load one member directory strictly: safetensors only, every weight present, nothing unexpected."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EnsembleLoadError(f"Missing member file {config_file}.")
    weights = [path / "model.safetensors", path / "model.safetensors.index.json"]
    if not any(w.is_file() for w in weights):
        raise EnsembleLoadError(f"Missing member file {weights[0]} (hf-ens loads safetensors weights only).")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as e:
        raise EnsembleLoadError(f"Could not read member file {config_file}: {type(e).__name__}: {e}") from e
    try:
        model, info = _member_class(config).from_pretrained(
            path, config=config, use_safetensors=True, output_loading_info=True, dtype=dtype
        )
    except EnsembleLoadError:
        raise
    except Exception as e:  # corrupted JSON / safetensors header, truncated file, ...
        bad = next((w for w in weights if w.is_file()), path)
        raise EnsembleLoadError(f"Could not load member {path} (file {bad}): {type(e).__name__}: {e}") from e
    problems = {
        k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if problems:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:8]}" for k, v in problems.items())
        raise EnsembleLoadError(
            f"Member weights in {weights[0]} do not match {type(model).__name__}: {detail}."
        )
    return model


def _check_compatible(members: Sequence[PreTrainedModel]) -> None:
    ref = members[0]
    if not type(ref).__name__.endswith(_SUPPORTED_SUFFIXES):
        raise ValueError(
            f"EnsembleModel supports *ForImageClassification and *ForSequenceClassification members; got "
            f"{type(ref).__name__}."
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


def _install_dir(tmp: Path, target: Path) -> None:
    """Move the finished directory `tmp` to `target` once it is complete.

    A new `target` is one rename (atomic). Into an existing directory (e.g. a Trainer ``output_dir``) each
    entry is renamed into place, so files that are not part of the ensemble survive; members and soup shards
    of an earlier, larger ensemble are removed.
    """
    if not target.exists():
        os.replace(tmp, target)
        return
    new = {p.name for p in tmp.iterdir()}
    stale = [
        p for p in target.iterdir() if p.name not in new and any(fnmatch(p.name, s) for s in _STALE_PATTERNS)
    ]
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        for entry in [target / name for name in new if (target / name).exists()] + stale:
            os.replace(entry, trash / entry.name)
        for name in new:
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


class EnsembleModel(PreTrainedModel):
    """Average of the predicted probabilities of K classifiers of one architecture (e.g. StarSSE snapshots).

    Build with `EnsembleModel.from_members([...])` or `EnsembleModel.from_pretrained(repo_id_or_dir)`. The
    ``config`` is a copy of member 0's (so ``id2label`` works in pipelines), ``members`` an ``nn.ModuleList``,
    ``metadata`` a dict of how the members were trained (method, cycle hyper-parameters, base model...).
    Inference costs K member forward passes; `soup()` gives a single model at 1x cost.
    """

    config_class = transformers.PretrainedConfig
    base_model_prefix = "members"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(
        self,
        members: Sequence[PreTrainedModel],
        processor: Any | None = None,
        metadata: dict | None = None,
    ):
        members = list(members)
        if not members:
            raise ValueError("An ensemble needs at least one member; got an empty list.")
        for i, m in enumerate(members):
            if not isinstance(m, PreTrainedModel):
                raise TypeError(
                    f"Member {i} is a {type(m).__name__}; expected a transformers PreTrainedModel."
                )
        _check_compatible(members)
        config = copy.deepcopy(members[0].config)
        # The Trainer concatenates outputs along dim 0; member_logits is [K, B, C], so keep it out of there.
        config.keys_to_ignore_at_inference = ["member_logits"]
        super().__init__(config)
        self.members = nn.ModuleList(members)
        self.main_input_name = members[0].main_input_name
        self.processor = processor
        self.metadata = {**(metadata or {}), "num_members": len(members)}

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
                models.append(_load_member(m))
                if processor is None:
                    processor = _load_processor(Path(m))
            else:
                models.append(m)
        return cls(models, processor=processor, metadata=metadata)

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | os.PathLike,
        revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        **hub_kwargs,
    ):
        """Load a saved ensemble from a local directory or a Hub repo id (optionally at a `revision`).

        Hub repos are fetched with `huggingface_hub.snapshot_download` (members, configs and processor; not
        the root soup weights), then loaded like a local directory. `dtype` is the members' dtype (e.g.
        ``torch.bfloat16``; default: as saved); `hub_kwargs` (token, cache_dir, local_files_only, ...) go to
        `snapshot_download`.
        """
        path = Path(repo_id_or_dir)
        if not path.is_dir():
            if path.exists():
                raise EnsembleLoadError(f"{path} is a file, not an ensemble directory.")
            path = _download(str(repo_id_or_dir), revision, **hub_kwargs)
        elif revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos; {path} is a local directory.")
        cfg_file = path / ENSEMBLE_CONFIG_NAME
        if not cfg_file.is_file():
            raise EnsembleLoadError(
                f"Missing {cfg_file}: not an hf-ens ensemble (see EnsembleModel.save_pretrained)."
            )
        try:
            ens_cfg = json.loads(cfg_file.read_text())
            member_names = list(ens_cfg["members"])
        except (ValueError, KeyError, TypeError) as e:
            raise EnsembleLoadError(f"Corrupted {cfg_file}: {e}") from e
        found = sorted(p.name for p in path.glob("member_*") if p.is_dir())
        if sorted(member_names) != found or len(member_names) != ens_cfg.get(
            "num_members", len(member_names)
        ):
            raise EnsembleLoadError(
                f"{cfg_file} lists {len(member_names)} members {member_names} but {path} holds {found}."
            )
        members = [_load_member(path / name, dtype=dtype) for name in member_names]
        processor = _load_processor(path)
        return cls(members, processor=processor, metadata=ens_cfg.get("metadata", {}))

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
        member_logits = torch.stack([m(**inputs).logits for m in self.members])
        logits = torch.logsumexp(torch.log_softmax(member_logits.float(), dim=-1), dim=0) - math.log(
            len(self.members)
        )
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels.to(logits.device).long())
        if return_dict is False:
            return tuple(x for x in (loss, logits, member_logits) if x is not None)
        return EnsembleOutput(loss=loss, logits=logits, member_logits=member_logits)

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
        return {
            "hf_ens_format_version": FORMAT_VERSION,
            "members": [f"member_{k:02d}" for k in range(self.num_members)],
            "num_members": self.num_members,
            "architecture": type(self.members[0]).__name__,
            "model_type": getattr(self.config, "model_type", None),
            "root_weights": "uniform_soup",
            "metadata": self.metadata,
        }

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        soup: PreTrainedModel | None = None,
        metrics: dict | None = None,
        repo_id: str | None = None,
        **kwargs,
    ) -> Path:
        """Write the ensemble repo layout (members, root soup, processor, ensemble_config.json, README.md).

        Written into a temporary sibling directory and renamed into place, so an interrupted save never leaves
        a half-written ensemble. `soup` replaces the uniform soup at the root (e.g. one with recomputed
        BatchNorm statistics); `metrics` (`hf_ens.metrics.ensemble_metrics`) and `repo_id` go into the card.
        Other kwargs (e.g. ``max_shard_size``) go to each model's ``save_pretrained``.
        """
        from .cards import render_model_card

        for k in ("safe_serialization", "state_dict", "push_to_hub", "is_main_process"):
            kwargs.pop(k, None)
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            for k, member in enumerate(self.members):
                member.save_pretrained(tmp / f"member_{k:02d}", **kwargs)
                if self.processor is not None:
                    self.processor.save_pretrained(tmp / f"member_{k:02d}")
            (soup if soup is not None else self.soup()).save_pretrained(tmp, **kwargs)
            if self.processor is not None:
                self.processor.save_pretrained(tmp)
            (tmp / ENSEMBLE_CONFIG_NAME).write_text(
                json.dumps(self.ensemble_config(), indent=2, default=str) + "\n"
            )
            render_model_card(self.metadata, metrics, repo_id, ensemble_config=self.ensemble_config()).save(
                tmp / "README.md"
            )
            _install_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        soup: PreTrainedModel | None = None,
        metrics: dict | None = None,
        **kwargs,
    ):
        """Push the whole ensemble repo to the Hub in ONE commit; returns the `CommitInfo`.

        The repo is first saved to a temporary directory and uploaded with `HfApi.upload_folder`, so the Hub
        never sees a partial ensemble; stale members or soup shards of an earlier push are deleted in that
        same commit. On failure raises `HubPushError` (no commit was made; local files are
        untouched).
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="hf-ens-push-") as tmp:
            folder = self.save_pretrained(
                Path(tmp) / "repo", soup=soup, metrics=metrics, repo_id=repo_id, **kwargs
            )
            try:
                api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
                return api.upload_folder(
                    repo_id=repo_id,
                    folder_path=folder,
                    commit_message=commit_message or f"Upload hf-ens ensemble of {self.num_members} members",
                    revision=revision,
                    create_pr=create_pr,
                    # a repo that held a larger ensemble or a sharded soup must not keep stale parts
                    delete_patterns=_STALE_PATTERNS,
                )
            except Exception as e:
                raise HubPushError(
                    f"Pushing the ensemble to {repo_id!r} failed ({type(e).__name__}: {e}). Nothing was "
                    "committed (the upload is a single commit) and the local model and directories are "
                    "intact; retry the push."
                ) from e


def _download(repo_id: str, revision: str | None, **hub_kwargs) -> Path:
    """Fetch an ensemble repo (not its root soup weights) into the HF cache; errors name the failing file."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_ALLOW_PATTERNS, **hub_kwargs)
        )
    except Exception as e:
        error = e
    # Find out which file failed, so the error names it (snapshot_download's message often does not).
    try:
        info = HfApi(token=hub_kwargs.get("token")).model_info(
            repo_id, revision=revision, files_metadata=False
        )
    except Exception as e:
        raise EnsembleLoadError(f"Could not fetch ensemble {repo_id!r} (revision={revision}): {error}") from e
    wanted = [
        s.rfilename for s in info.siblings or [] if any(fnmatch(s.rfilename, p) for p in _HUB_ALLOW_PATTERNS)
    ]
    for filename in wanted:
        try:
            hf_hub_download(repo_id, filename, revision=info.sha, force_download=True, **hub_kwargs)
        except Exception as e:
            raise EnsembleLoadError(
                f"Could not download {filename} of ensemble {repo_id!r} (revision={revision}): "
                f"{type(e).__name__}: {e}"
            ) from e
    raise EnsembleLoadError(f"Could not fetch ensemble {repo_id!r} (revision={revision}): {error}") from error


def _load_processor(path: Path):
    """The processor saved in `path` (image processor, tokenizer or processor), or None if there is none."""
    names = ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json")
    if not any((path / n).is_file() for n in names):
        return None
    try:
        return transformers.AutoProcessor.from_pretrained(path)
    except Exception as e:
        raise EnsembleLoadError(
            f"Could not load the processor saved in {path}: {type(e).__name__}: {e}"
        ) from e
