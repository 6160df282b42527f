"""hf_ens._io: a replacement leaves the complete old or the complete new directory, with ordinary modes."""

import os
import shutil
import stat

import pytest

from hf_ens import _io
from hf_ens._io import atomic_directory, atomic_file, recover, remove_leftovers
from tests._safety import Crash
from tests._safety import inject as _inject

OLD = {"member_00/w": "old0", "member_01/w": "old1", "config.json": "old-config", "notes.txt": "user"}
NEW = {"member_00/w": "new0", "config.json": "new-config", "notes.txt": "user"}


def _write(root, files):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _read(root):
    if not root.exists():
        return None
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_failure_at_every_step_leaves_old_or_new(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_io, "exchange_paths", lambda a, b: False)
    outcomes = set()
    for fail_at in range(1, 40):
        target = tmp_path / f"run{fail_at}" / "ens"
        target.mkdir(parents=True)
        _write(target, OLD)
        with monkeypatch.context() as m:
            calls = _inject(m, fail_at)
            try:
                with atomic_directory(target, keep=lambda n: not n.startswith("member_")) as tmp:
                    calls["n"] += 1  # the writer's own work is a step too
                    if calls["n"] == fail_at:
                        raise Crash("inside the writer")
                    _write(tmp, {k: v for k, v in NEW.items() if k != "notes.txt"})
                crashed = False
            except Crash:
                crashed = True
        recover(target)  # what the next writer does first
        content = _read(target)
        assert content in (OLD, NEW), f"step {fail_at}: {content}"
        outcomes.add("new" if content == NEW else "old")
        if not crashed:
            break
    else:
        pytest.fail("the replacement never completed")
    assert outcomes == {"old", "new"}
    remove_leftovers(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["ens"]


def test_modes_follow_umask_and_leftovers_are_cleaned(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "member_00"
        (tmp_path / ".member_00.tmp-dead").mkdir()  # a killed writer's leftover
        with atomic_directory(target) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_text("x")
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
        with atomic_file(tmp_path / "metrics.json") as f:
            f.write("{}")
        assert stat.S_IMODE(os.stat(tmp_path / "metrics.json").st_mode) == 0o644
        assert sorted(p.name for p in tmp_path.iterdir()) == ["member_00", "metrics.json"]
    finally:
        os.umask(old)


def test_writer_exception_changes_nothing(tmp_path):
    target = tmp_path / "ens"
    target.mkdir()
    _write(target, OLD)
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert _read(target) == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["ens"]


def test_long_names(tmp_path):
    target = tmp_path / ("m" * 250)
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("1")
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("2")
    assert (target / "f").read_text() == "2"


def test_assert_finite_names_the_tensors():
    import torch

    from hf_ens import NonFiniteError, assert_finite, nonfinite_tensors

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert_finite(model, "member 0")
    with torch.no_grad():
        model[0].bias[1] = float("inf")
    model[1].running_var[0] = float("nan")
    assert nonfinite_tensors(model) == ["0.bias", "1.running_var"]
    with pytest.raises(NonFiniteError, match=r"member 2 .* 2 tensor\(s\): 0.bias, 1.running_var"):
        assert_finite(model.state_dict(), "member 2")


def test_discard_moves_directories_out_in_one_rename_then_deletes_them(tmp_path, monkeypatch):
    """`hf_ens._io.discard`, the one crash-safe remover: cut before the delete, every directory is either in
    place or whole inside the hidden trash (never half deleted), and nothing else beside it is touched."""

    from hf_ens._io import delete, discard

    for name in ("a", "b"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "w.bin").write_bytes(b"x" * 10)
    (tmp_path / "keep.txt").write_text("mine")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        discard([tmp_path / "a", tmp_path / "b", tmp_path / "absent"], trash_prefix=".t-")
    monkeypatch.undo()
    (trash,) = tmp_path.glob(".t-*")
    assert sorted(p.name for p in trash.iterdir()) == ["a", "b"]
    assert (trash / "a" / "sub" / "w.bin").read_bytes() == b"x" * 10
    assert not (tmp_path / "a").exists() and (tmp_path / "keep.txt").read_text() == "mine"
    delete(trash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
