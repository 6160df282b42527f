"""Model cards for ensembles, rendered from the Jinja templates in ``model_cards/`` with huggingface_hub.

The card carries Hub metadata (``library_name``, tags, ``base_model``, datasets, a ``model-index`` with the
ensemble and soup results) and a human part: method, hyper-parameters, a metrics table and how to load the
ensemble, the soup and one member.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .hub import is_hub_id, public_metadata
from .metrics import METRICS

__all__ = ["render_model_card", "template_path"]

METHOD_NAMES = {
    "starsse": "StarSSE (star-shaped snapshot ensemble)",
    "sse": "SSE (snapshot ensemble with cyclic learning rate)",
    "local_de": "Local DE (independent fine-tunings from one checkpoint)",
}
METHOD_DESCRIPTIONS = {
    "starsse": (
        "StarSSE (Sadrtdinov et al., NeurIPS 2023, *To Stay or Not to Stay in the Pre-train Basin*) "
        "fine-tunes the pre-trained model once (member 0), then runs each further cycle *from member 0* "
        "with a fresh optimizer state, so the snapshots form a star around member 0 in the pre-train basin."
    ),
    "sse": "SSE trains one run with a cyclic learning rate and keeps the snapshot at the end of every cycle.",
    "local_de": "Local DE fine-tunes every member independently from the same pre-trained checkpoint.",
}
HYPERPARAMETERS = (
    "method",
    "num_members",
    "learning_rate",
    "num_train_epochs",
    "cycle_epochs",
    "cycle_learning_rate",
    "cycle_warmup_steps",
    "per_device_train_batch_size",
    "weight_decay",
    "bf16",
    "seed",
)
_NOT_HYPERPARAMETERS = {
    "base_model",
    "dataset",
    "dataset_split",
    "dataset_classes",
    "eval_split",
    "license",
    "architecture",
    "basin_probe",
}
# (metric-key prefix, name in the card) of the models whose results go into the model-index and the table.
_RESULTS = (("ensemble", "ensemble"), ("soup", "uniform soup"), ("greedy_soup", "greedy soup"))
_AUTO_CLASSES = {
    "ForImageClassification": ("AutoModelForImageClassification", "image-classification"),
    "ForSequenceClassification": ("AutoModelForSequenceClassification", "text-classification"),
    "ForTokenClassification": ("AutoModelForTokenClassification", "token-classification"),
    "ForCausalLM": ("AutoModelForCausalLM", "text-generation"),
    "LMHeadModel": ("AutoModelForCausalLM", "text-generation"),  # GPT2LMHeadModel
}


def template_path(name: str = "ensemble_card.md") -> Path:
    """Location of a card template: in the wheel (``hf_ens/model_cards``) or the source tree's top level."""
    package_dir = Path(__file__).parent
    for folder in (package_dir / "model_cards", package_dir.parent / "model_cards"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"Model card template {name!r} not found next to {package_dir}.")


def describe_source(value: str, kind: str) -> str:
    """Prose for a base model or dataset that is not a Hub id (``local:name``, a path, ``offline:name``)."""
    scheme, _, name = str(value).partition(":")
    if scheme == "local" and name:
        return f"a local {kind} (`{name}`)"
    if scheme == "offline" and name:
        return f"an offline copy of `{name}` (not from the Hub)"
    return f"`{value}` (not a Hub id)"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_model_card(
    metadata: dict,
    metrics: dict | None = None,
    repo_id: str | None = None,
    ensemble_config: dict | None = None,
) -> ModelCard:
    """Render the ensemble card.

    Only real Hub ids (`hf_ens.hub.is_hub_id`) go into ``base_model``, ``datasets``, the model-index and
    links; a local checkpoint or an offline dataset is described in prose, and no local path is printed.

    Args:
        metadata: the ensemble's metadata (method, num_members, learning rates, cycle settings, base_model,
            dataset, dataset_split, ...).
        metrics: output of `hf_ens.metrics.ensemble_metrics` (keys ``ensemble/accuracy``, ``soup/nll``, ...).
        repo_id: Hub id used in the load snippets and as the model-index name.
        ensemble_config: the saved ``ensemble_config.json`` content (for the architecture name).
    """
    metadata, metrics, ensemble_config = (
        public_metadata(dict(metadata or {})),
        dict(metrics or {}),
        dict(ensemble_config or {}),
    )
    method = str(metadata.get("method", "ensemble"))
    num_members = int(metadata.get("num_members") or ensemble_config.get("num_members") or 0)
    architecture = ensemble_config.get("architecture") or metadata.get("architecture") or "transformers"
    auto_class, task = next(  # an architecture of no known task gets no task, never a guessed one
        (v for k, v in _AUTO_CLASSES.items() if architecture.endswith(k)),
        ("AutoModel", None),
    )
    problem = (ensemble_config.get("problem_type") or "").replace("_", "-") or None
    base_model = metadata.get("base_model")
    base_model_text = (
        None if not base_model or is_hub_id(base_model) else describe_source(base_model, "checkpoint")
    )
    hub_base_model = base_model if base_model and base_model_text is None else None
    dataset, split = metadata.get("dataset"), metadata.get("dataset_split") or metadata.get("eval_split")
    hub_dataset = dataset if dataset and is_hub_id(dataset) else None
    dataset_text = f"`{dataset}`" if hub_dataset else describe_source(dataset, "dataset") if dataset else None
    if dataset_text:  # one parenthesis: "(not from the Hub; test split; a 5-class subset: ...)"
        notes = [dataset_text.removesuffix(")").partition(" (")[2]] if dataset_text.endswith(")") else []
        dataset_text = dataset_text.partition(" (")[0] if notes else dataset_text
        notes += [f"{split} split"] if split else []
        classes = metadata.get("dataset_classes")
        if isinstance(classes, (list, tuple)) and classes:
            notes.append(f"a {len(classes)}-class subset: {', '.join(map(str, classes))}")
        dataset_text += f" ({'; '.join(notes)})" if notes else ""
    name = repo_id or f"{method}-ensemble"

    eval_results = []
    if hub_dataset and task:  # a model-index names a Hub dataset; other data are described in the card's text
        for prefix, label in _RESULTS:
            for metric in METRICS:
                if f"{prefix}/{metric}" in metrics:
                    eval_results.append(
                        EvalResult(
                            task_type=task,
                            dataset_type=hub_dataset,
                            dataset_name=hub_dataset,
                            dataset_split=split,
                            metric_type=metric,
                            metric_name=f"{label} {metric}",
                            metric_value=round(float(metrics[f"{prefix}/{metric}"]), 6),
                        )
                    )
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        tags=[t for t in ("hf-ens", "ensemble", "model-soup", method.replace("_", "-"), task, problem) if t],
        base_model=hub_base_model,
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=name,
        eval_results=eval_results or None,
        license=metadata.get("license"),
    )
    rows = []
    for prefix, label in (*_RESULTS, ("member_mean", "mean member")):
        if any(f"{prefix}/{m}" in metrics for m in METRICS):
            row = {m: _fmt(metrics[f"{prefix}/{m}"]) if f"{prefix}/{m}" in metrics else "-" for m in METRICS}
            rows.append({"name": label, **row})
    diversity = [(k.split("/", 1)[1], _fmt(v)) for k, v in metrics.items() if k.startswith("diversity/")]
    listed = [k for k in HYPERPARAMETERS if k in metadata]
    listed += sorted(k for k in metadata if k not in HYPERPARAMETERS and k not in _NOT_HYPERPARAMETERS)
    hyperparameters = [
        (k, f"{metadata[k]:g}" if isinstance(metadata[k], float) else str(metadata[k]))
        for k in listed
        if isinstance(metadata[k], (str, int, float, bool))
    ]
    hyperparameters += (
        [("base_model", f"`{base_model}`" if hub_base_model else base_model_text)] if base_model else []
    )
    basin_probe = _basin_probe_rows(metadata.get("basin_probe"))
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        title=f"{name}: {num_members}-member {METHOD_NAMES.get(method, method)} ensemble and soup",
        num_members=max(num_members, 1),
        architecture=architecture,
        base_model=hub_base_model,
        base_model_text=base_model_text,
        method_name=METHOD_NAMES.get(method, method),
        method_description=METHOD_DESCRIPTIONS.get(method, ""),
        hyperparameters=hyperparameters,
        metrics_rows=rows,
        diversity=diversity,
        dataset=dataset_text,
        dataset_split=None,  # in dataset_text's parenthesis
        repo_id=repo_id or "path/to/ensemble",
        auto_class=auto_class,
        basin_probe=basin_probe,
        **_adapter_fields(ensemble_config),
    )


def _basin_probe_rows(probe) -> dict | None:
    """The card's view of a ``cycle_learning_rate="auto"`` probe result (None without one)."""
    if not isinstance(probe, dict) or not probe.get("table"):
        return None

    def number(value, scale=1.0):  # errors in % with 2 decimals (18.40), losses with 4
        return "-" if value is None else f"{scale * float(value):.{2 if scale == 100.0 else 4}f}"

    rows = [
        {
            "multiplier": f"{float(r['multiplier']):g}",
            "learning_rate": f"{float(r['learning_rate']):.3g}",
            "loss_barrier": number(r.get("loss_barrier")),
            "eval_loss": number(r.get("eval_loss")),
            "eval_error": number(r.get("eval_error"), 100.0),
            "in_basin": "diverged" if r.get("diverged") else ("yes" if r.get("in_basin") else "no"),
            "chosen": "**chosen**" if r.get("chosen") else "",
        }
        for r in probe["table"]
    ]
    model1 = probe.get("model1") or {}
    return {
        "rows": rows,
        "chosen_multiplier": f"{float(probe['chosen_multiplier']):g}",
        "cycle_learning_rate": f"{float(probe['cycle_learning_rate']):.4g}",
        "tolerance": f"{float(probe.get('basin_tolerance', 0)):g}",
        "loss_ratio": f"{float(probe['probe_loss_ratio']):g}" if "probe_loss_ratio" in probe else None,
        "model1_loss": number(model1.get("eval_loss")),
        "model1_error": number(model1.get("eval_error"), 100.0),
        "probe_steps": probe.get("probe_steps"),
        "cycle_steps": probe.get("cycle_steps"),
        "reason": probe.get("reason", ""),
        "guard": probe.get("mode") == "guard",
    }


def _adapter_fields(ensemble_config: dict) -> dict:
    """The card's words for LoRA members: the base they sit on (a Hub link, or prose for a local one)."""
    if ensemble_config.get("member_format") != "peft_lora":
        return {"adapter_base": None, "adapter_base_id": None}
    base = ensemble_config.get("base_model")
    if base and is_hub_id(base):
        return {"adapter_base": f"[`{base}`](https://huggingface.co/{base})", "adapter_base_id": base}
    text = describe_source(base, "checkpoint") if base else "the base model"
    return {"adapter_base": text, "adapter_base_id": "path/to/the/base/model"}
