"""`EnsembleModel`: K fine-tuned classifiers of one architecture behind one `PreTrainedModel` interface.

The ensemble's ``logits`` are ``log(mean_k softmax(z_k))``: their softmax is the mean member probability, so
arg-max, cross-entropy, `Trainer.evaluate` and pipelines give ensemble results with no special case.

On disk and on the Hub an ensemble is an ordinary model repo::

    member_00/ ... member_{K-1}/   plain ``save_pretrained`` outputs (+ processor): load one with transformers
    config.json, model.safetensors the uniform soup: ``AutoModelFor...from_pretrained(repo)`` gives the soup
    preprocessor/tokenizer files   the members' processor
    ensemble_config.json           members, method, cycle hyper-parameters, base model, file SHA-256s
    README.md                      model card

Loading is strict (every member weight present, nothing unexpected), safetensors only, no remote code.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from . import hub
from ._io import atomic_directory
from .checks import assert_finite
from .evaluation import _predict
from .hub import ENSEMBLE_CONFIG_NAME, HubPushError
from .members import SUPPORTED_SUFFIXES, EnsembleLoadError, load_member, load_processor, refuse_remote_code

__all__ = ["EnsembleModel", "EnsembleOutput", "EnsembleLoadError", "HubPushError", "ENSEMBLE_CONFIG_NAME"]

FORMAT_VERSION = 1
_load_member = load_member  # the name `hf_ens.soups` imports


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


def _check_compatible(members: Sequence[PreTrainedModel]) -> None:
    ref = members[0]
    if not type(ref).__name__.endswith(SUPPORTED_SUFFIXES):
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
    from .soups import _check_like  # the weight names/shapes check soups need too

    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    try:
        for i, m in enumerate(members[1:], start=1):
            _check_like(ref, ref_shapes, m, i)
    except ValueError as e:  # same class, other depth or width: averaging or ensembling them is a mistake
        raise ValueError(f"All members must have the same depth and width: {e}") from None


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
                models.append(load_member(m))
                if processor is None:
                    processor = load_processor(m)
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

        Hub repos are fetched with `huggingface_hub.snapshot_download` (members, configs and processor; never
        ``.py`` files, not the root soup weights), then loaded like a local directory. No repo code ever runs:
        a config with an ``auto_map`` is refused before transformers sees it. Every file is checked against
        the SHA-256 recorded in ``ensemble_config.json`` (repos saved before digests were recorded load
        unverified). Non-finite member weights give a warning (see `hf_ens.members.load_member`). `dtype` is
        the members' dtype (e.g. ``torch.bfloat16``; default: as saved); `hub_kwargs` (token, cache_dir,
        local_files_only, ...) go to `snapshot_download`.
        """
        path = Path(repo_id_or_dir)
        if not path.is_dir():
            if path.exists():
                raise EnsembleLoadError(f"{path} is a file, not an ensemble directory.")
            path = hub.download(str(repo_id_or_dir), revision, **hub_kwargs)
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
        for folder in (path, *(path / name for name in member_names)):
            refuse_remote_code(folder)  # before anything else reads them
        hub.verify_digests(path, ens_cfg.get("files"))
        members = [load_member(path / name, dtype=dtype) for name in member_names]
        processor = load_processor(path)
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
        """The content of ``ensemble_config.json`` (without the file digests, which `save_pretrained` adds).

        Local paths in the metadata (e.g. a locally pre-trained base model) are stored as ``local:<name>``: a
        saved or pushed repo never carries the machine's directory names.
        """
        return {
            "hf_ens_format_version": FORMAT_VERSION,
            "members": [f"member_{k:02d}" for k in range(self.num_members)],
            "num_members": self.num_members,
            "architecture": type(self.members[0]).__name__,
            "model_type": getattr(self.config, "model_type", None),
            "root_weights": "uniform_soup",
            "metadata": hub.public_metadata(self.metadata),
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

        The repo is built complete in a hidden sibling and swapped in with ONE rename
        (`hf_ens._io.atomic_directory`): a crash at any point leaves the complete old or the complete new
        ensemble, so members, soup config and soup weights always change together. In an existing directory
        only the ensemble's own entries (``member_XX/``, ``model.safetensors`` and its shards,
        ``ensemble_config.json``, the configs, processor files and card it writes) are replaced; anything else
        (``training_args.bin``, ``model-best.safetensors``, ``notes.txt``) survives. Modes follow the umask.

        Refuses (`hf_ens.NonFiniteError`) a member or soup with NaN/Inf weights. `soup` replaces the uniform
        soup at the root (e.g. one with recomputed BatchNorm statistics); `metrics`
        (`hf_ens.metrics.ensemble_metrics`) and `repo_id` go into the card. Other kwargs (e.g.
        ``max_shard_size``) go to each model's ``save_pretrained``.
        """
        from .cards import render_model_card

        for k in ("safe_serialization", "state_dict", "push_to_hub", "is_main_process"):
            kwargs.pop(k, None)
        for k, member in enumerate(self.members):
            assert_finite(member, f"member {k} (member_{k:02d})")
        soup = soup if soup is not None else self.soup()
        assert_finite(soup, "the soup (root weights)")
        target = Path(save_directory)
        with atomic_directory(target, keep=lambda name: not hub.owned(name)) as tmp:
            for k, member in enumerate(self.members):
                member.save_pretrained(tmp / f"member_{k:02d}", **kwargs)
                if self.processor is not None:
                    self.processor.save_pretrained(tmp / f"member_{k:02d}")
            soup.save_pretrained(tmp, **kwargs)
            if self.processor is not None:
                self.processor.save_pretrained(tmp)
            ens_cfg = {**self.ensemble_config(), "files": hub.file_digests(tmp)}
            (tmp / ENSEMBLE_CONFIG_NAME).write_text(json.dumps(ens_cfg, indent=2, default=str) + "\n")
            render_model_card(self.metadata, metrics, repo_id, ensemble_config=ens_cfg).save(
                tmp / "README.md"
            )
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

        The repo is first saved to a temporary directory (`save_pretrained`: refuses non-finite weights) and
        uploaded with `HfApi.upload_folder`, so the Hub never sees a partial ensemble; stale members or soup
        shards of an earlier push are deleted in that same commit. On failure raises `HubPushError` (no
        commit was made; local files are untouched).
        """
        with tempfile.TemporaryDirectory(prefix="hf-ens-push-") as tmp:
            folder = self.save_pretrained(
                Path(tmp) / "repo", soup=soup, metrics=metrics, repo_id=repo_id, **kwargs
            )
            return hub.upload(
                folder,
                repo_id,
                token=token,
                private=private,
                commit_message=commit_message or f"Upload hf-ens ensemble of {self.num_members} members",
                revision=revision,
                create_pr=create_pr,
            )
