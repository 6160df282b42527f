"""Helpers the crash-safety and hostile-repo tests share (a test module never imports another test module)."""

from __future__ import annotations

import json
import os
import shutil

import torch

from hf_ens import _io, hub

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=X).logits


def rehash(saved) -> None:
    """Record the current file digests, as someone who crafts a repo (and controls its config) would."""
    cfg_file = saved / "ensemble_config.json"
    cfg = json.loads(cfg_file.read_text())
    if "files" in cfg:
        cfg["files"] = hub.file_digests(saved)
    cfg_file.write_text(json.dumps(cfg))


HOSTILE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("repo code ran")
"""


def make_hostile(folder, json_name: str, marker) -> None:
    """Give `folder/json_name` an ``auto_map`` pointing at a ``hostile.py`` that writes `marker` on import."""
    (folder / "hostile.py").write_text(HOSTILE_CODE.format(marker=str(marker)))
    cfg = json.loads((folder / json_name).read_text())
    cfg["auto_map"] = {
        "AutoConfig": "hostile.HostileConfig",
        "AutoModelForImageClassification": "hostile.HostileModel",
        "AutoImageProcessor": "hostile.HostileProcessor",
    }
    if json_name == "config.json":  # a model type transformers lacks: only the repo's code could load it
        cfg["model_type"] = "hostile-vit"
    (folder / json_name).write_text(json.dumps(cfg))


class Crash(Exception):
    pass


def counted(fn, calls: dict, fail_at: int):
    """`fn` as one counted step: the `fail_at`-th step of `calls` raises `Crash` (a crash at that point)."""

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise Crash(f"step {fail_at}: {fn.__name__}")
        return fn(*a, **k)

    return step


def inject(monkeypatch, fail_at):
    """Make the `fail_at`-th file-system step of hf_ens._io raise (a crash at that point)."""
    calls = {"n": 0}
    for mod, name in [(os, "rename"), (os, "chmod"), (os, "link"), (shutil, "rmtree"), (shutil, "copytree")]:
        monkeypatch.setattr(mod, name, counted(getattr(mod, name), calls, fail_at))
    monkeypatch.setattr(_io, "exchange_paths", counted(_io.exchange_paths, calls, fail_at))
    return calls
