"""The fair comparison's statistics and bookkeeping (recipes/compare_methods.py, recipes/report_results.py):
t intervals for any number of seeds, settings chosen on held-out never on test, paired-by-seed contrasts
against model 1, task keys and member seeds that never collide."""

from __future__ import annotations

import math
import statistics

import pytest
from hf_ens.trainers.branches import branch_seed

from recipes.compare_methods import CompareArguments, Task, choose_settings, grid_tasks
from recipes.report_results import choose, demo_criterion, mean_ci, paired, t_quantile


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062), (4, 2.7764), (11, 2.2010), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_interval_uses_t_past_eleven_seeds_not_the_normal_1_96():
    values = [0.1 * i for i in range(12)]
    mean, half = mean_ci(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert half == pytest.approx(2.2010 * statistics.stdev(values) / math.sqrt(12), rel=1e-4)
    assert math.isnan(mean_ci([1.0])[1])


def _rec(method, seed, mult=1.0, factor=1.0, regime="main", **metrics):
    return {"regime": regime, "method": method, "seed": seed, "cycle_factor": factor, "mult": mult,
            "metrics": metrics}  # fmt: skip


def _grid(seeds=(0, 1, 2)):
    """x1 is best on held-out, x4 is best on TEST: a selection that peeks at test picks x4."""
    model1 = {"member_0/nll": 0.80, "held_out/member_0/accuracy": 0.79, "held_out/member_0/nll": 0.6}
    recs = [_rec("model1", s, **{"member_0/accuracy": 0.70 + s / 100, **model1}) for s in seeds]
    for s in seeds:
        recs.append(_rec("starsse", s, 1.0, **{"held_out/ensemble/nll": 0.50, "ensemble/nll": 0.70,
                    "ensemble/accuracy": 0.72 + s / 100, "soup/accuracy": 0.71 + s / 100,
                    "held_out/ensemble/accuracy": 0.80, "held_out/soup/accuracy": 0.795}))  # fmt: skip
        recs.append(_rec("starsse", s, 4.0, **{"held_out/ensemble/nll": 0.60, "ensemble/nll": 0.40,
                    "ensemble/accuracy": 0.90, "soup/accuracy": 0.5, "held_out/ensemble/accuracy": 0.7,
                    "held_out/soup/accuracy": 0.5}))  # fmt: skip
    return recs


def test_settings_are_chosen_on_held_out_not_on_test():
    records = _grid()
    assert choose(records, [0, 1, 2], "held_out/ensemble/nll") == {"starsse": "starsse/F=1E/x1"}
    cmp = CompareArguments(seeds=[0, 1, 2], contrast_seeds=[5])
    assert choose_settings(records, cmp) == {"starsse": (1.0, 1.0)}
    # a setting missing on one grid seed cannot win
    partial = [r for r in records if not (r["mult"] == 1.0 and r["seed"] == 2 and r["method"] == "starsse")]
    assert choose(partial, [0, 1, 2], "held_out/ensemble/nll") == {"starsse": "starsse/F=1E/x4"}


def test_paired_contrast_against_model1_takes_model1_from_its_own_record():
    records = _grid()
    p = paired(records, "main", "starsse/F=1E/x1", "ensemble/accuracy", "model1", "ensemble/accuracy")
    assert p["n"] == 3 and p["wins"] == 3
    assert p["diffs"] == pytest.approx([0.02, 0.02, 0.02])
    assert p["mean"] == pytest.approx(0.02) and p["half"] == pytest.approx(0.0, abs=1e-12)


def test_demo_criterion_counts_seeds_on_held_out_and_test_separately():
    _, counts = demo_criterion(_grid(), [0, 1, 2])
    x1, x4 = counts["starsse/F=1E/x1"], counts["starsse/F=1E/x4"]
    assert (x1["held_out"], x1["test"], x1["n"]) == (3, 3, 3)  # acc up, NLL down, soup >= model 1
    assert (x4["held_out"], x4["test"]) == (0, 0)  # soup far below model 1


def test_task_keys_are_unique_and_member_seeds_never_collide():
    cmp = CompareArguments()
    keys = [t.key for t in grid_tasks(cmp)]
    assert len(keys) == len(set(keys)) == 5 * (2 + 2 * (7 + 3))
    assert Task("main", 0, "sse", 0.5, 4.0).key == "main/sse/F=0.5E/x4/seed=0"
    seeds = list(range(10))
    member_seeds = [branch_seed(s, k) for s in seeds for k in range(1, 5)]
    assert len(set(member_seeds)) == len(member_seeds)
    assert not set(member_seeds) & set(seeds)  # no member shares a replicate's model-1 seed


def test_contrast_and_grid_seeds_may_not_overlap():
    with pytest.raises(ValueError, match="overlap"):
        CompareArguments(seeds=[0, 1], contrast_seeds=[1, 2])


def test_phases_decide_which_tasks_exist_and_the_grid_is_required():
    from recipes.compare_methods import chosen_tasks, convergence_tasks, independent_tasks

    full = CompareArguments(seeds=[0, 1], contrast_seeds=[5])
    assert {t.regime for t in independent_tasks(full)} == {"main", "second"}
    assert convergence_tasks(full) and {t.seed for t in chosen_tasks(full, {"starsse": (0.5, 1.0)})} == {
        0,
        1,
        2,
        3,
        4,
        5,
    }  # fmt: skip  (second-regime seeds 0-4, contrast seed 5)
    grid_only = CompareArguments(seeds=[0, 1], contrast_seeds=[5], phases=["grid"])
    assert independent_tasks(grid_only) == [] and convergence_tasks(grid_only) == []
    assert chosen_tasks(grid_only, {"starsse": (0.5, 1.0)}) == []
    assert len(grid_tasks(grid_only)) == len(grid_tasks(full))
    with pytest.raises(ValueError, match="grid"):
        CompareArguments(phases=["contrasts"])


def test_a_grid_only_report_has_no_sections_of_phases_not_run(tmp_path):
    """On the committed records of two grid seeds (real runs), read as a grid-only comparison."""
    from pathlib import Path

    from recipes.compare_methods import read_records
    from recipes.report_results import write_report

    fair = Path(__file__).resolve().parent.parent / "docs" / "results" / "fair"
    records = [r for r in read_records(fair) if r["regime"] == "main" and r["seed"] in (0, 1)]
    cmp = CompareArguments(seeds=[0, 1], contrast_seeds=[5], phases=["grid"], results_dir=str(tmp_path))
    text = write_report(records, cmp, 15).read_text()
    assert "## Grid" in text and "grid seeds only ([0, 1])" in text and "starsse/F=0.5E/x1 (n=2)" in text
    assert "second regime" not in text and "P1" not in text and "seeds [0, 1, 5]" not in text


def test_report_shows_the_other_selection_metric_and_equal_settings_from_the_records(tmp_path):
    """The StarSSE − SSE verdict flips with the selection metric: the report carries both and the
    equal-settings rows, computed from the committed grid records (numbers of docs/results.md (b))."""
    from pathlib import Path

    from recipes.compare_methods import read_records
    from recipes.report_results import equal_settings_table, write_report

    fair = Path(__file__).resolve().parent.parent / "docs" / "results" / "fair"
    records = [r for r in read_records(fair) if r["regime"] == "main" and r["seed"] in range(5)]
    assert choose(records, list(range(5)), "held_out/ensemble/accuracy") == {
        "starsse": "starsse/F=0.5E/x0.5",
        "sse": "sse/F=0.5E/x1",
    }
    nll_pick = paired(
        records, "main", "starsse/F=1E/x2", "ensemble/accuracy", "sse/F=1E/x4", "ensemble/accuracy"
    )
    acc_pick = paired(
        records, "main", "starsse/F=0.5E/x0.5", "ensemble/accuracy", "sse/F=0.5E/x1", "ensemble/accuracy"
    )
    assert nll_pick["wins"] == 5 and nll_pick["mean"] > 0  # StarSSE ahead at the held-out-NLL choices ...
    assert acc_pick["wins"] == 0 and acc_pick["mean"] == pytest.approx(
        -0.00268, abs=1e-5
    )  # ... behind at acc's
    table = equal_settings_table(records, "main", list(range(5)))
    assert "| F=1E/x1 | +0.39 ± 0.54 (3/5) |" in table and "| F=0.5E/x1 | -0.12 ± 0.19 (1/5) |" in table
    assert "x2" not in table  # SSE never ran StarSSE's 2x: no row pretends it did
    cmp = CompareArguments(
        seeds=list(range(5)), contrast_seeds=[5], phases=["grid"], results_dir=str(tmp_path)
    )
    text = write_report(records, cmp, 15).read_text()
    assert "chosen on held-out `held_out/ensemble/accuracy` instead" in text and "at equal settings" in text


def test_report_results_rebuilds_every_committed_table_from_the_committed_records(tmp_path, monkeypatch):
    """`python recipes/report_results.py` regenerates docs/results/*/tables.md byte for byte from the raw
    records beside them (a table edited by hand, or records that no longer give it, fail here)."""
    import shutil

    from recipes.report_results import COMPARISONS, main
    from tests._recipe_utils import ROOT

    shutil.copytree(ROOT / "docs" / "results", tmp_path / "docs" / "results")
    shutil.copytree(ROOT / "recipes" / "configs", tmp_path / "recipes" / "configs")
    folders = [tmp_path / "docs" / "results" / f for f in ("fair", "second_sweep", "lora", "study")]
    folders = [f for f in folders if (f / "tables.md").exists()]
    assert len(folders) >= len(COMPARISONS)
    for folder in folders:
        (folder / "tables.md").unlink()
    monkeypatch.chdir(tmp_path)
    main([])
    for folder in folders:
        committed = ROOT / "docs" / "results" / folder.name / "tables.md"
        assert (folder / "tables.md").read_text() == committed.read_text(), folder.name
