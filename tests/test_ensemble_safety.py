"""Saving and loading ensembles under crashes and hostile input (issue 14): no repo code runs, a kill leaves
the old or the new ensemble, user files survive, non-finite weights are refused, digests catch byte flips."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, PreTrainedModel, ViTImageProcessor

from hf_ens import EnsembleLoadError, EnsembleModel, NonFiniteError, _io
from hf_ens._io import recover
from hf_ens.testing_utils import tiny_vit
from tests._safety import Crash, counted, make_hostile
from tests._safety import inject as _inject
from tests._safety import logits as _logits
from tests._safety import rehash as _rehash


@pytest.fixture
def processor():
    return ViTImageProcessor(size={"height": 16, "width": 16})


@pytest.mark.parametrize(
    "where, json_name",
    [
        ("member_01", "config.json"),
        ("", "config.json"),
        ("", "preprocessor_config.json"),
        ("member_00", "preprocessor_config.json"),
    ],
)
def test_auto_map_is_refused_before_any_repo_code_runs(tmp_path, processor, closed_stdin, where, json_name):
    saved = EnsembleModel.from_members([tiny_vit(0), tiny_vit(1)], processor=processor).save_pretrained(
        tmp_path / "ens"
    )
    marker = tmp_path / "marker"
    make_hostile(saved / where, json_name, marker)
    _rehash(saved)
    bad = os.path.join(where, json_name) if where else json_name
    with pytest.raises(EnsembleLoadError, match=rf"{bad}.*auto_map.*never"):
        EnsembleModel.from_pretrained(saved)
    if where:  # a member directory given to from_members directly
        with pytest.raises(EnsembleLoadError, match="auto_map"):
            EnsembleModel.from_members([saved / where])
    assert not marker.exists()


def test_save_into_existing_dir_keeps_user_files_and_gets_ordinary_modes(tmp_path, processor):
    old_umask = os.umask(0o022)
    try:
        target = EnsembleModel.from_members([tiny_vit(s) for s in range(3)]).save_pretrained(tmp_path / "ens")
        user = {"model-best.safetensors": b"best", "member_notes.txt": b"notes", "notes.txt": b"mine"}
        for name, data in user.items():
            (target / name).write_bytes(data)
        (target / "runs").mkdir()
        (target / "runs" / "log.txt").write_text("log")
        new = EnsembleModel.from_members([tiny_vit(5), tiny_vit(6)], processor=processor)
        new.save_pretrained(target)
        assert sorted(p.name for p in target.glob("member_*") if p.is_dir()) == ["member_00", "member_01"]
        assert {name: (target / name).read_bytes() for name in user} == user
        assert (target / "runs" / "log.txt").read_text() == "log"
        torch.testing.assert_close(_logits(EnsembleModel.from_pretrained(target)), _logits(new))
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [target, *target.rglob("*")]}
        assert {oct(m) for p, m in modes.items() if p.is_dir()} == {"0o755"}
        assert {oct(m) for p, m in modes.items() if p.is_file()} == {"0o644"}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]
    finally:
        os.umask(old_umask)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_failure_at_every_step_of_a_save_leaves_old_or_new_ensemble(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_io, "exchange_paths", lambda a, b: False)
    old = EnsembleModel.from_members([tiny_vit(s) for s in range(3)])
    new = EnsembleModel.from_members([tiny_vit(7), tiny_vit(8)])
    template = old.save_pretrained(tmp_path / "template")
    (template / "notes.txt").write_text("user")
    expected = {
        "old": (_logits(old), _logits(old.soup())),
        "new": (_logits(new), _logits(new.soup())),
    }
    outcomes = set()
    for fail_at in range(1, 200):
        target = tmp_path / f"run{fail_at}" / "ens"
        shutil.copytree(template, target)
        with monkeypatch.context() as m:
            calls = _inject(m, fail_at)
            for owner, name in [(os, "replace"), (PreTrainedModel, "save_pretrained")]:
                m.setattr(owner, name, counted(getattr(owner, name), calls, fail_at))
            try:
                new.save_pretrained(target)
                crashed = False
            except Crash:
                crashed = True
        if not exchange:
            recover(target)  # what the next save does first
        loaded = EnsembleModel.from_pretrained(target)
        soup = AutoModelForImageClassification.from_pretrained(target)
        got = "new" if loaded.num_members == 2 else "old"
        ensemble_logits, soup_logits = expected[got]
        torch.testing.assert_close(_logits(loaded), ensemble_logits, msg=f"step {fail_at}")
        torch.testing.assert_close(_logits(soup), soup_logits, msg=f"step {fail_at}: soup config/weights")
        assert (target / "notes.txt").read_text() == "user"
        outcomes.add(got)
        if not crashed:
            break
    else:
        pytest.fail("the save never completed")
    assert outcomes == {"old", "new"} and fail_at >= 6  # every step of writing and swapping
    assert sorted(p.name for p in target.parent.iterdir()) == ["ens"]  # no leftovers after a clean save


KILLED_SAVE = """
import os, signal, sys
from transformers import ViTForImageClassification
from hf_ens import EnsembleModel
from hf_ens.testing_utils import tiny_vit

members = [tiny_vit(s) for s in range(3)]
calls = []
original = ViTForImageClassification.save_pretrained
def save_and_die(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # killed while writing the second member
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
ViTForImageClassification.save_pretrained = save_and_die
EnsembleModel.from_members(members).save_pretrained(sys.argv[1])
"""


def test_leftover_of_a_killed_save_is_removed_by_the_next_save(tmp_path):
    target = EnsembleModel.from_members([tiny_vit(5), tiny_vit(6)]).save_pretrained(tmp_path / "ens")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_SAVE), str(target)], env=env, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ens.tmp-")]
    assert leftovers and (leftovers[0] / "member_00" / "model.safetensors").is_file()
    assert EnsembleModel.from_pretrained(target).num_members == 2  # the old ensemble, complete
    EnsembleModel.from_members([tiny_vit(1)]).save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]


def test_nonfinite_member_or_soup_is_refused_naming_it(tmp_path):
    members = [tiny_vit(s) for s in range(3)]
    with torch.no_grad():
        members[1].classifier.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"member 1 \(member_01\).*classifier\.bias"):
        EnsembleModel.from_members(members).save_pretrained(tmp_path / "ens")
    good = EnsembleModel.from_members([tiny_vit(0), tiny_vit(2)])
    soup = good.soup()
    with torch.no_grad():
        soup.classifier.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="soup"):
        good.save_pretrained(tmp_path / "ens", soup=soup)
    assert not (tmp_path / "ens").exists() and list(tmp_path.iterdir()) == []


def test_loading_nonfinite_weights_is_refused_naming_the_member(tmp_path):
    saved = EnsembleModel.from_members([tiny_vit(0), tiny_vit(1)]).save_pretrained(tmp_path / "ens")
    path = saved / "member_01" / "model.safetensors"
    state = load_file(path)
    name = next(k for k in state if k.endswith("classifier.bias"))
    state[name][0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    _rehash(saved)
    with pytest.raises(EnsembleLoadError, match=r"member_01 .*non-finite.*classifier\.bias"):
        EnsembleModel.from_pretrained(saved)


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor: the file still parses
    path.write_bytes(bytes(data))


def test_digests_catch_a_same_size_byte_flip(tmp_path, processor):
    saved = EnsembleModel.from_members([tiny_vit(0), tiny_vit(1)], processor=processor).save_pretrained(
        tmp_path / "ens"
    )
    files = json.loads((saved / "ensemble_config.json").read_text())["files"]
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "member_01/model.safetensors",
        "member_01/config.json",
        "member_01/preprocessor_config.json",
    } <= set(files)
    assert all(len(v) == 64 for v in files.values())
    member_file = saved / "member_01" / "model.safetensors"
    size = member_file.stat().st_size
    _flip_last_byte(member_file)
    assert member_file.stat().st_size == size
    with pytest.raises(EnsembleLoadError, match=r"member_01[/\\]model\.safetensors.*SHA-256"):
        EnsembleModel.from_pretrained(saved)
    # an ensemble saved before digests were recorded (or whose digests were removed) loads with a warning,
    # and is refused with require_digests=True (issue 25, item 8)
    cfg = json.loads((saved / "ensemble_config.json").read_text())
    del cfg["files"]
    (saved / "ensemble_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="records no file digests"):
        assert EnsembleModel.from_pretrained(saved).num_members == 2
    with pytest.raises(EnsembleLoadError, match="require_digests=True"):
        EnsembleModel.from_pretrained(saved, require_digests=True)


def test_members_of_other_depth_or_width_are_refused():
    with pytest.raises(ValueError, match="same depth and width"):
        EnsembleModel.from_members([tiny_vit(0), tiny_vit(1, num_hidden_layers=3)])
    with pytest.raises(ValueError, match="same depth and width"):
        EnsembleModel.from_members([tiny_vit(0), tiny_vit(1, intermediate_size=48)])


def test_directory_name_of_250_characters(tmp_path):
    ens = EnsembleModel.from_members([tiny_vit(0), tiny_vit(1)])
    target = ens.save_pretrained(tmp_path / ("e" * 250))
    ens.save_pretrained(target)  # and again, into the existing directory
    torch.testing.assert_close(_logits(EnsembleModel.from_pretrained(target)), _logits(ens))


def test_saved_metadata_holds_no_local_paths(tmp_path):
    base = tmp_path / "pretrained" / "vit-fmnist-abc123"
    base.mkdir(parents=True)
    metadata = {"method": "starsse", "base_model": str(base), "dataset": "offline:fashion_mnist"}
    saved = EnsembleModel.from_members([tiny_vit(0)], metadata=metadata).save_pretrained(tmp_path / "ens")
    stored = json.loads((saved / "ensemble_config.json").read_text())["metadata"]
    assert stored["base_model"] == "local:vit-fmnist-abc123"
    assert stored["dataset"] == "offline:fashion_mnist"
    for path in saved.rglob("*"):
        if path.is_file():
            assert str(tmp_path).encode() not in path.read_bytes(), path
