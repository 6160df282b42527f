"""The basin guard: choose the cycle LR after model 1 from short probes (``cycle_learning_rate="auto"``).

Too low a cycle LR gives members that copy model 1, too high a one leaves the pre-train basin and loses the
transfer benefit (Sadrtdinov et al., NeurIPS 2023). So once model 1 exists, the run tries the candidates of
``cycle_lr_grid`` (multiples of ``learning_rate``), each as a *probe*: a short cycle from
model 1 with the cycles' shape (warmup + cosine, ``probe_steps`` long), a fresh optimizer and its own seed,
``probe_seed(seed, i)``. Each probe's end is judged on the trainer's ``eval_dataset`` against model 1:

* the loss barrier of the straight path model 1 -> probe end (``hf_ens.basin.barrier``: the largest excess of
  the path over the line between its ends, at ``PATH_POINTS`` evenly spaced points, BatchNorm statistics
  recomputed at every point as the soups do). LoRA members are judged on their merged weights
  (``W0 + scale B A`` and the head, ``hf_ens.basin.whole_model``): the path is the straight line between the
  merged model 1 and the merged probe end, never the model of linearly interpolated ``A`` and ``B`` factors
  (their product has a cross term: a curve in weight space, not the line a soup lies on);
* the probe's eval loss and error vs model 1's.

A probe stays in the basin when its barrier is at most ``basin_tolerance`` x model 1's eval loss and, as a
backstop for paths that rise without a bump, its eval loss is at most ``probe_loss_ratio`` x model 1's. The
probe's own loss is no tighter signal: a probe is short and unconverged, so on the offline task even 0.25x
ended 10% above model 1 while the swept members at 1-2x were the best ensembles (docs/results.md).
The chosen LR is the candidate just below the smallest one known to leave (or diverge), once that one is
probed and stays (the smallest candidate, with a warning, if even that one left). ``probe_search`` decides
which candidates are probed (``next_probes``): ``"bisect"`` (default) halves the bracket each round, assuming
that the barrier grows with the LR (3 probes for the default 7 candidates instead of up to 7: the probes'
path evaluations dominated the guard's cost); ``"linear"`` probes in increasing order up to the first
failure, so a grid whose outcome is not monotone is cut at its first failure, never stepped over, and the
table holds every candidate up to it (as calibration wants).

``basin_guard=True`` makes the guard a safety net for a numeric ``cycle_learning_rate``: the candidates are
the grid's multipliers below the set one plus the set one, and the set one is probed first; if it stays in the
basin it is kept (one probe: no search), else the search above runs below it. So the guard only steps in when
the set LR would leave the basin (docs/results.md: on the offline study the default 1x never left it, where
``"auto"`` moved to 2x in 7 of 10 replicates and cost the soup accuracy).

Probes are branches (``trainers.branches``): trained alone in a process with the member batch, so with N
processes N of them run per round. The choice does not depend on N for a monotone grid (nor ever under
``"linear"``); which candidates are probed does under ``"bisect"``. Everything a probe changes
(weights, global RNG states) is put back afterwards, so the cycles that follow are those of a run with the
chosen LR set by hand. The result (a JSON-ready dict) goes into checkpoints, ``ensemble_config``
metadata, the model card and ``{output_dir}/basin_probe.json``.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers.trainer_utils import set_seed
from transformers.utils import logging

from hf_ens.basin import barrier, interpolation_profile, whole_model
from hf_ens.checks import nonfinite_tensors
from hf_ens.evaluation import evaluate_loss_error
from hf_ens.soups import has_batchnorm, recompute_batchnorm

from .branches import BranchData, accumulate_gradients, apply_update, rng_state, set_rng_state
from .checkpoints import PROBE_FILE  # noqa: F401 - its home was here
from .cycles import probe_seed
from .schedule import CyclePlan, cosine_cycle_factor

logger = logging.get_logger("transformers.trainer.probe")

PATH_POINTS = 5  # alphas 0, 0.25, 0.5, 0.75, 1 on the path model 1 -> probe end
BN_BATCHES = 32  # training batches that re-estimate BatchNorm statistics at each path point


def probe_steps(args, cycle_steps: int) -> int:
    """Optimizer steps of one probe: ``probe_fraction`` of a cycle, and at most 1/len(grid) of it, so that all
    probes together never cost more than one cycle."""
    fraction = min(args.probe_fraction, 1.0 / len(args.cycle_lr_grid))
    steps = math.floor(fraction * cycle_steps)
    if steps < 1:
        raise ValueError(
            f"the basin guard ({args.guard_mode}): a cycle of {cycle_steps} optimizer steps is too short for "
            f"{len(args.cycle_lr_grid)} probes of at most {fraction:.3g} of a cycle each; lengthen "
            "cycle_epochs, raise probe_fraction or shorten cycle_lr_grid."
        )
    return steps


def probe_warmup_steps(plan: CyclePlan, steps: int) -> int:
    """The cycles' warmup scaled to the probe: the same fraction of it, always leaving one annealing step."""
    if plan.cycle_warmup_steps == 0:
        return 0
    return min(steps - 1, math.ceil(plan.cycle_warmup_steps / plan.cycle_steps * steps))


def in_basin(row: dict[str, Any], model1_loss: float, tolerance: float, loss_ratio: float) -> bool:
    """The decision: a barrier within ``tolerance`` x model 1's eval loss, an eval loss within
    ``loss_ratio`` x model 1's, and no divergence."""
    if row["diverged"]:
        return False
    return row["loss_barrier"] <= tolerance * model1_loss and row["eval_loss"] <= loss_ratio * model1_loss


def candidates(args) -> list[float]:
    """The multipliers the guard may choose: ``cycle_lr_grid`` (``"auto"``), or, as a safety net
    (``basin_guard``), the grid's multipliers below the set cycle LR's and that one last."""
    if not args.basin_guard:
        return list(args.cycle_lr_grid)
    mult = args.cycle_learning_rate / args.learning_rate
    return [m for m in args.cycle_lr_grid if m < mult * (1 - 1e-9)] + [mult]


def next_probes(probed: dict[int, dict[str, Any]], n: int, world: int, search: str) -> list[int]:
    """Grid indices to probe next (at most `world`, one per process), or [] once the choice is known.

    The choice is the candidate below the smallest index known to leave (``hi``), once every index between it
    and the largest one known to stay below ``hi`` (``lo``) is probed. ``"linear"`` probes the next indices
    in order; ``"bisect"`` splits (lo, hi) evenly, assuming the barrier grows with the LR: ceil(log2(n + 1))
    probes for one process instead of up to n. A non-monotone grid can hide a failure from bisection, never
    from linear search.
    """
    hi = min((i for i, row in probed.items() if not row["in_basin"]), default=n)
    lo = max((i for i, row in probed.items() if row["in_basin"] and i < hi), default=-1)
    if hi - lo <= 1:
        return []
    if search == "linear":
        return list(range(lo + 1, min(lo + 1 + world, hi)))
    return sorted({lo + k * (hi - lo) // (world + 1) for k in range(1, world + 1)} - {lo, hi})


def choose(table: list[dict[str, Any]]) -> tuple[int, str]:
    """(index of the chosen row, why): the last row before the first one outside the basin (`table` sorted by
    multiplier; `next_probes` probes until that row is the grid neighbour of the failing one)."""
    cut = next((i for i, row in enumerate(table) if not row["in_basin"]), len(table))
    if cut == 0:
        return 0, "every probed LR left the basin; the smallest candidate is used"
    if cut == len(table):
        return cut - 1, "every candidate stayed in the basin; the largest is used"
    return cut - 1, f"x{table[cut]['multiplier']:g} left the basin; the largest LR below it is used"


class ProbeRun:
    """Runs the probes of one trainer from model 1 (the trainer's current weights) and chooses the LR."""

    def __init__(self, trainer):
        args = trainer.args
        check_eval_dataset(trainer.eval_dataset)
        self.trainer, self.args, self.plan = trainer, args, trainer.plan
        self.steps = probe_steps(args, self.plan.cycle_steps)
        self.warmup = probe_warmup_steps(self.plan, self.steps)
        self.alphas = [i / (PATH_POINTS - 1) for i in range(PATH_POINTS)]
        self.data = BranchData.from_trainer(trainer)
        eval_loader = trainer.get_eval_dataloader()
        # this process alone evaluates the whole set (the Trainer's loader is sharded across processes), in
        # batches at least as large as the members' training batches (no gradients: they fit); the Trainer's
        # default eval batch of 8 made the probes' path evaluations ~1.6x slower on the offline task
        self.eval_batches = DataLoader(
            eval_loader.dataset,
            batch_size=max(args.eval_batch_size, self.data.batch_size),
            collate_fn=eval_loader.collate_fn,
            num_workers=args.dataloader_num_workers,
        )
        self.bn_batches = None
        if has_batchnorm(trainer.model):
            self.bn_batches = DataLoader(
                self.data.dataset, batch_size=self.data.batch_size, collate_fn=self.data.collate_fn
            )

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Eval loss (nats) and error of `model` through the library's one evaluation path
        (`hf_ens.evaluation.evaluate_loss_error`: a causal LM per next token, shifted labels, ``-100`` padding
        ignored; a token classifier per token, unshifted), BatchNorm statistics recomputed first."""
        with self.trainer.accelerator.autocast():
            if self.bn_batches is not None:
                recompute_batchnorm(model, self.bn_batches, max_batches=BN_BATCHES)
            return evaluate_loss_error(model, self.eval_batches)

    def run(self) -> dict[str, Any]:
        """Probe (``probe_search``) until the largest LR in the basin is known; the result, JSON-ready."""
        trainer, args = self.trainer, self.args
        began = time.perf_counter()
        model = trainer.model
        rng = rng_state()
        model1_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # the path's end the probes share, as whole weights: a LoRA model 1 merged (W0 + scale B A and its
        # head), which the path to each probe's merged end then interpolates (hf_ens.basin.whole_model)
        merged = whole_model(model)
        model1 = (copy.deepcopy(model) if merged is model else merged).eval()
        model1_metrics = self.evaluate(copy.deepcopy(model1))
        grid, world, rank = candidates(args), args.world_size, args.process_index
        probed: dict[int, dict[str, Any]] = {}
        try:
            while True:  # one round: up to `world` probes, one per process
                todo = next_probes(probed, len(grid), world, args.probe_search)
                if args.basin_guard and not probed:
                    todo = [len(grid) - 1]  # the safety net: the set LR first, kept if it stays
                if not todo:
                    break
                mine = [i for j, i in enumerate(todo) if j % world == rank]
                rows = [self._probe(i, grid[i], model1, model1_state, model1_metrics) for i in mine]
                probed.update({row["index"]: row for row in _gather(rows, world)})
        finally:
            model.load_state_dict(model1_state, strict=True)
            model.zero_grad(set_to_none=True)
            model.train()
            set_rng_state(rng)
        table = [probed[i] for i in sorted(probed)]
        chosen, why = choose(table)
        if args.basin_guard and len(table) == 1 and table[0]["in_basin"]:
            why = "the set cycle LR stays in the basin; kept"
        elif args.basin_guard and table[chosen]["in_basin"]:
            why = f"the set x{grid[-1]:g} left the basin; the largest grid LR below it that stays is used"
        for i, row in enumerate(table):
            row["chosen"] = i == chosen
        multiplier = table[chosen]["multiplier"]
        if not table[chosen]["in_basin"]:
            warnings.warn(
                f"the basin guard ({args.guard_mode}): even x{multiplier:g} (its smallest candidate) left "
                f"the basin (basin_tolerance={args.basin_tolerance:g}, "
                f"probe_loss_ratio={args.probe_loss_ratio:g}); "
                "training with it anyway. Add smaller multipliers to cycle_lr_grid or raise basin_tolerance.",
                stacklevel=2,
            )
        result = {
            "mode": args.guard_mode,
            "cycle_lr_grid": grid,
            "probe_search": args.probe_search,
            "chosen_multiplier": multiplier,
            "cycle_learning_rate": multiplier * args.learning_rate,
            "reason": why,
            "basin_tolerance": args.basin_tolerance,
            "probe_loss_ratio": args.probe_loss_ratio,
            "probe_steps": self.steps,
            "probe_warmup_steps": self.warmup,
            "cycle_steps": self.plan.cycle_steps,
            "path_points": PATH_POINTS,
            "eval_samples": len(self.eval_batches.dataset)
            if hasattr(self.eval_batches.dataset, "__len__")
            else None,
            "model1": {"eval_loss": model1_metrics["loss"], "eval_error": model1_metrics["error"]},
            "table": table,
            "seconds": time.perf_counter() - began,
        }
        logger.info(format_table(result))
        return result

    def _probe(self, i: int, multiplier: float, model1, model1_state, model1_metrics) -> dict[str, Any]:
        """Train probe i from model 1 at ``multiplier`` x learning_rate, then measure the path to it."""
        trainer, args, model = self.trainer, self.args, self.trainer.model
        began = time.perf_counter()
        model.load_state_dict(model1_state, strict=True)
        seed = probe_seed(args.seed, i)
        set_seed(seed)
        optimizer = _fresh_optimizer(trainer)
        steps, warmup = self.steps, self.warmup
        scheduler = trainer.new_lr_scheduler(
            optimizer, lambda s: multiplier * cosine_cycle_factor(s, steps, warmup)
        )
        model.train()
        diverged, losses = False, []
        data_seed = probe_seed(self.data.seed, i)
        for step, micro_batches in self.data.steps(0, 0, steps, seed=data_seed):
            scheduler.sync(step)
            loss = accumulate_gradients(trainer, model, micro_batches)
            if not bool(torch.isfinite(loss)):
                diverged = True
                break
            apply_update(args, model, optimizer)
            losses.append(float(loss))
        model.zero_grad(set_to_none=True)
        del optimizer, scheduler
        row: dict[str, Any] = {
            "index": i,
            "multiplier": multiplier,
            "learning_rate": multiplier * args.learning_rate,
            "steps": steps,
            "train_loss": sum(losses) / len(losses) if losses else None,
            "diverged": diverged or bool(nonfinite_tensors(model)),
        }
        if not row["diverged"]:
            profile = interpolation_profile(model1, model, self.evaluate, alphas=self.alphas[1:])
            losses_on_path = [model1_metrics["loss"], *profile["loss"]]
            errors_on_path = [model1_metrics["error"], *profile["error"]]
            row["diverged"] = not all(map(math.isfinite, losses_on_path))  # e.g. overflowing logits
        if row["diverged"]:
            # no number describes a diverged probe; None keeps the JSON strict
            row.update(loss_barrier=None, error_barrier=None, eval_loss=None, eval_error=None)
        else:
            row.update(
                loss_barrier=barrier(losses_on_path, self.alphas),
                error_barrier=barrier(errors_on_path, self.alphas),
                eval_loss=losses_on_path[-1],
                eval_error=errors_on_path[-1],
                path_loss=losses_on_path,
                path_error=errors_on_path,
            )
        row["in_basin"] = in_basin(row, model1_metrics["loss"], args.basin_tolerance, args.probe_loss_ratio)
        row["seconds"] = time.perf_counter() - began
        return row


def check_eval_dataset(eval_dataset) -> None:
    """The probes need ONE held-out set: refused before training otherwise."""
    if eval_dataset is None:
        raise ValueError(
            "cycle_learning_rate='auto' judges its probe cycles on held-out data: pass eval_dataset=<a "
            "held-out split of the training data> to the trainer (never the test split), or set a numeric "
            "cycle_learning_rate."
        )
    if isinstance(eval_dataset, dict):
        raise ValueError(
            "cycle_learning_rate='auto' judges the probes on ONE eval_dataset, got a dict of "
            f"{len(eval_dataset)}; pass the held-out split alone."
        )


def format_table(result: dict[str, Any]) -> str:
    """The probe table as text, for logs and the recipe's output."""
    model1 = result["model1"]
    lines = [
        f"basin probe: {len(result['table'])} probe(s) of {result['probe_steps']} steps "
        f"(cycle: {result['cycle_steps']}); in the basin: barrier <= {result['basin_tolerance']:g} x and "
        f"eval loss <= {result.get('probe_loss_ratio', math.inf):g} x model 1's eval loss "
        f"{model1['eval_loss']:.4f} (error {100 * model1['eval_error']:.2f}%)",
        f"{'x LR':>8}{'LR':>11}{'barrier':>10}{'eval loss':>11}{'eval err %':>12}{'in basin':>10}",
    ]
    for row in result["table"]:
        mark = "  <- chosen" if row.get("chosen") else ""
        if row["diverged"]:
            numbers = f"{'diverged':>33}"
        else:
            numbers = f"{row['loss_barrier']:>10.4f}{row['eval_loss']:>11.4f}{100 * row['eval_error']:>12.2f}"
        lines.append(
            f"{row['multiplier']:>8g}{row['learning_rate']:>11.3g}{numbers}{str(row['in_basin']):>10}{mark}"
        )
    lines.append(
        f"chosen cycle_learning_rate = x{result['chosen_multiplier']:g} = "
        f"{result['cycle_learning_rate']:.4g} ({result['reason']}; probes took {result['seconds']:.1f} s)"
    )
    return "\n".join(lines)


def _fresh_optimizer(trainer) -> torch.optim.Optimizer:
    """A new optimizer built the way the Trainer builds its own, leaving the Trainer's one untouched."""
    saved = trainer.optimizer
    trainer.optimizer = None
    try:
        return trainer.create_optimizer()
    finally:
        trainer.optimizer = saved


def _gather(rows: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """Every process's rows, on every process."""
    if world == 1:
        return rows
    from accelerate.utils import gather_object

    return list(gather_object(rows))
