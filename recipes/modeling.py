"""Model set-up of the image recipes (`recipes/vit_cifar.py`, `recipes/compare_methods.py`): the checkpoint
(a Hub id, a local folder, or the embedded offline pre-trained ViT), the classifier with its head for the
task's labels, and the optional LoRA wrapping. `args` is the recipe's ``ScriptArguments``."""

from __future__ import annotations

OFFLINE_MODEL = "offline:pretrained_vit"


def resolve_checkpoint(args) -> str:
    if args.model_name_or_path != OFFLINE_MODEL:
        return args.model_name_or_path
    from recipes.pretrain_vit import ensure_pretrained_checkpoint

    return str(ensure_pretrained_checkpoint(args.pretrain_config))


def load_model(checkpoint: str, label_names: list[str], args):
    """Load the classifier with a head for `label_names`; a trained head of another size is refused."""
    from transformers import AutoConfig, AutoModelForImageClassification

    from hf_ens.heads import reinit_task_head

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=False)
    has_head = any(a.endswith("ForImageClassification") for a in (config.architectures or []))
    if has_head and config.num_labels != len(label_names) and not args.ignore_mismatched_sizes:
        raise ValueError(
            f"{checkpoint!r} has a classification head for {config.num_labels} labels but the dataset has "
            f"{len(label_names)}. Pass --ignore_mismatched_sizes true to re-initialise the head."
        )
    labels = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {n: i for i, n in enumerate(label_names)},
    }
    if args.init_from_scratch:
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=False, **labels)
        return AutoModelForImageClassification.from_config(config, trust_remote_code=False)
    model = AutoModelForImageClassification.from_pretrained(
        checkpoint, ignore_mismatched_sizes=args.ignore_mismatched_sizes, trust_remote_code=False, **labels
    )
    trained_for = [str(config.id2label[i]) for i in sorted(config.id2label)] if has_head else []
    generic = all(name.startswith("LABEL_") for name in trained_for)
    if has_head and not generic and trained_for != label_names and config.num_labels == len(label_names):
        # same size, other classes (e.g. the offline source task): that head is no starting point
        print(
            f"Re-initialising the head of {checkpoint}: trained for {trained_for}, "
            f"the task has {label_names}."
        )
        reinit_task_head(model)
    return model


def apply_lora(model, args):
    """Wrap `model` in a peft LoRA model: adapters on `lora_target_modules`, the task head trained in full
    (``modules_to_save``), the rest frozen. The LoRA factors are drawn from the global RNG (seeded)."""
    from peft import LoraConfig, get_peft_model

    from hf_ens.heads import task_heads

    heads = [name for name, module in model.named_children() if name != model.base_model_prefix]
    task_heads(model)  # a clear error for a model without a head
    targets = args.lora_target_modules
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        modules_to_save=heads,
    )
    from hf_ens.adapters import quiet_peft_wrap

    try:
        with quiet_peft_wrap():
            return get_peft_model(model, config)
    except ValueError as err:  # e.g. target modules that the model does not have
        raise ValueError(f"--lora_target_modules {' '.join(targets)}: {err}") from err
