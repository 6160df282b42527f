"""Parallel members: which process trains which member, and waiting for all of them (``parallel_members``).

Assignment is round-robin over the members to train (StarSSE: 1..K-1 after model 1; Local DE: 0..K-1), so
process ``r`` of ``N`` trains ``members[r::N]``. Each process writes the members it trained; every process
then waits until all K member directories exist (the members are the only thing gathered: weights never travel
between processes), with an overall progress bar on the main process. Waiting polls the file system rather
than a collective barrier: a process that finished early may wait a whole branch, longer than a collective's
timeout (``ddp_timeout``). A process that dies ends the launch (torchrun / accelerate stop the others).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

__all__ = ["MemberProgress", "assigned_members", "wait_for_members"]


def assigned_members(members: Sequence[int], process_index: int, num_processes: int) -> list[int]:
    """The members process `process_index` of `num_processes` trains: every N-th, starting at its index."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} is not one of {num_processes} processes.")
    return list(members)[process_index::num_processes]


class MemberProgress:
    """Members done out of K (a member is done once its directory exists), as a tqdm bar when enabled."""

    def __init__(self, member_paths: Sequence[str], enabled: bool):
        self.member_paths = list(member_paths)
        self.bar = tqdm(total=len(self.member_paths), desc="members", unit="member", disable=not enabled)
        self.refresh()

    def done(self) -> int:
        return sum(os.path.isdir(p) for p in self.member_paths)

    def refresh(self) -> int:
        done = self.done()
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        return done

    def close(self) -> None:
        self.bar.close()


def wait_for_members(progress: MemberProgress, poll_seconds: float = 0.2) -> None:
    """Return once every member directory exists (members are written atomically: present means whole)."""
    while progress.refresh() < len(progress.member_paths):
        time.sleep(poll_seconds)
