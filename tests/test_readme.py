"""README.md and the guides in docs/ as a user follows them: every Python snippet runs as written, in order,
and the documented launch commands pass every value accelerate would otherwise warn about.

The snippets share one namespace (the Ensembles guide loads the members the Trainer guide wrote) and get the
names the README and the Trainer guide list: a tiny 2-layer ViT (`model`, `processor`, `pretrained`), a tiny
CIFAR-shaped dataset (`train`, `val`, `test_loader`, `x`) and `compute_metrics`. A snippet that names a Hub
repo (`user/vit-cifar10-starsse`) talks to the local Hub of tests/hub_server.py with the real clients.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest

from tests._recipe_utils import ROOT, save_tiny_vit, tiny_cifar, tiny_processor

README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
# The pages whose Python snippets run here, in this order, after the README's (later pages use earlier names).
GUIDES = ["trainer.md", "ensembles.md", "lora.md", "basin.md"]
# Pages whose snippets another test runs (with names of their own).
GUIDES_TESTED_ELSEWHERE = {
    "language_models.md": "tests/test_ensemble_lm.py",
    "tasks.md": "tests/test_token_classification.py",
}


def _pages() -> dict[str, str]:
    """README.md and every Markdown page of docs/ (results records included), by path relative to the root."""
    pages = {"README.md": README}
    for path in sorted(DOCS.rglob("*.md")):
        pages[str(path.relative_to(ROOT))] = path.read_text()
    return pages


LAUNCH_VALUES = ("--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def bash_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split("#")[0].strip() for line in joined.splitlines() if line.split("#")[0].strip()]
    return commands


def _preamble(tmp_path) -> dict:
    """The names the README's snippets assume, as tiny real objects."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import ViTForImageClassification, default_data_collator

    from hf_ens.metrics import compute_metrics

    torch.manual_seed(0)
    model = ViTForImageClassification.from_pretrained(save_tiny_vit(tmp_path / "checkpoint"))
    processor = tiny_processor()

    def to_features(batch):
        pixels = processor(images=[im.convert("RGB") for im in batch["img"]], return_tensors="np")
        return {"pixel_values": pixels["pixel_values"], "labels": batch["label"]}

    data = tiny_cifar(n_train=36, n_test=12)
    data = data.map(to_features, batched=True, remove_columns=["img", "label"]).with_format("torch")
    train, val = data["train"], data["test"]
    test_loader = DataLoader(val, batch_size=6, collate_fn=default_data_collator)
    return {
        "model": model,
        "pretrained": copy.deepcopy(model),
        "processor": processor,
        "train": train,
        "val": val,
        "compute_metrics": compute_metrics,
        "test_loader": test_loader,
        "x": next(iter(test_loader))["pixel_values"],
    }


def test_every_page_with_python_snippets_is_run_somewhere():
    for name, text in _pages().items():
        if name != "README.md" and python_blocks(text):
            page = name.removeprefix("docs/")
            assert page in GUIDES or page in GUIDES_TESTED_ELSEWHERE, f"no test runs the snippets of {name}"
    for page, test in GUIDES_TESTED_ELSEWHERE.items():
        assert f"docs/{page}" in (ROOT / test).read_text(), (page, test)


def test_readme_and_guide_python_snippets_run_in_order(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    pages = [("README.md", README)] + [(f"docs/{page}", (DOCS / page).read_text()) for page in GUIDES]
    counts = {name: len(python_blocks(text)) for name, text in pages}
    assert counts["README.md"] >= 1, "the README lost its quick-start snippet"
    assert sum(counts.values()) >= 6, counts
    monkeypatch.chdir(tmp_path)
    HfApi().create_repo("user/vit-cifar10-starsse")  # the Hub repo the Ensembles snippet pushes to
    namespace = _preamble(tmp_path)
    for name, text in pages:
        if name != "README.md":  # the README's quick start trained `model`: the guides start from a fresh one
            namespace["model"] = copy.deepcopy(namespace["pretrained"])
        for i, block in enumerate(python_blocks(text)):
            try:
                exec(compile(block, f"{name} python block {i + 1}", "exec"), namespace)
            except Exception as err:
                pytest.fail(f"{name} python block {i + 1} fails: {type(err).__name__}: {err}\n{block}")
    # what the snippets promise
    assert [p.rsplit("/", 1)[-1] for p in namespace["trainer"].member_paths] == [
        f"member_{k:02d}" for k in range(5)
    ]
    profile = namespace["profile"]
    assert len(profile["alphas"]) == 11 and (tmp_path / "profile.png").is_file()


def test_readme_launch_commands_pass_every_launch_value(tmp_path):
    launches = [c for text in _pages().values() for c in bash_commands(text) if "accelerate launch" in c]
    assert launches, "the README and the guides show no accelerate launch command"
    for command in launches:
        missing = [flag for flag in LAUNCH_VALUES if flag not in command]
        assert not missing, f"{command!r} lacks {missing}: accelerate would print its defaults block"
    # the flags of the first launch, on a trivial script: accelerate stays quiet
    flags = launches[0].split("accelerate launch", 1)[1].split("recipes/")[0].split()
    script = tmp_path / "hello.py"
    script.write_text("print('hello')\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *flags, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "hello" in proc.stdout, proc.stderr[-2000:]
    assert "values were not passed" not in proc.stdout + proc.stderr


def test_make_says_what_each_install_step_does():
    dry = subprocess.run(
        ["make", "-n", "demo", "VENV=/nonexistent/venv"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    steps = [line for line in lines if "pip install" in line or "-m venv" in line]
    assert len(steps) == 4
    for step in steps:  # every install command comes right after an echo saying what it does
        before = lines[lines.index(step) - 1]
        assert before.startswith('echo "[install'), (before, step)
    demo = next(
        line for line in lines if "recipes/vit_cifar.py" in line and not line.startswith(("echo", "#"))
    )
    assert all(flag in demo for flag in LAUNCH_VALUES)


ACTIVATE = "source .venv/bin/activate"


def _readme_commands(text: str = README) -> list[tuple[int, str]]:
    """(offset, command) of every python / accelerate command a page shows, in blocks or inline code."""
    found = []
    for match in re.finditer(r"(?:PYTHONPATH=\S+ )?(?:python|accelerate launch) [^`\n|]*", text):
        found.append((match.start(), match.group(0).strip()))
    return found


def test_readme_commands_come_after_the_venv_activation_and_name_real_scripts():
    """`make demo` installs into .venv; a bare `python recipes/...` with the system Python fails
    (ModuleNotFoundError: torch), so the README says to activate it before its first such command."""
    assert ACTIVATE in README, "the README never says how to use the .venv that make creates"
    first = README.index(ACTIVATE)
    early = [command for offset, command in _readme_commands() if offset < first]
    assert not early, f"commands before the activation line: {early}"
    # the guides are read after the install: each names the venv before its first command, or the README does
    commands = [command for text in _pages().values() for _, command in _readme_commands(text)]
    assert len(commands) >= 10
    for command in commands:
        for script in re.findall(r"\b((?:recipes|benchmarks)/\w+\.py)\b", command):
            assert (ROOT / script).is_file(), f"{command!r} names {script}, which does not exist"


def test_user_facing_text_names_no_internal_issue_numbers():
    for name, text in _pages().items():
        found = re.findall(r".{0,40}\bissue \d+.{0,20}", text, flags=re.I)
        assert not found, f"{name}: {found}"


def test_the_readme_is_short_and_links_into_the_docs():
    assert len(README.splitlines()) <= 220, "the README grew past about 200 lines: move text into a guide"
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / target).is_file(), f"the README links to {target}, which does not exist"


def test_the_activated_venv_runs_the_readme_commands(tmp_path):
    """What a user types after `make demo`: the activation line, then `python recipes/vit_cifar.py --help`,
    in a shell with the system's PATH only (here with the venv running this test)."""
    venv = os.path.dirname(os.path.dirname(sys.executable))
    if not os.path.isfile(os.path.join(venv, "bin", "activate")):
        pytest.skip(f"{sys.executable} is not in a virtual environment")
    script = f"{ACTIVATE.replace('.venv', venv)} && python recipes/vit_cifar.py --help | head -3"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: vit_cifar.py"), proc.stderr[-2000:]


def test_the_demo_table_comes_with_its_range_over_numeric_configurations():
    """The demo table is one draw (issue 26): under it, per row, the min-max over >= 4 numeric
    configurations, which the comment names; the table's own numbers lie inside their ranges."""
    match = re.search(r"<!-- demo-table:(.*?)-->\n```\n(.*?)```\n<!-- /demo-table -->", README, flags=re.S)
    assert match, "the README lost its demo-table block"
    comment, block = match.groups()
    configurations = re.findall(r"native|ATEN_CPU_CAPABILITY=\w+", comment)
    assert len(configurations) >= 4, comment
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines[0].split() == ["accuracy", "NLL", "ECE"]
    rows = {line[:14].strip(): [float(v) for v in line[14:].split()] for line in lines[1:5]}
    assert list(rows) == ["mean member", "ensemble", "uniform soup", "greedy soup"]
    ranges = {}
    for line in lines[5:]:
        found = re.fullmatch(r"range  (.+?)\s+((?:\d\.\d{4}-\d\.\d{4}\s*){3})", line)
        assert found, f"not a range line: {line!r}"
        ranges[found.group(1)] = [tuple(map(float, r.split("-"))) for r in found.group(2).split()]
    assert list(ranges) == list(rows)
    for name, values in rows.items():
        for value, (low, high) in zip(values, ranges[name], strict=True):
            assert low <= value <= high, (name, value, low, high)
