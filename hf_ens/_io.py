"""One way to write files and directories so that a crash leaves the old or the new content, never a mix.

Everything the project writes (members, soups, ensemble repos, checkpoints' side files, plots, metrics, the
pre-training cache) goes through `atomic_directory` or `atomic_file`:

- the new content is built in a hidden sibling (``.NAME.tmp-XXXX``) that gets the modes a plain
  ``save_pretrained`` would get under the user's umask (``tempfile`` alone would make it private);
- it replaces the target in ONE step: a new target is one ``rename``; an existing directory is swapped with
  ``renameat2(RENAME_EXCHANGE)`` (Linux), so a reader sees the complete old or the complete new directory.
  Where the kernel lacks that call, the old directory is first renamed aside (``.NAME.old-XXXX``) and
  `recover` puts it back if a crash hits between the two renames;
- files in an existing directory that the writer does not own (``keep``) are carried over by hard link, so
  a user's ``notes.txt`` beside a saved ensemble survives;
- leftovers of a killed writer (``.NAME.tmp-*``, ``.NAME.old-*``) are removed by the next writer of NAME;
  whole directories that must go (old checkpoints, an old run) leave through `discard`: one rename into a
  hidden trash directory, then a delete, so a kill leaves each in place or out of the way;
  a live writer holds a lock on its temporary directory, so a concurrent writer of NAME never removes it
  (two saves at once both complete; the later swap wins);
- entries another process adds to the directory while it is being rewritten are moved into the new one
  after the swap: nothing the writer does not own is deleted;
- the new directory keeps the old one's mode, owner and group (``chmod 700``, a setgid group directory); a
  target that is a symlink is written through (its link target is replaced); a target that is, or holds,
  a mount point is refused (a mount point cannot be renamed, and its files are not the writer's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_directory",
    "atomic_file",
    "delete",
    "discard",
    "ensure_writable",
    "recover",
    "remove_leftovers",
    "exchange_paths",
]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def _old_prefix(name: str) -> str:
    return f".{name}.old-"


def _hidden_name(name: str) -> str:
    """A prefix short enough that ``.NAME.tmp-XXXXXXXX`` fits in 255 bytes, even for long names."""
    return name if len(name.encode()) <= 200 else name.encode()[:200].decode(errors="ignore")


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2  # noqa: B018 - raises AttributeError where glibc < 2.28 or not Linux
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    res = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or file system without the flag
        return False
    raise OSError(err, os.strerror(err), f"{a} <-> {b}")


def recover(target: str | os.PathLike) -> None:
    """Undo a replacement that was cut between its two renames (only possible without RENAME_EXCHANGE)."""
    target = Path(target)
    if target.exists():
        return
    olds = [p for p in target.parent.glob(_old_prefix(_hidden_name(target.name)) + "*") if any(p.iterdir())]
    olds.sort(key=os.path.getmtime)
    if olds:  # an empty one is a placeholder that was never filled
        os.rename(olds[-1], target)


def remove_leftovers(target: str | os.PathLike) -> list[Path]:
    """Delete what a killed writer of `target` left beside it; returns what was removed."""
    target = Path(target)
    recover(target)
    name = _hidden_name(target.name)
    removed = []
    if target.parent.is_dir():
        for prefix in (_tmp_prefix(name), _old_prefix(name)):
            for p in target.parent.glob(prefix + "*"):
                if _in_use(p):  # a live writer's (another save of the same directory, right now)
                    continue
                delete(p)
                removed.append(p)
    return removed


def delete(path: str | os.PathLike) -> None:
    """Remove a file, a symlink or a whole directory tree (best effort: a kill may leave part of a tree, so
    call it on what is already out of the way: trash, a temporary sibling)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def discard(paths: list[Path], trash_prefix: str = ".trash-") -> None:
    """Remove directories so that a kill leaves each one either in place or out of the way.

    Each is renamed into a hidden trash directory beside it (``trash_prefix`` + random; one atomic step),
    then the trash is deleted; trash a kill leaves behind is the caller's to `delete` on its next start.
    """
    by_parent: dict[Path, list[Path]] = {}
    for path in map(Path, paths):
        if path.exists():
            by_parent.setdefault(path.parent, []).append(path)
    for parent, children in by_parent.items():
        trash = Path(tempfile.mkdtemp(prefix=trash_prefix, dir=parent))
        for child in children:
            os.rename(child, trash / child.name)
        shutil.rmtree(trash, ignore_errors=True)


def _hold(path: Path) -> int:
    """Open `path` and hold an exclusive lock on it for as long as the descriptor stays open."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _in_use(path: Path) -> bool:
    """Whether a live writer holds `path` (see `_hold`); a killed writer's lock died with it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _link_copy(src: Path, dst: Path) -> None:
    """Carry an entry over without copying bytes where the file system allows hard links."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    if src.is_symlink():  # the link itself, not what it points to
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    else:
        link_or_copy(str(src), str(dst))


def _install(tmp: Path, target: Path) -> Path | None:
    """Put `tmp` in place of `target`; returns where the old content now is (None for a new target)."""
    try:
        os.rename(tmp, target)  # a new target: one rename
        return None
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise
    if exchange_paths(tmp, target):  # tmp now holds the old content
        return tmp
    # No RENAME_EXCHANGE: move the old directory aside (rename onto an empty placeholder is atomic), then
    # the new one in. A crash between the two leaves only the .old- sibling, which `recover` renames back.
    old = tempfile.mkdtemp(prefix=_old_prefix(_hidden_name(target.name)), dir=target.parent)
    os.rename(target, old)
    os.rename(tmp, target)
    return Path(old)


def _carry_late(old: Path, new: Path) -> None:
    """Move into `new` what another process wrote into `old` after its entries were linked into `new`: a
    name `new` lacks, or a file replaced in `old` since (a newer inode). What `new` has already is kept."""
    for name in os.listdir(old):
        src, dst = old / name, new / name
        if not os.path.lexists(dst):
            os.rename(src, dst)
        elif src.is_dir() and not src.is_symlink() and dst.is_dir() and not dst.is_symlink():
            _carry_late(src, dst)
        elif not src.is_dir() and not os.path.samestat(os.lstat(src), os.lstat(dst)):
            if os.lstat(src).st_mtime_ns > os.lstat(dst).st_mtime_ns:
                os.replace(src, dst)


def _drop_owned(old: Path, keep: Callable[[str], bool]) -> None:
    """Delete the writer's own entries from the replaced directory (the new one holds their new content)."""
    for name in os.listdir(old):
        if not keep(name):
            entry = old / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _refuse_mounts(target: Path) -> None:
    """A mount point cannot be renamed (EBUSY) and one inside the directory would be moved away with it."""
    if not target.is_dir():
        return
    inside = [p for p in target.iterdir() if p.is_dir() and not p.is_symlink() and os.path.ismount(p)]
    if os.path.ismount(target) or inside:
        where = f"{target} is a mount point" if os.path.ismount(target) else f"{inside[0]} is a mount point"
        raise OSError(
            errno.EBUSY,
            f"{where}: hf-ens replaces the directory in one rename so that a crash leaves the old or the new "
            "content, which a mounted volume does not allow; refused (nothing was written). Save into a "
            "plain directory (e.g. a subdirectory of the mount).",
            str(target),
        )


def _take_attributes(tmp: Path, target: Path) -> None:
    """Give the new directory what the old one had (mode, setgid, owner, group) or, for a new one, what a
    plain ``mkdir`` would give under the umask (the setgid bit of a group directory is inherited)."""
    if not target.is_dir():
        os.chmod(tmp, (0o777 & ~_umask()) | (os.stat(tmp).st_mode & stat.S_ISGID))
        return
    st = os.stat(target)
    for uid, gid in ((st.st_uid, st.st_gid), (-1, st.st_gid)):  # a non-root writer can keep the group only
        try:
            os.chown(tmp, uid, gid)
            break
        except PermissionError:
            continue
    os.chmod(tmp, stat.S_IMODE(st.st_mode))


def _umask_modes(root: Path) -> None:
    """Give the files written into `root` the umask's modes: some writers (safetensors >= 0.8 writes through a
    private temporary file) leave them ``-rw-------`` where a plain ``open`` under umask 022 gives 644."""
    mask = _umask()
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            mode = path.stat().st_mode
            wanted = (0o666 | (mode & 0o111)) & ~mask
            if stat.S_IMODE(mode) != wanted:
                os.chmod(path, wanted)


@contextmanager
def atomic_directory(target: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty directory to fill; on a normal exit it replaces `target` in one step.

    `keep(name)` -> True for entries of an existing `target` that the writer does not own: those the new
    content lacks are carried over (hard links). Without `keep` the whole old directory is replaced. On an
    exception nothing changes and the temporary directory is removed.
    """
    target = Path(target)
    if target.is_symlink():  # write through the link, as a plain save_pretrained does
        target = Path(os.path.realpath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    _refuse_mounts(target)
    remove_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(_hidden_name(target.name)), dir=target.parent))
    lock = _hold(tmp)
    try:
        _take_attributes(tmp, target)
        yield tmp
        _umask_modes(tmp)
        if keep is not None and target.is_dir():
            for entry in target.iterdir():
                if keep(entry.name) and not (tmp / entry.name).exists():
                    _link_copy(entry, tmp / entry.name)
        old = _install(tmp, target)
        if old is not None:
            if keep is not None:
                _drop_owned(old, keep)
                _carry_late(old, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(lock)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary sibling of `path` for writing; on a normal exit it replaces `path` (flushed to disk).

    The file gets the modes of an ordinary ``open(path, "w")`` under the user's umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(_hidden_name(path.name)), dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_writable(output_dir: str | os.PathLike) -> None:
    """Create `output_dir` and prove a file can be written there: a run fails before it trains, not after."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write_test."):
            pass
    except OSError as err:
        raise ValueError(f"output_dir {str(output_dir)!r} cannot be written: {err}") from err
