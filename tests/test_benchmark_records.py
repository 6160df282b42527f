"""The benchmark records in docs/results/benchmarks/ and the figures the docs quote from them.

Every record parses and says what ran (command, date, commit, machine, settings, figures); every figure that
docs/benchmarks.md and the feature pages quote is in its record (``QUOTED``: the doc, the record, the key
path and how the doc writes it); and ``--json`` works (a cheap benchmark writes a record to a temporary path).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "results" / "benchmarks"
BENCH, LORA, LM = "docs/benchmarks.md", "docs/lora.md", "docs/language_models.md"
DOCS = (BENCH, LORA, LM, "docs/ensembles.md", "docs/basin.md", "docs/data_path.md")
LM_MID, LM_TINY = "lm_ensemble_generate_mid.json", "lm_ensemble_generate_tiny.json"
DEMO, PRE = "lora_ensemble_demo_vit.json", "bench_offline_pretrain.json"
PM, TO, DP = "parallel_members.json", "trainer_overhead.json", "docs/data_path.md"
LM_1 = "lm_ensemble_generate_mid_1thread.json"

# (doc, record, key path under "figures", how the doc writes the figure: a format string)
QUOTED: list[tuple[str, str, tuple, str]] = [
    # docs/benchmarks.md
    (BENCH, TO, ("wall_ratio_median",), "median {:.3f}, load-robust"),
    (BENCH, TO, ("load_robust_ratio_median",), "(median step times) {:.3f}"),
    (BENCH, TO, ("snapshot_share_of_cycle_percent_median",), "cycle starts {:.2f}% of a cycle"),
    (BENCH, "data_path_thp0.json", ("evaluation", "tensor_over_processor"), "evaluation {:.1f}x, training"),
    (BENCH, "data_path_thp0.json", ("training", "tensor_over_processor"), "training {:.1f}x |"),
    (BENCH, LM_1, ("batch_1", "batched", "relative_to_one_model"), "batch 1 batched {:.2f}x"),
    (BENCH, LM_1, ("batch_8", "batched", "relative_to_one_model"), "batch 8 batched {:.2f}x"),
    (BENCH, LM_1, ("batch_8", "member loop", "relative_to_one_model"), "(member loop {:.2f}x)"),
    (BENCH, "ensemble_inference.json", ("ensemble_over_k_single",), "ensemble / (K x single) {:.3f}"),
    (BENCH, "ensemble_inference.json", ("ensemble_over_k_single_median_based",), "(median-based {:.3f})"),
    (BENCH, "ensemble_inference.json", ("soup_over_single",), "soup / single {:.3f}"),
    (BENCH, "ensemble_inference.json", ("ensemble_over_k_member_forwards",), "K member forwards {:.3f}"),
    (BENCH, "soup_memory.json", ("member_state_dict_mib",), "8 member dirs of a {:.1f} MiB ViT"),
    (BENCH, "soup_memory.json", ("uniform", "peak_over_state_dict"), "uniform {:.2f}x in"),
    (BENCH, "soup_memory.json", ("uniform", "seconds"), "x in {:.1f} s, greedy"),
    (BENCH, "soup_memory.json", ("greedy", "peak_over_state_dict"), "greedy {:.2f}x in"),
    (BENCH, "soup_memory.json", ("greedy", "seconds"), "x in {:.1f} s |"),
    (BENCH, PM, ("speedup_n_processes_over_1",), "2 processes {:.2f}x faster than 1"),
    (BENCH, PM, ("parallel_over_data_parallel",), "parallel members {:.2f}x the speed"),
    (BENCH, PM, ("branch_phase_seconds", "1 process, branches in turn"), "| {:.2f} s / "),
    (BENCH, PM, ("branch_phase_seconds", "2 processes, parallel branches"), "s / {:.2f} s /"),
    (BENCH, PM, ("branch_phase_seconds", "2 processes, data-parallel branches"), "/ {:.2f} s:"),
    (BENCH, "data_path.json", ("evaluation", "processor_images_per_s"), "evaluation {:,.0f} vs"),
    (BENCH, "data_path.json", ("evaluation", "tensor_images_per_s"), "vs {:,.0f} images/s"),
    (BENCH, "data_path.json", ("training", "tensor_images_per_s"), "vs {:,.0f} ("),
    (BENCH, "data_path.json", ("evaluation", "tensor_over_processor"), "images/s ({:.1f}x)"),
    (BENCH, "data_path.json", ("training", "processor_images_per_s"), "crop + flip {:,.0f} vs"),
    (BENCH, "data_path.json", ("training", "tensor_over_processor"), "({:.1f}x); the CPU's share"),
    (BENCH, "data_path.json", ("gpu_step_cpu_share", "over_processor_training"), "uint8 batches): {:.0f}x"),
    (
        BENCH,
        "lora_ensemble.json",
        ("disk", "lora_repo_over_one_model"),
        "LoRA repo {:.2f}x one model on disk",
    ),
    (BENCH, "lora_ensemble.json", ("disk", "full_repo_over_one_model"), "(full members {:.2f}x)"),
    (BENCH, "lora_ensemble.json", ("peak_memory", "lora_ensemble_over_one_model"), "peak memory {:.2f}x one"),
    (BENCH, "lora_ensemble.json", ("peak_memory", "full_ensemble_over_one_model"), "(full {:.2f}x)"),
    (BENCH, "lora_ensemble.json", ("inference", "ensemble_over_k_one_lora_model"), "LoRA model) {:.3f} |"),
    (BENCH, LM_TINY, ("batch_8", "member loop", "relative_to_one_model"), "member loop {:.2f}x, batched"),
    (BENCH, LM_TINY, ("batch_8", "batched", "relative_to_one_model"), "batched {:.2f}x one model; mid"),
    (BENCH, LM_MID, ("batch_8", "member loop", "relative_to_one_model"), "batch 8: member loop {:.2f}x"),
    (BENCH, LM_MID, ("batch_8", "batched", "relative_to_one_model"), "batched {:.2f}x; mid, one thread"),
    (BENCH, PRE, ("seconds", "load all 70k as Dataset"), "{:.1f} s for all 70k images"),
    (BENCH, PRE, ("seconds", "pre-train (fresh cache)"), "pre-training {:.0f} s wall"),
    (BENCH, PRE, ("pretrain_metrics", "cpu_seconds"), "{:.0f} s of CPU time"),
    (BENCH, PRE, ("pretrain_metrics", "eval_accuracy"), "evaluation split {:.2%}"),
    (BENCH, "basin_guard.json", ("probe_share_mean_percent",), "probes {:.1f}% of the run on average"),
    (BENCH, "basin_guard.json", ("probe_share_max_percent",), "max {:.1f}% |"),
    # docs/lora.md
    (LORA, "lora_ensemble.json", ("disk", "lora_repo_over_one_model"), "**{:.2f} x** one model (one adapter"),
    (LORA, "lora_ensemble.json", ("disk", "lora_repo_mib"), "| {:.1f} MiB = **"),
    (LORA, "lora_ensemble.json", ("disk", "full_repo_mib"), "| {:,.1f} MiB = 6.00 x one model"),
    (LORA, "lora_ensemble.json", ("disk", "full_repo_over_one_model"), "MiB = {:.2f} x one model |"),
    (LORA, "lora_ensemble.json", ("disk", "one_adapter_kib"), "(one adapter: {:,.0f} KiB)"),
    (LORA, "lora_ensemble.json", ("peak_memory", "full_ensemble_over_one_model"), "full ensemble | {:.2f} x"),
    (
        LORA,
        "lora_ensemble.json",
        ("peak_memory", "lora_ensemble_over_one_model"),
        "**{:.2f} x** one model (goal",
    ),
    (LORA, "lora_ensemble.json", ("inference", "ensemble_over_k_one_lora_model"), "**{:.3f}** (min of 10"),
    (
        LORA,
        "lora_ensemble.json",
        ("inference", "ensemble_over_k_one_lora_model_median_based"),
        "based {:.3f}; goal",
    ),
    (LORA, DEMO, ("disk", "full_repo_mib"), "| {:.1f} MiB = 6.00 x |"),
    (LORA, DEMO, ("disk", "lora_repo_over_one_model"), "**{:.2f} x** (adapter"),
    (LORA, DEMO, ("disk", "one_adapter_kib"), "(adapter: {:.0f} KiB)"),
    (LORA, DEMO, ("peak_memory", "full_ensemble_over_one_model"), "one model | {:.2f} x |"),
    (LORA, DEMO, ("peak_memory", "lora_ensemble_over_one_model"), "(goal <= 1.2) | {:.2f} x |"),
    (LORA, DEMO, ("inference", "ensemble_over_k_one_lora_model"), "| {:.3f} (min of 20"),
    (LORA, DEMO, ("inference", "ensemble_over_k_one_lora_model_median_based"), "median-based {:.3f}) |"),
    # docs/language_models.md
    (LM, LM_1, ("batch_1", "one model", "tokens_per_s"), "| 1 | {:.1f} tok/s |"),
    (LM, LM_1, ("batch_8", "one model", "tokens_per_s"), "| 8 | {:.1f} tok/s |"),
    (LM, LM_1, ("batch_1", "member loop", "tokens_per_s"), "| {:.1f} tok/s (0.19x) |"),
    (LM, LM_1, ("batch_1", "member loop", "relative_to_one_model"), "9.5 tok/s ({:.2f}x)"),
    (LM, LM_1, ("batch_1", "batched", "tokens_per_s"), "| {:.1f} tok/s (0.39x) |"),
    (LM, LM_1, ("batch_1", "batched", "relative_to_one_model"), "19.4 tok/s ({:.2f}x)"),
    (LM, LM_1, ("batch_8", "member loop", "tokens_per_s"), "| {:.1f} tok/s (0.18x) |"),
    (LM, LM_1, ("batch_8", "member loop", "relative_to_one_model"), "38.4 tok/s ({:.2f}x)"),
    (LM, LM_1, ("batch_8", "batched", "tokens_per_s"), "| {:.1f} tok/s (0.32x) |"),
    (LM, LM_1, ("batch_8", "batched", "relative_to_one_model"), "65.9 tok/s ({:.2f}x)"),
    (LM, LM_MID, ("batch_8", "batched", "relative_to_one_model"), "batch 8 batched {:.2f}x one model"),
    (LM, LM_MID, ("batch_1", "batched", "relative_to_one_model"), "batched {:.2f}x, slower than"),
    # docs/data_path.md
    (DP, "data_path.json", ("evaluation", "tensor_images_per_s"), "made {:,.0f} evaluation"),
    (DP, "data_path.json", ("training", "tensor_images_per_s"), "evaluation and {:,.0f} training images/s"),
    (DP, "data_path_thp0.json", ("evaluation", "tensor_images_per_s"), "and {:,.0f} and"),
    (DP, "data_path_thp0.json", ("training", "tensor_images_per_s"), "and {:,.0f} without"),
    (DP, "data_path.json", ("training", "processor_images_per_s"), "({:,.0f} and"),
    (DP, "data_path_thp0.json", ("training", "processor_images_per_s"), "and {:,.0f} training images/s)"),
    (DP, "data_path.json", ("training", "tensor_over_processor"), "faster one: {:.1f}x and"),
    (DP, "data_path_thp0.json", ("training", "tensor_over_processor"), "x and {:.1f}x the processor"),
    # docs/ensembles.md, docs/basin.md
    (
        "docs/ensembles.md",
        "soup_memory.json",
        ("uniform", "peak_over_state_dict"),
        "{:.2f} state dicts for 8 members",
    ),
    ("docs/ensembles.md", "soup_memory.json", ("member_state_dict_mib",), "8 members of a {:.1f} MiB ViT"),
    ("docs/ensembles.md", "soup_memory.json", ("greedy", "peak_over_state_dict"), "working model, {:.2f}:"),
    (
        "docs/basin.md",
        "basin_guard.json",
        ("probe_share_mean_percent",),
        "the probes took {:.1f}% of the run",
    ),
    ("docs/basin.md", "basin_guard.json", ("probe_share_max_percent",), "(max {:.1f}%;"),
]


def records() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(RECORDS.glob("*.json"))}


def figure(record: dict, path: tuple):
    value = record["figures"]
    for key in path:
        value = value[key]
    return value


def bare(command: str) -> str:
    """A record's command without ``--json PATH`` and ``--note TEXT`` (as the docs show it)."""
    words, out = iter(shlex.split(command)), []
    for word in words:
        if word in ("--json", "--note"):
            next(words)
        elif not word.startswith(("--json=", "--note=")):
            out.append(word)
    return " ".join(out)


def test_every_record_says_what_ran_where_and_what_it_measured():
    found = records()
    assert len(found) >= 10, sorted(found)
    for name, record in found.items():
        assert record["benchmark"] and name.startswith(record["benchmark"]), name
        assert re.match(r"(\S+=\S+ )*python benchmarks/\w+\.py", record["command"]), name
        assert f"benchmarks/{record['benchmark']}.py" in record["command"], name
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["date"]), name
        assert re.fullmatch(r"[0-9a-f]{40}", record["git"]["commit"]), name
        machine = record["machine"]
        for key in ("cpu", "cores", "torch_threads", "torch", "transformers", "load_average_start"):
            assert machine.get(key) not in (None, ""), (name, key)
        assert "gpu" in machine, name
        assert isinstance(record["settings"], dict) and record["settings"], name
        assert isinstance(record["figures"], dict) and record["figures"], name
        if machine["load_average_start"][0] > 0.5 * machine["cores"]:  # a loaded machine is said so
            assert record["note"] and ("LOAD" in record["note"] or "No training" in record["note"]), name


@pytest.mark.parametrize(("doc", "name", "path", "written"), QUOTED, ids=lambda x: str(x)[:40])
def test_a_quoted_figure_is_the_one_in_its_record(doc, name, path, written):
    text = (ROOT / doc).read_text()
    phrase = written.format(figure(records()[name], path))
    assert phrase in text, f"{doc} does not quote {name}:{'.'.join(path)} as {phrase!r}"


def test_the_docs_link_each_record_they_quote_and_show_its_command():
    quoted = {(doc, name) for doc, name, _, _ in QUOTED}
    found = records()
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for link in re.findall(r"results/benchmarks/([\w.]+\.json)", text):
            assert link in found, f"{doc} links {link}, which is not committed"
        for d, name in quoted:
            if d == doc:
                assert f"results/benchmarks/{name}" in text, f"{doc} quotes {name} without linking it"
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    for name, record in found.items():  # every record is on the benchmarks page, with its command
        assert f"results/benchmarks/{name}" in page, name
        assert bare(record["command"]) in page, f"docs/benchmarks.md lacks the command of {name}"


def test_json_writes_a_record(tmp_path):
    """A real benchmark run with --json: so a broken --json fails here, not when a figure is next recorded."""
    out = tmp_path / "sub" / "record.json"
    cmd = [sys.executable, "benchmarks/ensemble_inference.py", "--num-members", "2", "--batch-size", "2"]
    cmd += ["--layers", "1", "--hidden-size", "32", "--repeats", "2", "--warmup", "0", "--threads", "1"]
    cmd += ["--json", str(out), "--note", "a test"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["benchmark"] == "ensemble_inference" and record["note"] == "a test"
    assert bare(record["command"]).endswith(
        "python benchmarks/ensemble_inference.py --num-members 2 --batch-size 2 --layers 1 --hidden-size 32 "
        "--repeats 2 --warmup 0 --threads 1"
    )
    assert record["settings"]["num_members"] == 2 and "json" not in record["settings"]
    assert record["machine"]["torch_threads"] == 1
    printed = re.search(r"ensemble time / \(K x single\) = ([\d.]+)", run.stdout).group(1)
    assert f"{record['figures']['ensemble_over_k_single']:.3f}" == printed  # the printed figure, as a number


def test_scripts_parse_json_and_note_themselves():
    from benchmarks import _record

    rest, path, note = _record.pop_arguments(
        ["--skip_pretrain", "--json", "a.json", "--note=x y", "--k", "1"]
    )
    assert rest == ["--skip_pretrain", "--k", "1"] and path == "a.json" and note == "x y"
    for script in sorted((ROOT / "benchmarks").glob("[!_]*.py")):
        assert "_record" in script.read_text(), f"{script.name} writes no --json record"


def test_every_number_in_the_figures_column_is_a_quoted_figure():
    """docs/benchmarks.md's "figure" column holds no number that QUOTED does not check against a record."""
    quoted = [w.format(figure(records()[n], p)) for d, n, p, w in QUOTED if d == BENCH]
    rows = [line.split(" | ") for line in (ROOT / BENCH).read_text().splitlines() if line.startswith("| `")]
    assert len(rows) >= 9
    for row in rows:
        for number in re.findall(r"\d{1,3}(?:,\d{3})+|\d+\.\d+", row[2]):
            assert any(number in phrase for phrase in quoted), f"{number} in {row[2][:60]!r} is not checked"
