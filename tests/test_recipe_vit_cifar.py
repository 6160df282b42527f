"""recipes/vit_cifar.py end to end on tiny real models and data: the Hub path, BatchNorm soups, two processes,
bad input, and the head handling of `load_model`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from hf_ens.testing_utils import free_port as _free_port
from recipes import image_datasets as recipe_datasets
from recipes import modeling, vit_cifar
from recipes._cli import ConfigError
from recipes.data import attach_transforms
from tests._recipe_utils import (
    ROOT,
    save_tiny_resnet,
    save_tiny_vit,
    tiny_cifar,
    tiny_processor,
    tiny_run_args,
)

SUMMARY_KEYS = [
    f"{row}/{m}"
    for row in ("member_mean", "ensemble", "soup", "greedy_soup")
    for m in ("accuracy", "nll", "ece")
]


def _parquet_dataset(path: Path, **kwargs) -> Path:
    """Local train-/test-*.parquet files: `datasets.load_dataset(path)` reads them like a Hub repo."""
    path.mkdir(parents=True)
    for split, ds in tiny_cifar(**kwargs).items():
        ds.to_parquet(path / f"{split}-00000-of-00001.parquet")
    return path


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> Path:
    return _parquet_dataset(tmp_path_factory.mktemp("data") / "tiny-cifar")


@pytest.fixture(scope="module")
def local_vit(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("ckpt") / "tiny-vit")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))


# ------------------------------------------------------------------------------------------ Hub path


def test_hub_run_by_name_writes_everything_and_pushes_one_commit(hub, tmp_path, capsys):
    import datasets
    from huggingface_hub import HfApi
    from transformers import AutoModelForImageClassification

    from hf_ens import EnsembleModel

    ckpt = save_tiny_vit(tmp_path / "tiny-vit")
    api = HfApi()
    api.create_repo("test-user/tiny-vit")
    api.upload_folder(repo_id="test-user/tiny-vit", folder_path=ckpt)
    tiny_cifar().push_to_hub("test-user/tiny-cifar")
    assert datasets.load_dataset("test-user/tiny-cifar", split="test").num_rows == 12

    out = tmp_path / "run"
    argv = tiny_run_args(out, "test-user/tiny-vit", "test-user/tiny-cifar")
    vit_cifar.main([*argv, "--push_to_hub", "true", "--hub_model_id", "test-user/out"])
    printed = capsys.readouterr().out

    # outputs on disk
    assert sorted(p.name for p in (out / "members").iterdir() if not p.name.startswith(".")) == [
        "member_00",
        "member_01",
        "member_02",
    ]
    for name in ("uniform_soup", "greedy_soup", "ensemble_repo"):
        assert (out / name / "config.json").is_file(), name
    assert (out / "ensemble_repo" / "README.md").is_file()
    for png in ("lr_schedule.png", "ensemble_size.png", "interpolation_member00_member01.png"):
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
    metrics = json.loads((out / "metrics.json").read_text())
    for key in SUMMARY_KEYS:
        assert 0.0 <= metrics[key] < float("inf"), key
    assert metrics["ensemble_size_curve"]["sizes"] == [1, 2, 3]
    assert metrics["config"]["world_size"] == 1 and metrics["config"]["written_members"] == [0, 1, 2]
    # class-coloured images: the ensemble learns the task (chance is 1/3)
    assert metrics["ensemble/accuracy"] >= 0.75
    assert "mean member" in printed and "greedy soup" in printed

    # the local repo loads both ways, and its root is the uniform soup
    ens = EnsembleModel.from_pretrained(out / "ensemble_repo")
    assert ens.num_members == 3
    root = AutoModelForImageClassification.from_pretrained(out / "ensemble_repo")
    soup = AutoModelForImageClassification.from_pretrained(out / "uniform_soup")
    for (name, a), b in zip(root.state_dict().items(), soup.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert root.config.id2label == {0: "red", 1: "green", 2: "blue"}

    # pushed in ONE commit (plus the repo's initial commit), and loads back by name
    commits = [r for r in hub.requests if re.match(r"POST /api/models/test-user/out/commit/", r)]
    assert len(commits) == 1, commits
    assert len(api.list_repo_commits("test-user/out")) == 2
    pushed = EnsembleModel.from_pretrained("test-user/out")
    assert pushed.num_members == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pushed(pixel_values=x).logits, ens(pixel_values=x).logits)
        hub_root = AutoModelForImageClassification.from_pretrained("test-user/out")
        torch.testing.assert_close(hub_root(pixel_values=x).logits, root(pixel_values=x).logits)


# ---------------------------------------------------------------------------------------- BatchNorm


def test_resnet_soups_get_batchnorm_recomputed(tmp_path, local_data):
    from transformers import AutoModelForImageClassification

    from hf_ens import uniform_soup
    from hf_ens.soups import recompute_batchnorm

    ckpt = save_tiny_resnet(tmp_path / "tiny-resnet")
    out = tmp_path / "run"
    argv = tiny_run_args(out, ckpt, local_data, "--num_members", "2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vit_cifar.main(argv)
    assert not [w for w in caught if "BatchNorm" in str(w.message)], [str(w.message) for w in caught]

    members = [
        AutoModelForImageClassification.from_pretrained(out / "members" / f"member_{k:02d}") for k in (0, 1)
    ]
    saved = AutoModelForImageClassification.from_pretrained(out / "uniform_soup").state_dict()
    plain = uniform_soup(members, warn_batchnorm=False)
    bn_keys = [k for k in saved if k.endswith("running_mean") or k.endswith("running_var")]
    assert bn_keys
    # the soup's statistics are NOT the plain average of the members' statistics...
    assert any(not torch.allclose(saved[k], plain.state_dict()[k], atol=1e-4) for k in bn_keys)

    # ... but exactly what recompute_batchnorm gives on the recipe's training batches (no augmentation)
    script_args, training_args = vit_cifar.parse_config_and_args(
        (vit_cifar.ScriptArguments, vit_cifar.StarSSEConfig), argv
    )
    from transformers import AutoImageProcessor

    train, _, _, _ = recipe_datasets.load_splits(script_args, training_args.seed)
    train_eval = attach_transforms(train, AutoImageProcessor.from_pretrained(ckpt), augment=False)
    loader = torch.utils.data.DataLoader(
        train_eval, batch_size=script_args.eval_batch_size, collate_fn=vit_cifar.collate
    )
    expected = recompute_batchnorm(plain, loader).state_dict()
    for k in bn_keys:
        torch.testing.assert_close(saved[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)
    greedy = AutoModelForImageClassification.from_pretrained(out / "greedy_soup").state_dict()
    assert all(torch.isfinite(greedy[k]).all() for k in bn_keys)


def test_swin_checkpoint_runs_through_the_recipe(tmp_path, local_data):
    """Swin (windowed attention, patch merging) is a third AutoModelForImageClassification family."""
    from transformers import AutoModelForImageClassification, SwinConfig, SwinForImageClassification

    from hf_ens import EnsembleModel

    torch.manual_seed(0)
    config = SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=4,
        num_labels=3,
    )
    ckpt = tmp_path / "tiny-swin"
    SwinForImageClassification(config).save_pretrained(ckpt)
    tiny_processor().save_pretrained(ckpt)
    out = tmp_path / "run"
    vit_cifar.main(tiny_run_args(out, ckpt, local_data, "--num_members", "2"))

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ensemble/accuracy"] > 1 / 3 + 0.1  # learnt something on 3 colour-coded classes
    ens = EnsembleModel.from_pretrained(out / "ensemble_repo")
    assert ens.num_members == 2 and type(ens.members[0]).__name__ == "SwinForImageClassification"
    root = AutoModelForImageClassification.from_pretrained(out / "ensemble_repo")
    soup = AutoModelForImageClassification.from_pretrained(out / "uniform_soup")
    for key, value in soup.state_dict().items():
        torch.testing.assert_close(root.state_dict()[key], value, msg=key)


# ------------------------------------------------------------------------------ cycle_learning_rate auto


def test_auto_cycle_lr_is_judged_on_the_held_out_split_and_reported(tmp_path, local_data, local_vit):
    """Issue 9 through the recipe: the probes see the held-out part of TRAIN (9 of 36 images, never the 12
    test images); the choice reaches metrics.json, ensemble_config.json, the card and the plot."""
    out = tmp_path / "run"
    extra = ["--num_members", "2", "--cycle_epochs", "4", "--cycle_learning_rate", "auto"]
    metrics = vit_cifar.main(tiny_run_args(out, local_vit, local_data, *extra, "--cycle_lr_grid", "0.5", "1"))
    probe = metrics["basin_probe"]
    assert probe["eval_samples"] == 9 and probe["probe_steps"] == 3  # 12-step cycles, 2 probes of 1/4
    assert probe["chosen_multiplier"] in (0.5, 1.0)
    assert json.loads((out / "metrics.json").read_text())["basin_probe"]["table"] == probe["table"]
    meta = json.loads((out / "ensemble_repo" / "ensemble_config.json").read_text())["metadata"]
    assert meta["cycle_learning_rate"] == pytest.approx(probe["chosen_multiplier"] * 3e-3)
    assert meta["cycle_learning_rate_mode"] == "auto" and meta["basin_probe"]["table"] == probe["table"]
    assert "chosen automatically" in (out / "ensemble_repo" / "README.md").read_text()
    assert (out / "plots" / "basin_probe.png").read_bytes()[:4] == b"\x89PNG"


# -------------------------------------------------------------------------------------- two processes


def _launch_two_processes(tmp_path: Path, argv: list[str]) -> tuple[int, str]:
    """`accelerate launch --multi_gpu --num_processes 2 recipes/vit_cifar.py --config <yaml of argv>`."""
    config = tmp_path / "tiny.yaml"
    # the YAML holds everything (the launch is `--config <tiny config>` alone); a repeated flag: last one wins
    pairs = dict(zip(argv[::2], argv[1::2], strict=True))
    config.write_text("".join(f"{k.removeprefix('--')}: {json.dumps(v)}\n" for k, v in pairs.items()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # no user-level accelerate default_config.yaml, fresh caches
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "recipes" / "vit_cifar.py"),
        "--config",
        str(config),
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout + proc.stderr


def _demo_launch_flags() -> list[str]:
    """The `accelerate launch` flags of `make demo` (the README's single-process launch line)."""
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^LAUNCH := \S*accelerate launch (.*)$", makefile, flags=re.M)
    assert match and "$(LAUNCH) recipes/vit_cifar.py" in makefile, "make demo no longer launches the recipe"
    return match.group(1).split()


@pytest.mark.slow
def test_single_process_launch_output_is_quiet_in_a_log(tmp_path, local_data, local_vit):
    """`make demo`'s launch line with output piped to a file: no accelerate "values were not passed" block,
    no `[A` cursor-up escapes of nested progress bars, and a second run into the same folder stops at once
    with one line naming the flag that allows it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # no user-level accelerate default_config.yaml
    argv = tiny_run_args(tmp_path / "run", local_vit, local_data, "--num_members", "2")
    i = argv.index("--disable_tqdm")
    del argv[i : i + 2]  # progress bars on, as a user sees them
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *_demo_launch_flags(), "recipes/vit_cifar.py"]
    first = subprocess.run([*cmd, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-4000:]
    assert "mean member" in log and "Writing model shards" not in log
    assert "\x1b[A" not in log
    assert "values were not passed" not in log
    # no warning a user cannot act on (issue 26): torch's pin_memory one on a CPU, transformers' bar per load
    assert "pin_memory" not in log and "Loading weights" not in log, log[-4000:]
    second = subprocess.run([*cmd, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = second.stdout + second.stderr
    assert second.returncode != 0 and "Traceback" not in log, log[-4000:]
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "already holds an earlier run" in errors[0], log[-2000:]
    assert "--overwrite_output_dir true" in errors[0]


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path, local_data, local_vit):
    out = tmp_path / "run"
    start = time.time()
    returncode, log = _launch_two_processes(
        tmp_path, tiny_run_args(out, local_vit, local_data, "--num_members", "2")
    )
    assert returncode == 0, log[-6000:]
    lines = sorted(
        re.findall(r"\[vit_cifar\] process (\d) of world size (\d) wrote members (\[[\d, ]*\])", log)
    )
    assert lines == [("0", "2", "[0, 1]"), ("1", "2", "[]")], log[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["world_size"] == 2 and metrics["config"]["written_members"] == [0, 1]
    members = sorted(p.name for p in (out / "members").iterdir())
    assert members == ["member_00", "member_01"]  # no leftover temp dirs of a second writer
    # each member written once: member_01 was written after member_00 and before the run ended
    mtimes = [(out / "members" / m).stat().st_mtime for m in members]
    assert start < mtimes[0] <= mtimes[1] <= time.time()
    assert log.count("mean member") == 1  # only the main process evaluates and prints the summary


@pytest.mark.slow
def test_two_cpu_processes_without_use_cpu_fail_clearly(tmp_path, local_data, local_vit):
    # without --use_cpu, accelerate starts 2 processes but torch.distributed is not set up on a CPU-only box:
    # each would train alone and both would write the same members
    if torch.cuda.is_available():
        pytest.skip("with CUDA the two processes form one NCCL group")
    out = tmp_path / "run"
    argv = tiny_run_args(out, local_vit, local_data, "--num_members", "2", "--use_cpu", "false")
    returncode, log = _launch_two_processes(tmp_path, argv)
    assert returncode != 0
    assert "started 2 processes but the Trainer sees a world size of 1" in log and "--use_cpu true" in log
    assert not (out / "members").exists()


# ------------------------------------------------------------------------------------------ bad input


def _run_expecting(monkeypatch, exc, match, tmp_path, model, data, *extra):
    """The recipe raises `exc` before training starts (a tripwire on `train` records any start)."""
    from hf_ens.trainers import StarSSETrainer

    started = []
    monkeypatch.setattr(StarSSETrainer, "train", lambda self, *a, **k: started.append(1))
    with pytest.raises(exc, match=match):
        vit_cifar.main(tiny_run_args(tmp_path / "run", model, data, *extra))
    assert not started, "training started before the bad input was reported"


def test_unknown_column_lists_columns(monkeypatch, tmp_path, local_data, local_vit):
    _run_expecting(
        monkeypatch,
        ValueError,
        r"no column\(s\) \['image'\].*columns are \['img', 'label'\]",
        tmp_path,
        local_vit,
        local_data,
        "--image_column",
        "image",
    )


def test_image_column_that_holds_no_images(monkeypatch, tmp_path, local_data, local_vit):
    _run_expecting(
        monkeypatch,
        ValueError,
        r"Column 'label' is ClassLabel, not a datasets.Image",
        tmp_path,
        local_vit,
        local_data,
        "--image_column",
        "label",
    )


def test_label_without_classlabel(monkeypatch, tmp_path, local_vit):
    data = _parquet_dataset(tmp_path / "ints", classlabel=False)
    _run_expecting(monkeypatch, ValueError, "not a datasets.ClassLabel", tmp_path, local_vit, data)


def test_label_count_mismatch_needs_ignore_mismatched_sizes(monkeypatch, tmp_path, local_data):
    five = save_tiny_vit(tmp_path / "five", num_labels=5)
    _run_expecting(
        monkeypatch,
        ValueError,
        "head for 5 labels but the dataset has 3.*--ignore_mismatched_sizes",
        tmp_path,
        five,
        local_data,
    )


def test_unknown_config_key(tmp_path, local_data, local_vit):
    config = tmp_path / "bad.yaml"
    config.write_text("num_membres: 3\n")
    with pytest.raises(ConfigError, match=r"num_membres.*did you mean num_members.*--help lists the") as err:
        vit_cifar.main(["--config", str(config), *tiny_run_args(tmp_path / "run", local_vit, local_data)])
    # one short line (it listed all ~200 valid keys, 2,816 characters, before)
    assert len(str(err.value)) < 250 and "\n" not in str(err.value), str(err.value)
    # the same typo on the command line
    with pytest.raises(ConfigError, match=r"cycle_epoch\b.*did you mean cycle_epochs.*--help lists the"):
        vit_cifar.main([*tiny_run_args(tmp_path / "run", local_vit, local_data), "--cycle_epoch", "1"])


def test_diverged_run_writes_no_soup_or_repo(tmp_path, local_data, local_vit):
    from hf_ens.checks import NonFiniteError

    out = tmp_path / "run"
    argv = tiny_run_args(out, local_vit, local_data, "--num_members", "2", "--learning_rate", "1e6")
    argv += ["--cycle_learning_rate", "1e6", "--max_grad_norm", "0"]  # no clipping: the weights blow up
    with pytest.raises(NonFiniteError, match="diverged"):  # the trainer stops at the first non-finite loss
        vit_cifar.main(argv)
    for written in ("uniform_soup", "greedy_soup", "ensemble_repo", "metrics.json"):
        assert not (out / written).exists(), written


def test_push_without_hub_model_id(monkeypatch, tmp_path, local_data, local_vit):
    _run_expecting(
        monkeypatch, ValueError, "--hub_model_id", tmp_path, local_vit, local_data, "--push_to_hub", "true"
    )


# --------------------------------------------------------------------------------------- load_model heads


def test_load_model_head_cases(tmp_path):
    from transformers import AutoModelForImageClassification

    args = vit_cifar.ScriptArguments(dataset_name="x")
    names = ["cat", "dog", "ship"]

    # 1. a backbone without a head: a fresh head for the task's labels
    bare = save_tiny_vit(tmp_path / "bare", num_labels=None)
    model = modeling.load_model(str(bare), names, args)
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "ship"} and model.classifier.out_features == 3

    # 2. a head trained for other classes of the same count: backbone kept, head re-drawn
    other = save_tiny_vit(tmp_path / "other", label_names=["a", "b", "c"])
    source = AutoModelForImageClassification.from_pretrained(other)
    with torch.no_grad():  # make the saved head unmistakable
        source.classifier.weight.fill_(0.5)
    source.save_pretrained(other)
    model = modeling.load_model(str(other), names, args)
    assert not torch.allclose(model.classifier.weight, source.classifier.weight)
    assert model.classifier.weight.std() > 0
    for (name, a), b in zip(model.vit.state_dict().items(), source.vit.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # same names (or generic LABEL_i names): the trained head is kept
    kept = modeling.load_model(str(other), ["a", "b", "c"], args)
    assert torch.equal(kept.classifier.weight, source.classifier.weight)

    # 3. a head of another size: refused unless --ignore_mismatched_sizes true
    five = save_tiny_vit(tmp_path / "five", num_labels=5)
    with pytest.raises(ValueError, match="5 labels.*has 3.*--ignore_mismatched_sizes true"):
        modeling.load_model(str(five), names, args)
    args.ignore_mismatched_sizes = True
    model = modeling.load_model(str(five), names, args)
    assert model.classifier.out_features == 3 and model.config.num_labels == 3


def test_checkpoint_code_never_runs(tmp_path):
    """A checkpoint whose config points at its own Python code (`auto_map`) is refused; the code never runs,
    even where transformers would otherwise ask "run the custom code? [y/N]" on stdin."""
    ckpt = save_tiny_vit(tmp_path / "evil")
    marker = tmp_path / "code_ran"
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "evil-vit"  # no built-in class: only the repo's code could load it
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForImageClassification": "evil.EvilModel",
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    processor = json.loads((ckpt / "preprocessor_config.json").read_text())
    processor["auto_map"] = {"AutoImageProcessor": "evil.EvilProcessor"}
    (ckpt / "preprocessor_config.json").write_text(json.dumps(processor))
    (ckpt / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    args = vit_cifar.ScriptArguments(dataset_name="x")
    with pytest.raises(ValueError, match="trust_remote_code"):
        modeling.load_model(str(ckpt), ["a", "b", "c"], args)
    from transformers import AutoImageProcessor

    try:  # the recipe's processor load: a built-in processor class, or a refusal; never the repo's code
        AutoImageProcessor.from_pretrained(str(ckpt), trust_remote_code=False)
    except ValueError as err:
        assert "trust_remote_code" in str(err)
    assert not marker.exists()
    assert "trust_remote_code=False" in (ROOT / "recipes" / "vit_cifar.py").read_text()
    loads = re.findall(
        r"\.from_(?:pretrained|config)\((.*?)\)\n", (ROOT / "recipes" / "vit_cifar.py").read_text(), re.S
    )
    assert loads and all("trust_remote_code=False" in call for call in loads), loads


def test_lora_wrapping_warns_nothing(tmp_path):
    """peft reads transformers 5's deprecated ``is_gradient_checkpointing`` on every wrap: no FutureWarning
    reaches the user, neither when the recipe wraps a member nor when an adapter ensemble is loaded."""
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(save_tiny_vit(tmp_path / "vit"))
    script = vit_cifar.ScriptArguments(lora_r=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        modeling.apply_lora(model, script)
