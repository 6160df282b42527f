"""Hostile repos and shared directories (issue 25): nothing is read outside the repo, no file of another
writer is lost, no two runs mix, non-finite predictions never score well."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from hf_ens import EnsembleLoadError, EnsembleModel, _io, hub
from hf_ens.metrics import accuracy, ensemble_metrics, fit_temperature
from hf_ens.soups import greedy_soup, make_accuracy_eval_fn
from hf_ens.testing_utils import tiny_bert, tiny_vit
from tests._safety import logits as _logits
from tests._safety import rehash as _rehash


@pytest.fixture
def saved(tmp_path):
    return EnsembleModel.from_members([tiny_vit(0), tiny_vit(1)]).save_pretrained(tmp_path / "repo" / "ens")


def _outside_shard(saved, shard_name_for):
    """Move member_00's weights outside the repo and point an index's weight_map at them."""
    outside = saved.parent.parent / "outside"
    outside.mkdir()
    member = saved / "member_00"
    shutil.move(member / "model.safetensors", outside / "x.safetensors")
    keys = list(load_file(outside / "x.safetensors"))
    name = shard_name_for(outside / "x.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, name)}
    (member / "model.safetensors.index.json").write_text(json.dumps(index))
    _rehash(saved)


# ------------------------------------------------------------------------------------ 1-4: reads outside
@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_1_weight_map_naming_a_shard_outside_the_repo_is_refused(saved, how):
    _outside_shard(saved, lambda p: "../../../outside/x.safetensors" if how == "relative" else str(p))
    with pytest.raises(EnsembleLoadError, match=r"shard named in .*member_00.*lies outside it"):
        EnsembleModel.from_pretrained(saved)


def test_1_weight_map_outside_is_refused_from_the_hub(hub, saved, tmp_path):
    """On the Hub the outside shard would come from the loader's own disk."""
    secret = tmp_path / "secret"
    secret.mkdir()
    _outside_shard(saved, lambda p: "../../../../../../../../../../../../" + str(secret / "x.safetensors"))
    shutil.move(saved.parent.parent / "outside" / "x.safetensors", secret / "x.safetensors")
    api = HfApi()
    api.create_repo("test-user/hostile")
    api.upload_folder(repo_id="test-user/hostile", folder_path=saved)
    with pytest.raises(EnsembleLoadError, match="lies outside it"):
        EnsembleModel.from_pretrained("test-user/hostile", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("what", ["member_dir", "weight_file"])
def test_2_symlink_leading_out_of_the_repo_is_refused(saved, tmp_path, what):
    other = EnsembleModel.from_members([tiny_vit(5)]).save_pretrained(tmp_path / "elsewhere")
    if what == "member_dir":
        shutil.rmtree(saved / "member_01")
        os.symlink(other / "member_00", saved / "member_01")
    else:
        (saved / "member_01" / "model.safetensors").unlink()
        os.symlink(other / "member_00" / "model.safetensors", saved / "member_01" / "model.safetensors")
    _rehash(saved)
    with pytest.raises(EnsembleLoadError, match=r"member_01.*lies outside it"):
        EnsembleModel.from_pretrained(saved)


def test_2_symlink_inside_the_repo_still_loads(saved):
    (saved / "member_01" / "model.safetensors").unlink()
    os.symlink("../member_00/model.safetensors", saved / "member_01" / "model.safetensors")
    _rehash(saved)
    loaded = EnsembleModel.from_pretrained(saved)
    assert loaded.num_members == 2


@pytest.mark.parametrize("key", ["/etc/hostname", "../outside/secret.txt"])
def test_3_digest_key_outside_the_repo_is_never_opened(saved, key, monkeypatch):
    (saved.parent / "outside").mkdir()
    (saved.parent / "outside" / "secret.txt").write_text("secret")
    cfg = json.loads((saved / "ensemble_config.json").read_text())
    cfg["files"][key] = "0" * 64
    (saved / "ensemble_config.json").write_text(json.dumps(cfg))
    opened = []
    real_sha = hub._sha256
    monkeypatch.setattr(hub, "_sha256", lambda p: opened.append(str(p)) or real_sha(p))
    with pytest.raises(EnsembleLoadError, match="lies outside it") as err:
        EnsembleModel.from_pretrained(saved)
    assert not [p for p in opened if "outside" in p or "hostname" in p]
    assert "SHA-256 is" not in str(err.value)


def _lora_repo(tmp_path):
    from hf_ens.adapters import AdapterEnsembleModel, save_adapter
    from hf_ens.testing_utils import tiny_lora_vit as lora_model

    paths = []
    for k in range(2):
        save_adapter(lora_model(), "default", tmp_path / f"adapter_{k}")
        paths.append(tmp_path / f"adapter_{k}")
    return AdapterEnsembleModel.from_adapters(tiny_vit(0), paths).save_pretrained(tmp_path / "lora")


def test_4_lora_base_model_naming_a_local_path_is_refused(tmp_path):
    local_base = tmp_path / "local-base"
    tiny_vit(0).save_pretrained(local_base)
    saved = _lora_repo(tmp_path)
    cfg = json.loads((saved / "ensemble_config.json").read_text())
    cfg["base_model"], cfg["base_weights_sha256"] = str(local_base), None
    (saved / "ensemble_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EnsembleLoadError, match="not a Hub repo id.*base_model="):
        EnsembleModel.from_pretrained(saved)
    assert EnsembleModel.from_pretrained(saved, base_model=local_base).num_members == 2  # explicit: allowed


@pytest.mark.parametrize(
    "change, match",
    [
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"target_modules": ["no_such_module"]}, "cannot be applied to the base model"),
    ],
)
def test_adapter_config_peft_cannot_apply_names_the_file(tmp_path, change, match):
    saved = _lora_repo(tmp_path)
    for member in ("member_00", "member_01"):
        file = saved / member / "adapter_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **change}))
    _rehash(saved)
    with pytest.raises(EnsembleLoadError, match=rf"member_00[/\\]adapter_config\.json.*{match}"):
        EnsembleModel.from_pretrained(saved, base_model=tiny_vit(0))


# ------------------------------------------------------------------------------------- 6-9: silent results
def _retype(path, dtype_from="F32", dtype_to="I32"):
    """Rewrite every F32 in a safetensors header as I32 (same sizes), as a tamperer would."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].decode().replace(f'"{dtype_from}"', f'"{dtype_to}"')
    data[8 : 8 + n] = header.encode()
    path.write_bytes(bytes(data))


def test_6_dtype_rewritten_in_a_header_is_refused(saved):
    _retype(saved / "member_01" / "model.safetensors")
    _rehash(saved)
    with pytest.raises(EnsembleLoadError, match=r"member_01 .*stored as I32.*refused"):
        EnsembleModel.from_pretrained(saved)


def test_6_member_stored_in_another_dtype_than_the_others_is_refused(saved):
    member = saved / "member_01"
    state = load_file(member / "model.safetensors")
    save_file(
        {k: v.half() for k, v in state.items()}, member / "model.safetensors", metadata={"format": "pt"}
    )
    cfg = json.loads((member / "config.json").read_text())
    cfg["dtype"] = "float16"
    (member / "config.json").write_text(json.dumps(cfg))
    _rehash(saved)
    with pytest.raises(EnsembleLoadError, match=r"member_01 .*F16.*member_00 as F32"):
        EnsembleModel.from_pretrained(saved)


def test_6_nonfinite_weights_on_load_are_refused(saved):
    path = saved / "member_00" / "model.safetensors"
    state = load_file(path)
    next(v for k, v in state.items() if k.endswith("classifier.weight"))[0, 0] = float("inf")
    save_file(state, path, metadata={"format": "pt"})
    _rehash(saved)
    with pytest.raises(EnsembleLoadError, match=r"member_00 .*non-finite"):
        EnsembleModel.from_pretrained(saved)


def test_7_nan_predictions_never_score_well():
    labels = torch.zeros(20, dtype=torch.long)
    nan = torch.full((20, 3), float("nan"))
    assert accuracy(nan, labels) == 0.0  # argmax(NaN) is class 0: was 1.0
    inf = torch.zeros(20, 3)
    inf[:, 0] = float("inf")
    assert accuracy(inf, labels) == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        fit_temperature(nan, labels)
    with pytest.raises(ValueError, match="at least one member"):
        ensemble_metrics(torch.zeros(0, 4, 3), torch.zeros(4, dtype=torch.long))


def test_7_greedy_soup_never_picks_a_nan_member():
    members = [tiny_vit(s) for s in range(3)]
    with torch.no_grad():
        members[1].classifier.bias.fill_(float("nan"))
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loader = [{"pixel_values": images, "labels": torch.zeros(12, dtype=torch.long)}]
    eval_fn = make_accuracy_eval_fn(loader)
    assert eval_fn(members[1]) == 0.0
    soup, chosen = greedy_soup(members, eval_fn)
    assert 1 not in chosen and all(torch.isfinite(p).all() for p in soup.parameters())
    with pytest.raises(ValueError, match="non-finite"):  # every member NaN: no finite soup exists
        greedy_soup([members[1]], eval_fn)


def test_8_deleted_or_partial_digests_warn_or_are_refused(saved):
    cfg_file = saved / "ensemble_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["files"]["member_01/model.safetensors"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"no digest for 1 file.*member_01/model\.safetensors"):
        EnsembleModel.from_pretrained(saved)
    with pytest.raises(EnsembleLoadError, match="require_digests=True"):
        EnsembleModel.from_pretrained(saved, require_digests=True)


def test_8_a_file_listed_under_many_aliases_is_hashed_once(saved, monkeypatch):
    cfg_file = saved / "ensemble_config.json"
    cfg = json.loads(cfg_file.read_text())
    digest = cfg["files"]["member_00/model.safetensors"]
    for i in range(300):
        cfg["files"]["member_00/" + "./" * (i + 1) + "model.safetensors"] = digest
    cfg_file.write_text(json.dumps(cfg))
    calls = []
    real_sha = hub._sha256
    monkeypatch.setattr(hub, "_sha256", lambda p: calls.append(p) or real_sha(p))
    EnsembleModel.from_pretrained(saved)
    assert len(calls) == len(set(map(os.path.realpath, calls))) <= 12


@pytest.mark.parametrize("soup", ["labels", "architecture"])
def test_9_a_soup_that_is_not_the_members_model_is_refused(tmp_path, soup):
    ens = EnsembleModel.from_members([tiny_vit(0), tiny_vit(1)])
    other = tiny_vit(2, num_labels=5) if soup == "labels" else tiny_bert(0, num_labels=3)
    with pytest.raises(ValueError, match="does not match the ensemble's members"):
        ens.save_pretrained(tmp_path / "ens", soup=other)
    assert not (tmp_path / "ens").exists()


# ------------------------------------------------------------------------------------ 10-12: saves
def test_10_files_another_process_writes_during_a_save_are_kept(saved, monkeypatch):
    """A writer adds a file and replaces another after the save linked the old entries, before its swap."""
    (saved / "log.txt").write_text("v1")
    os.symlink("/nonexistent/elsewhere", saved / "link")  # a user's link stays a link
    real_install = _io._install

    def racing_install(tmp, target):
        (target / "late.txt").write_text("late")
        (target / "log.new").write_text("v2")
        os.replace(target / "log.new", target / "log.txt")
        os.makedirs(target / "runs" / "x")
        (target / "runs" / "x" / "event").write_text("e")
        return real_install(tmp, target)

    monkeypatch.setattr(_io, "_install", racing_install)
    new = EnsembleModel.from_members([tiny_vit(7)])
    new.save_pretrained(saved)
    assert (saved / "late.txt").read_text() == "late"
    assert (saved / "log.txt").read_text() == "v2"
    assert (saved / "runs" / "x" / "event").read_text() == "e"
    assert os.readlink(saved / "link") == "/nonexistent/elsewhere"
    assert EnsembleModel.from_pretrained(saved).num_members == 1


@pytest.mark.slow
def test_10_a_busy_writer_loses_no_file_over_five_saves(saved):
    """Another writer creates files in the directory without pause while it is saved into 5 times."""
    stop, written = threading.Event(), []

    def writer():
        while not stop.is_set():
            name = saved / f"log_{len(written):05d}.txt"
            name.write_text("x")
            written.append(name.name)
            time.sleep(0.0005)  # a busy writer, not a fork bomb: the saves carry its files across, not O(n^2)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for seed in range(5):
            EnsembleModel.from_members([tiny_vit(seed)]).save_pretrained(saved)
    finally:
        stop.set()
        thread.join()
    assert len(written) > 20
    assert sorted(written) == sorted(p.name for p in saved.glob("log_*.txt"))


@pytest.mark.parametrize("mode", [0o700, 0o2775])
def test_11_directory_mode_owner_and_group_are_kept(saved, mode):
    os.chown(saved, 1234, 4321)
    os.chmod(saved, mode)
    EnsembleModel.from_members([tiny_vit(7)]).save_pretrained(saved)
    st = os.stat(saved)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 1234, 4321)
    if mode & stat.S_ISGID:  # files written inside get the directory's group, as in a plain save
        assert os.stat(saved / "member_00" / "config.json").st_gid == 4321


def test_12_a_symlinked_target_is_written_through(saved, tmp_path):
    link = tmp_path / "link"
    os.symlink(saved, link)
    new = EnsembleModel.from_members([tiny_vit(7)])
    new.save_pretrained(link)
    assert link.is_symlink() and os.path.realpath(link) == str(saved)
    torch.testing.assert_close(_logits(EnsembleModel.from_pretrained(saved)), _logits(new))


def test_12_a_mount_point_is_refused_with_the_reason(monkeypatch, tmp_path):
    target = tmp_path / "mnt"
    target.mkdir()
    (target / "data").mkdir()
    (target / "data" / "f").write_text("volume")
    mounts = {str(target / "data")}
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) in mounts)
    with pytest.raises(OSError, match=r"data is a mount point.*refused"):
        EnsembleModel.from_members([tiny_vit(7)]).save_pretrained(target)
    assert (target / "data" / "f").read_text() == "volume"
    mounts.add(str(target))
    with pytest.raises(OSError, match=r"mnt is a mount point"):
        EnsembleModel.from_members([tiny_vit(7)]).save_pretrained(target)


@pytest.mark.skipif(not os.path.ismount("/dev/shm"), reason="needs /dev/shm as a mount point")
def test_12_a_real_mount_point_is_refused_before_writing():
    with pytest.raises(OSError, match="is a mount point"):
        EnsembleModel.from_members([tiny_vit(7)]).save_pretrained("/dev/shm")


# ------------------------------------------------------------------------------------------ unclear errors
def test_two_saves_into_one_directory_at_once_both_complete(saved, monkeypatch):
    """The second save starts while the first writes; it must not delete the first's temporary directory."""
    first = EnsembleModel.from_members([tiny_vit(3), tiny_vit(4)])
    second = EnsembleModel.from_members([tiny_vit(5)])
    errors, calls = [], []
    real = type(first.members[0]).save_pretrained

    def slow_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first save has written member_00 into its temporary directory
            thread.start()
            time.sleep(1.0)  # the second save runs now (and, before the fix, removed our tmp dir)
        return real(self, *args, **kwargs)

    def run_second():
        try:
            second.save_pretrained(saved)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=run_second)
    monkeypatch.setattr(type(first.members[0]), "save_pretrained", slow_save)
    first.save_pretrained(saved)
    thread.join()
    assert errors == []
    assert EnsembleModel.from_pretrained(saved).num_members == 2  # the first, installed last, complete
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ens"]


def test_deeply_nested_config_names_the_file(saved):
    (saved / "ensemble_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(EnsembleLoadError, match=r"ensemble_config\.json is nested too deeply"):
        EnsembleModel.from_pretrained(saved)


MOUNTED_SAVE = """
import os, sys
from hf_ens import EnsembleModel
from hf_ens.testing_utils import tiny_vit

outcomes = []
for target in sys.argv[1:]:
    try:
        EnsembleModel.from_members([tiny_vit(7)]).save_pretrained(target)
        outcomes.append("saved")
    except OSError as e:
        outcomes.append("refused: mount point" if "is a mount point" in str(e) else f"error: {e}")
print(outcomes)
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_12_real_mounts_are_refused_and_their_files_kept(saved, tmp_path):
    """A tmpfs mounted at ``repo/data`` and one mounted at the target itself, in a private mount namespace."""
    whole = tmp_path / "whole"
    whole.mkdir()
    script = (
        f"mount -t tmpfs none {saved}/data && mount -t tmpfs none {whole} && echo volume > {saved}/data/f && "
        f"{sys.executable} -c '{MOUNTED_SAVE}' {saved} {whole} && cat {saved}/data/f"
    )
    (saved / "data").mkdir()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
    )
    if "mount" in proc.stderr and proc.returncode and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    assert proc.stdout.splitlines()[-2:] == ["['refused: mount point', 'refused: mount point']", "volume"], (
        proc.stdout + proc.stderr
    )
    assert EnsembleModel.from_pretrained(saved).num_members == 2  # untouched


@pytest.mark.parametrize("damage", ["retyped", "nan"])
def test_6_adapter_weights_retyped_or_nonfinite_are_refused(tmp_path, damage):
    saved = _lora_repo(tmp_path)
    weights = saved / "member_01" / "adapter_model.safetensors"
    if damage == "retyped":
        _retype(weights)
    else:
        state = load_file(weights)
        next(iter(state.values())).view(-1)[0] = float("nan")
        save_file(state, weights, metadata={"format": "pt"})
    _rehash(saved)
    with pytest.raises(EnsembleLoadError, match=r"member_01[/\\]adapter_model\.safetensors hold non-"):
        EnsembleModel.from_pretrained(saved, base_model=tiny_vit(0))


def test_a_member_of_a_hub_download_loads_alone(hub, saved, tmp_path):
    """Hub snapshot files are links into the cache's blobs: allowed, for the repo and for one member of it."""
    from huggingface_hub import snapshot_download

    from hf_ens.members import load_member

    HfApi().create_repo("test-user/plain")
    HfApi().upload_folder(repo_id="test-user/plain", folder_path=saved)
    snapshot = snapshot_download("test-user/plain", cache_dir=tmp_path / "cache")
    assert os.path.islink(os.path.join(snapshot, "member_00", "model.safetensors"))
    torch.testing.assert_close(
        _logits(load_member(os.path.join(snapshot, "member_00"))), _logits(load_member(saved / "member_00"))
    )


@pytest.mark.parametrize("family", ["vit_bf16", "bert"])
def test_6_honest_repos_of_other_dtypes_and_families_load(tmp_path, family):
    """The dtype checks refuse tampering only: a bf16 ensemble and a BERT one (int64 buffers) load."""
    if family == "vit_bf16":
        members = [tiny_vit(s).to(torch.bfloat16) for s in range(2)]
    else:
        members = [tiny_bert(s) for s in range(2)]
    saved = EnsembleModel.from_members(members).save_pretrained(tmp_path / "ens")
    loaded = EnsembleModel.from_pretrained(saved, require_digests=True)
    assert loaded.num_members == 2
    assert {p.dtype for p in loaded.members[1].parameters()} == {next(members[1].parameters()).dtype}
