"""The fair comparison behind docs/results.md: StarSSE vs SSE vs Local DE from one checkpoint, on the embedded
offline task, at equal per-member recipes, on the full test set, chosen on held-out data.

Per seed, model 1 is trained ONCE (the main recipe's trainer and data path) and shared: every StarSSE run
branches from it (its members 2..K train as independent branches from model 1's saved weights), SSE runs
re-train it inside their own sequential run (and record that they got the same weights), Local DE trains K
fresh fine-tunes of model 1's recipe. Every run is evaluated on the SAME test images (all of them) and on the
held-out split, raw and after temperature scaling fitted on the held-out split.

Phases (one task queue, several worker processes with one thread each; a finished task is one JSON line in
``runs-<regime>-seed<N>.jsonl``, so a crash or a kill loses the running tasks only):
  grid       model 1, Local DE, StarSSE at every (cycle length, cycle LR), SSE at `sse_multipliers`
  contrasts  more seeds for model 1, Local DE and the StarSSE / SSE settings chosen on held-out grid results
  second     the key contrasts in a second regime (source and target classes swapped, own pre-trained ViT)
Then the report (tables + figures) is rebuilt from every record:

    python recipes/compare_methods.py --config recipes/configs/compare_fair.yaml --workers 2
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from hf_ens.trainers import StarSSEConfig, StarSSETrainer

from recipes._cli import parse_config_and_args, run_cli
from recipes.vit_cifar import (
    ScriptArguments,
    apply_lora,
    load_model,
    load_splits,
    prepare_data,
    resolve_checkpoint,
)

PHASES = ("grid", "contrasts", "second", "convergence")


@dataclass
class CompareArguments:
    """What to compare; each run's own settings come from the same YAML as the main recipe."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Grid seeds."})
    contrast_seeds: list[int] = field(
        default_factory=lambda: [5, 6, 7, 8, 9],
        metadata={"help": "Extra seeds for the key contrasts (chosen settings only)."},
    )
    cycle_lr_multipliers: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0],
        metadata={"help": "StarSSE cycle LR = multiplier x the fine-tuning learning_rate."},
    )
    cycle_factors: list[float] = field(
        default_factory=lambda: [0.5, 1.0],
        metadata={"help": "Cycle lengths F as multiples of model 1's num_train_epochs E."},
    )
    sse_multipliers: list[float] = field(
        default_factory=lambda: [1.0, 4.0, 16.0], metadata={"help": "Cycle-LR multipliers also run with SSE."}
    )
    selection_metric: str = field(
        default="held_out/ensemble/nll",
        metadata={
            "help": "Held-out metric (mean over grid seeds) that picks each method's cycle settings.",
            "choices": ["held_out/ensemble/nll", "held_out/ensemble/accuracy"],
        },
    )
    phases: list[str] = field(
        default_factory=lambda: list(PHASES),
        metadata={
            "help": "What to run besides the grid: 'contrasts' (contrast_seeds), 'second' (the key contrasts "
            "in the second regime), 'convergence' (model 1 trained longer, and from scratch: P1).",
            "choices": list(PHASES),
        },
    )
    second_regime_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds of the second regime."}
    )
    second_regime_classes: list[int] = field(
        default_factory=lambda: [0, 1, 2, 5, 8],
        metadata={"help": "Target classes of the second regime (the main regime's source classes)."},
    )
    second_regime_pretrain_config: str = field(
        default="recipes/configs/pretrain_offline_swapped.yaml",
        metadata={"help": "Pre-training of the second regime's checkpoint (on the main target classes)."},
    )
    scratch_lr_multipliers: list[float] = field(
        default_factory=lambda: [0.3, 1.0, 3.0],
        metadata={"help": "P1: one model from scratch (random init) at these x learning_rate, grid seeds."},
    )
    convergence_epoch_factors: list[float] = field(
        default_factory=lambda: [2.0, 3.0],
        metadata={
            "help": "Model 1 also trained for these multiples of E on the grid seeds (convergence check)."
        },
    )
    results_dir: str = field(
        default="docs/results/fair", metadata={"help": "Where the run records, tables and figures go."}
    )
    workers: int = field(default=1, metadata={"help": "Worker processes (one torch thread each)."})
    worker_index: int = field(default=-1, metadata={"help": "Internal: this process is worker N."})
    report_only: bool = field(default=False, metadata={"help": "Only rebuild the report from the records."})

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds is empty.")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}.")
        if "grid" not in self.phases:
            raise ValueError(f"phases must include 'grid' (the later phases build on it), got {self.phases}.")
        overlap = set(self.seeds) & set(self.contrast_seeds)
        if overlap:
            raise ValueError(f"seeds and contrast_seeds overlap: {sorted(overlap)}.")
        for name in ("cycle_lr_multipliers", "cycle_factors", "sse_multipliers"):
            if any(v <= 0 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")


@dataclass(frozen=True)
class Task:
    regime: str  # "main" or "second"
    seed: int
    # "model1", "local_de", "starsse", "sse"; "model1_long": model 1 trained cycle_factor x E; "scratch": one
    # model of model 1's recipe from random weights at mult x the learning rate
    method: str
    cycle_factor: float = 1.0
    mult: float = 1.0

    @property
    def key(self) -> str:
        if self.method in ("model1", "local_de"):
            return f"{self.regime}/{self.method}/seed={self.seed}"
        if self.method == "model1_long":
            return f"{self.regime}/model1_long/{self.cycle_factor:g}E/seed={self.seed}"
        if self.method == "scratch":
            return f"{self.regime}/scratch/lr_x{self.mult:g}/seed={self.seed}"
        return f"{self.regime}/{self.method}/F={self.cycle_factor:g}E/x{self.mult:g}/seed={self.seed}"


# ------------------------------------------------------------------------------------------------ tasks


def grid_tasks(cmp: CompareArguments) -> list[Task]:
    tasks = [Task("main", s, "model1") for s in cmp.seeds]
    for s in cmp.seeds:
        tasks.append(Task("main", s, "local_de"))
        for f in cmp.cycle_factors:
            tasks += [Task("main", s, "starsse", f, m) for m in cmp.cycle_lr_multipliers]
            tasks += [Task("main", s, "sse", f, m) for m in cmp.sse_multipliers]
    return tasks


def independent_tasks(cmp: CompareArguments) -> list[Task]:
    """Tasks of the later phases that do not wait for the selection."""
    tasks = []
    if "contrasts" in cmp.phases:
        tasks += [Task("main", s, m) for s in cmp.contrast_seeds for m in ("model1", "local_de")]
    if "second" in cmp.phases:
        tasks += [Task("second", s, m) for s in cmp.second_regime_seeds for m in ("model1", "local_de")]
    return tasks


def convergence_tasks(cmp: CompareArguments) -> list[Task]:
    """Model 1 trained longer, and one model trained from scratch (P1), on the grid seeds."""
    if "convergence" not in cmp.phases:
        return []
    tasks = [Task("main", s, "model1_long", f) for s in cmp.seeds for f in cmp.convergence_epoch_factors]
    return tasks + [Task("main", s, "scratch", 1.0, m) for s in cmp.seeds for m in cmp.scratch_lr_multipliers]


def chosen_tasks(cmp: CompareArguments, chosen: dict[str, tuple[float, float]]) -> list[Task]:
    tasks = []
    for method, (f, m) in chosen.items():
        if "contrasts" in cmp.phases:
            tasks += [Task("main", s, method, f, m) for s in cmp.contrast_seeds]
        if "second" in cmp.phases:
            tasks += [Task("second", s, method, f, m) for s in cmp.second_regime_seeds]
    return tasks


def choose_settings(records: list[dict], cmp: CompareArguments) -> dict[str, tuple[float, float]]:
    """Per method, the (cycle factor, multiplier) with the best mean HELD-OUT metric over the grid seeds
    (never the test split). Only settings run on every grid seed compete."""
    lower_is_better = cmp.selection_metric.endswith("nll")
    chosen = {}
    for method in ("starsse", "sse"):
        groups: dict[tuple[float, float], list[float]] = {}
        for r in records:
            if r["regime"] == "main" and r["method"] == method and r["seed"] in cmp.seeds:
                groups.setdefault((r["cycle_factor"], r["mult"]), []).append(
                    r["metrics"][cmp.selection_metric]
                )
        complete = {k: sum(v) / len(v) for k, v in groups.items() if len(v) == len(cmp.seeds)}
        if complete:
            pick = min if lower_is_better else max
            chosen[method] = pick(complete, key=complete.get)
    return chosen


# ------------------------------------------------------------------------------------------------ a run


class SeedData:
    """Splits, tensor-path batches and model builder of one (regime, seed): loaded once per worker."""

    def __init__(self, script: ScriptArguments, seed: int):
        from transformers import AutoImageProcessor

        from recipes.data import collate

        train, held_out, test, self.label_names = load_splits(script, seed)
        self.checkpoint = resolve_checkpoint(script)
        self.processor = AutoImageProcessor.from_pretrained(self.checkpoint, trust_remote_code=False)
        self.train, train_eval, held_out, test, self.preprocess = prepare_data(
            train, held_out, test, self.processor, script
        )
        if self.preprocess is None:
            raise ValueError("The comparison needs the tensor data path (tensor_data_path: true).")
        self.script = script
        loader = torch.utils.data.DataLoader
        self.batches = {
            name: list(loader(ds, batch_size=script.eval_batch_size, collate_fn=collate))
            for name, ds in (("train", train_eval), ("held_out", held_out), ("test", test))
        }
        self.sizes = {"train": len(self.train), "held_out": len(held_out), "test": len(test)}

    def new_model(self, seed: int, from_scratch: bool = False):
        from transformers import set_seed

        set_seed(seed)  # the head is drawn here, as in the recipe
        script = dataclasses.replace(self.script, init_from_scratch=True) if from_scratch else self.script
        model = load_model(self.checkpoint, self.label_names, script)
        self.preprocess.attach(model)
        # LoRA members (lora_r > 0): adapters drawn from the same seeded RNG, as in the recipe
        return apply_lora(model, script) if script.lora_r > 0 else model

    def split(self, name: str):
        return self.preprocess.eval_batches(self.batches[name], "cpu")


def _logits(model, data: SeedData) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from hf_ens.evaluation import predict_logits

    return {name: predict_logits(model, data.split(name)) for name in ("held_out", "test")}


def _load(path: Path):
    from hf_ens.members import load_member

    return load_member(path)


def member_models(trainer: StarSSETrainer, data: SeedData) -> list:
    """The trained members as plain models, ready for the tensor path: LoRA members merged into their base
    (exact; soups, distances and paths need whole weights, not the A and B factors)."""
    if trainer.is_peft:
        models = trainer.ensemble().merged_members()
    else:
        models = [_load(Path(p)) for p in trainer.member_paths]
    for model in models:
        data.preprocess.attach(model)  # idempotent: the hook only converts uint8 batches
    return models


def _saved_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights a member directory holds: a LoRA adapter's, or a whole model's."""
    from safetensors.torch import load_file

    adapter = directory / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else directory / "model.safetensors")


def train_members(task: Task, train: StarSSEConfig, data: SeedData, out: Path, model1_dir: Path | None):
    """Train the task's members into `out`/members with the project's trainer; returns (trainer, seconds)."""
    args = copy.deepcopy(train)
    args.output_dir = str(out)
    args.seed = task.seed
    single = task.method in ("model1", "model1_long", "scratch")
    args.method = "starsse" if single else task.method
    if single:
        args.num_members = 1
    if task.method == "scratch":
        args.learning_rate = task.mult * train.learning_rate
    if task.method == "model1_long":
        args.num_train_epochs = task.cycle_factor * train.num_train_epochs
    if task.method in ("starsse", "sse"):
        args.cycle_epochs = task.cycle_factor * train.num_train_epochs
        args.cycle_learning_rate = task.mult * train.learning_rate
    resume = None
    if task.method == "starsse":  # branches from the shared model 1: members 2..K only
        shutil.copytree(model1_dir, out / "members" / "member_00", copy_function=os.link)
        args.parallel_members, resume = True, True
    trainer = StarSSETrainer(
        model=data.new_model(task.seed, from_scratch=task.method == "scratch"),
        args=args,
        train_dataset=data.train,
        data_collator=_collate(),
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    return trainer, time.perf_counter() - started


def _collate():
    from recipes.data import collate

    return collate


def evaluate_members(task: Task, trainer: StarSSETrainer, data: SeedData, model1: dict | None) -> dict:
    """Member, ensemble and soup metrics on held-out and test, raw and temperature-scaled, plus basin data."""
    from hf_ens import uniform_soup
    from hf_ens.basin import barrier, interpolation_profile, weight_distance
    from hf_ens.evaluation import ensemble_size_curve, make_loss_error_fn
    from hf_ens.metrics import (
        classification_metrics,
        ensemble_log_probs,
        ensemble_metrics,
        fit_temperature,
        temperature_scaled,
    )

    models = member_models(trainer, data)
    logits = [
        model1["logits"] if k == 0 and model1 is not None else _logits(member, data)
        for k, member in enumerate(models)
    ]
    soup = uniform_soup(models)
    data.preprocess.attach(soup)
    soup_logits = _logits(soup, data)
    metrics: dict = {}
    for split in ("held_out", "test"):
        prefix = "" if split == "test" else "held_out/"
        labels = logits[0][split][1]
        z = torch.stack([lg[split][0] for lg in logits])
        for key, value in ensemble_metrics(z, labels, soup_logits=soup_logits[split][0]).items():
            metrics[prefix + key] = value
        curve = ensemble_size_curve(z, labels)
        metrics[prefix + "size_curve/accuracy"] = curve["accuracy"]
        metrics[prefix + "size_curve/nll"] = curve["nll"]
    # temperature scaling: T fitted on held-out, metrics on test
    candidates = {
        "member_0": lambda split: logits[0][split][0],
        "ensemble": lambda split: ensemble_log_probs(torch.stack([lg[split][0] for lg in logits])),
        "soup": lambda split: soup_logits[split][0],
    }
    for name, get in candidates.items():
        t = fit_temperature(get("held_out"), logits[0]["held_out"][1])
        metrics[f"ts/{name}/temperature"] = t
        scaled = classification_metrics(temperature_scaled(get("test"), t), logits[0]["test"][1])
        metrics.update({f"ts/{name}/{k}": v for k, v in scaled.items()})
    # basin: distance of each member to model 1; held-out loss/error barrier model 1 -> member 1
    if len(models) > 1 and task.method != "local_de":
        first, second = models[0], models[1]
        metrics["basin/distance_to_model1"] = [float(weight_distance(first, m)) for m in models[1:]]
        eval_fn = make_loss_error_fn(lambda: data.split("held_out"), prepare=data.preprocess.attach)

        profile = interpolation_profile(first, second, eval_fn, num_points=data.script.interpolation_points)
        metrics["basin/held_out_profile"] = profile
        metrics["basin/loss_barrier"] = barrier(profile["loss"], profile["alphas"])
        metrics["basin/error_barrier"] = barrier(profile["error"], profile["alphas"])
    return metrics


def evaluate_model1(member, data: SeedData) -> tuple[dict, dict]:
    """Model 1's metrics (train, held-out, test; raw and temperature-scaled) and its logits, kept per seed."""
    from hf_ens.evaluation import predict_logits
    from hf_ens.metrics import accuracy, classification_metrics, fit_temperature, temperature_scaled

    logits = _logits(member, data)
    z, y = predict_logits(member, data.split("train"))
    metrics = {
        "member_0/train_accuracy": accuracy(z, y),
        "member_0/train_nll": classification_metrics(z, y)["nll"],
    }
    for split in ("held_out", "test"):
        prefix = "" if split == "test" else "held_out/"
        metrics.update(classification_metrics(*logits[split], prefix=prefix + "member_0/"))
    t = fit_temperature(*logits["held_out"])
    scaled = classification_metrics(temperature_scaled(logits["test"][0], t), logits["test"][1])
    metrics["ts/member_0/temperature"] = t
    metrics.update({f"ts/member_0/{k}": v for k, v in scaled.items()})
    return metrics, logits


def _max_abs_diff(a: Path, b: Path) -> float:
    ours, theirs = _saved_weights(a), _saved_weights(b)
    return max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)


def run_task(
    task: Task, cmp: CompareArguments, script: ScriptArguments, train: StarSSEConfig, cache: dict
) -> dict:
    """Train and evaluate one task; its record (metrics, steps per member, seconds)."""
    if (task.regime, task.seed) not in cache:
        cache.clear()  # one seed's data at a time
        cache[(task.regime, task.seed)] = SeedData(script, task.seed)
    data = cache[(task.regime, task.seed)]
    model1_dir = Path(cmp.results_dir) / ".work" / task.regime / f"seed{task.seed}" / "model1"
    logits_file = model1_dir.parent / "model1_logits.pt"
    with tempfile.TemporaryDirectory(prefix="hfens-fair-") as tmp:
        trainer, seconds = train_members(task, train, data, Path(tmp), model1_dir)
        plan = trainer.plan
        per_member = [plan.model1_steps] + [plan.cycle_steps] * (plan.num_members - 1)
        record: dict = {
            "train_seconds": seconds,
            "steps_per_member": per_member,
            "total_steps": sum(per_member),
        }
        if task.method == "starsse":
            record["steps_trained_here"] = sum(per_member[1:])  # model 1's steps were paid by its own task
        if task.method in ("model1_long", "scratch"):
            metrics, _ = evaluate_model1(member_models(trainer, data)[0], data)
        elif task.method == "model1":
            metrics, logits = evaluate_model1(member_models(trainer, data)[0], data)
            shutil.rmtree(model1_dir, ignore_errors=True)
            shutil.copytree(trainer.member_paths[0], model1_dir)
            torch.save({"logits": logits}, logits_file)
        else:
            model1 = torch.load(logits_file, weights_only=True) if task.method != "local_de" else None
            extra = {}
            if task.method == "sse":  # model 1 re-trained in-run: reuse the shared logits only if identical
                extra["sse/model1_max_abs_diff"] = _max_abs_diff(Path(trainer.member_paths[0]), model1_dir)
                if extra["sse/model1_max_abs_diff"] != 0.0:
                    model1 = None
            metrics = {**evaluate_members(task, trainer, data, model1), **extra}
        record["metrics"] = metrics
    record["sizes"] = data.sizes
    return record


# ------------------------------------------------------------------------------------------------ workers


def read_records(results_dir: str | Path) -> list[dict]:
    records = []
    for path in sorted(Path(results_dir).glob("runs-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def _claim(claims: Path, task: Task) -> bool:
    path = claims / (task.key.replace("/", "__") + ".claim")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _append(cmp: CompareArguments, task: Task, record: dict) -> None:
    line = {"key": task.key, **asdict(task), **record}
    path = Path(cmp.results_dir) / f"runs-{task.regime}-seed{task.seed}.jsonl"
    with path.open("a") as f:  # one line per write: appends from several workers do not interleave
        f.write(json.dumps(line, default=float) + "\n")


def _second_script(cmp: CompareArguments, script: ScriptArguments) -> ScriptArguments:
    second = copy.deepcopy(script)
    second.classes = list(cmp.second_regime_classes)
    second.pretrain_config = cmp.second_regime_pretrain_config
    return second


def work(cmp: CompareArguments, script: ScriptArguments, train: StarSSEConfig) -> None:
    """One worker: take the first unclaimed task whose inputs exist, until every phase is done."""
    torch.set_num_threads(1)
    results, claims = Path(cmp.results_dir), Path(cmp.results_dir) / ".work" / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    scripts = {"main": script, "second": _second_script(cmp, script)}
    cache: dict = {}

    def done() -> set[str]:
        return {r["key"] for r in read_records(results)}

    def ready(task: Task, finished: set[str]) -> bool:
        if task.method in ("starsse", "sse"):
            return Task(task.regime, task.seed, "model1").key in finished
        return True

    def drain(tasks: list[Task]) -> None:
        """Run unclaimed, ready tasks; return once every task is finished (by this or another worker)."""
        while True:
            finished = done()
            pending = [t for t in tasks if t.key not in finished]
            if not pending:
                return
            task = next((t for t in pending if ready(t, finished) and _claim(claims, t)), None)
            if task is None:  # the rest runs elsewhere, or waits for its model 1
                time.sleep(5)
                continue
            began = time.perf_counter()
            record = run_task(task, cmp, scripts[task.regime], train, cache)
            record["seconds"] = time.perf_counter() - began
            _append(cmp, task, record)
            print(f"[compare w{cmp.worker_index}] {task.key}: {record['seconds']:.0f}s", flush=True)

    drain(grid_tasks(cmp) + independent_tasks(cmp))  # returns once the whole grid is finished
    chosen = choose_settings(read_records(results), cmp)
    drain(chosen_tasks(cmp, chosen) + convergence_tasks(cmp))


def launch_workers(cmp: CompareArguments, argv: list[str]) -> None:
    claims = Path(cmp.results_dir) / ".work" / "claims"
    shutil.rmtree(claims, ignore_errors=True)  # unfinished claims of a killed run are re-run
    claims.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "recipes.compare_methods", *argv, "--worker_index", str(i)], env=env
        )
        for i in range(cmp.workers)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"compare_methods: a worker failed (exit codes {codes}).")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmp, script, train = parse_config_and_args((CompareArguments, ScriptArguments, StarSSEConfig), argv)
    Path(cmp.results_dir).mkdir(parents=True, exist_ok=True)
    if cmp.worker_index >= 0:
        work(cmp, script, train)
        return
    if not cmp.report_only:
        launch_workers(cmp, argv)
        shutil.rmtree(Path(cmp.results_dir) / ".work", ignore_errors=True)
    from recipes.report_results import write_report

    write_report(read_records(cmp.results_dir), cmp, train.num_train_epochs)


if __name__ == "__main__":
    run_cli(main)
