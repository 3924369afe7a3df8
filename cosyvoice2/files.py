"""Writing a directory so that it appears whole or not at all.

Converted models, synthetic checkpoints and caches are directories of several
files; a reader (or a rerun after Ctrl-C, or after the process was killed with
`kill -9`) must never see one half written, and must never find the old one lost.

`staged_dir(dst)` fills a staging directory beside `dst` (`.NAME.staging-*`) and
swaps it in at the end in two renames and a removal:

1. `dst` -> `.NAME.backup` (the old directory, whole),
2. staging -> `dst` (the new directory, whole),
3. remove `.NAME.backup`.

A process killed at any point leaves `dst` old or new, or (between steps 1 and 2)
missing with the old one whole under the backup name. `recover_dir(dst)` puts
things right: it restores the backup when `dst` is missing, removes a leftover
backup when `dst` is there, and removes staging directories that no live process
holds. Every `staged_dir` calls it before it starts and again before the swap, so
the next writer recovers what a killed one left.

A staging directory is held with an advisory lock (`flock`) for as long as its
writer lives, so recovery never removes the staging directory of a writer still
at work; the swap and the recovery hold a lock on the parent directory, so two of
them never interleave. Where `fcntl` is missing, stale staging directories are
left in place (nothing can tell them from live ones) and the rest works the same.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None  # type: ignore[assignment]


def _staging_prefix(dst: Path) -> str:
    return f".{dst.name}.staging-"


def backup_path(dst: str | Path) -> Path:
    """Where `staged_dir` keeps the old `dst` during its swap (`.NAME.backup` beside it)."""
    dst = Path(dst)
    return dst.parent / f".{dst.name}.backup"


def _open_dir(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


@contextmanager
def _locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive `flock` on the directory `path`; yields whether it was taken
    (False where another holds it, non-blocking, or the file system has no locks;
    True, without a lock, where `fcntl` is missing)."""
    if fcntl is None:
        yield True
        return
    fd = _open_dir(path)
    if fd is None:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        taken = True
    except OSError:  # held by another (non-blocking), or a file system without locks
        taken = False
    try:
        yield taken
    finally:
        os.close(fd)  # closing releases the lock


def _remove(path: Path) -> None:
    """Remove a file, link or directory tree (what is left of it, if a removal was cut short)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _lexists(path: Path) -> bool:
    return os.path.lexists(path)


def _recover_locked(dst: Path) -> None:
    backup = backup_path(dst)
    if _lexists(backup):
        if _lexists(dst):
            _remove(backup)  # the swap finished; only its cleanup was left
        else:
            os.replace(backup, dst)  # killed between the two renames: the old dir comes back
    if fcntl is None:
        return
    prefix = _staging_prefix(dst)
    for p in dst.parent.iterdir():
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        with _locked(p, blocking=False) as free:
            if free:  # no live writer holds it: left by a killed run
                shutil.rmtree(p, ignore_errors=True)


def recover_dir(dst: str | Path) -> None:
    """Undo what a writer killed in the middle of `staged_dir(dst)` left behind.

    Restores `dst` from its backup when `dst` is missing (the kill fell between the
    two renames of the swap), removes a backup left beside a complete `dst`, and
    removes the staging directories of writers that are no longer alive. Safe to call
    at any time, also while other writers are at work.
    """
    dst = Path(dst)
    if not dst.parent.is_dir():
        return
    with _locked(dst.parent):
        _recover_locked(dst)


@contextmanager
def staged_dir(dst: str | Path) -> Iterator[Path]:
    """A fresh directory beside `dst` to fill; it replaces `dst` when the block ends cleanly.

    On an error (or KeyboardInterrupt) inside the block the staging directory is
    removed and `dst`, if it existed, is left as it was; if the process is killed,
    `dst` is left old or new and the next `staged_dir` or `recover_dir` of it
    cleans up (see the module docstring). The result is readable by all (mode 0755,
    where `mkdtemp` gives 0700).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dst.parent):
        _recover_locked(dst)
        tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(dst), dir=dst.parent))
        hold = _hold(tmp)  # until the block ends or this process does: marks tmp as live
    try:
        tmp.chmod(0o755)
        yield tmp
        with _locked(dst.parent):
            _recover_locked(dst)
            backup = backup_path(dst)
            if _lexists(dst):
                os.replace(dst, backup)
            os.replace(tmp, dst)
            _remove(backup)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            recover_dir(dst)  # an error between the two renames: put the old dir back now
        except OSError:
            pass  # the next writer's recovery will; the error to report is the first one
        raise
    finally:
        if hold is not None:
            os.close(hold)


def _hold(path: Path) -> int | None:
    """An open descriptor of `path` holding an exclusive lock on it (None without locks)."""
    if fcntl is None:
        return None
    fd = _open_dir(path)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks: tmp is then never taken for stale
        pass
    return fd
