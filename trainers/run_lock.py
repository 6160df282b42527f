"""One run per ``output_dir``: two trainings writing into one directory would mix their members silently.

A run holds an OS lock (`filelock`) on ``output_dir/.hf_ens_run.lock`` while it trains, with its owner
(pid, host, start time) written beside it in ``.hf_ens_run.owner.json``. The kernel drops the lock when the
process ends, however it ends, so a killed run leaves no stale lock: its owner file is simply overwritten by
the next run. A second run (``overwrite_output_dir=True`` included) is refused with one line naming the
holder. Both files are removed when the run ends.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from filelock import FileLock, Timeout

from hf_ens._io import ensure_writable

__all__ = ["RunLockedError", "run_lock"]

LOCK_NAME = ".hf_ens_run.lock"
OWNER_NAME = ".hf_ens_run.owner.json"


class RunLockedError(RuntimeError):
    """Another run trains into this ``output_dir`` now."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _holder(output_dir: str) -> str:
    try:
        with open(os.path.join(output_dir, OWNER_NAME)) as f:
            owner = json.load(f)
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (owner unknown)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    text = f"pid {pid} on host {host} (since {since})"
    if host == socket.gethostname() and not _alive(pid):
        text += ", which is no longer running: a child process it left behind still holds the lock"
    return text


@contextmanager
def run_lock(
    output_dir: str | os.PathLike,
    enabled: bool = True,
    share: Callable[[str | None], str | None] | None = None,
) -> Iterator[None]:
    """Hold `output_dir` for one run; raise `RunLockedError` naming the holder if another run holds it.

    `enabled=False` (the non-main processes of a distributed run, which share their main process's
    directory) takes nothing. `share(refusal)`, called on every process of a distributed run, returns the
    main process's refusal (None when it got the lock), so that all processes stop together instead of the
    others waiting forever for a main process that was refused."""
    output_dir = os.fspath(output_dir)
    lock, refusal = None, None
    if enabled:
        ensure_writable(output_dir)
        lock = FileLock(os.path.join(output_dir, LOCK_NAME), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            lock = None
            refusal = (
                f"output_dir {output_dir!r} is in use by another run: {_holder(output_dir)}. Wait for it "
                "to end, or choose another output_dir."
            )
    if share is not None:
        try:
            refusal = share(refusal)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    if refusal is not None:
        if lock is not None:
            lock.release()
        raise RunLockedError(refusal)
    if lock is None:
        yield
        return
    owner = os.path.join(output_dir, OWNER_NAME)
    try:
        with open(owner, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
        yield
    finally:
        for name in (OWNER_NAME, LOCK_NAME):  # removed while still held: the next run starts clean
            try:
                os.unlink(os.path.join(output_dir, name))
            except OSError:
                pass
        lock.release()
