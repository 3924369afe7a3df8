"""`cosyvoice2.files.staged_dir`: a directory appears whole or not at all, even when its writer is killed."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cosyvoice2.files import backup_path, recover_dir, staged_dir

ROOT = Path(__file__).resolve().parent.parent


def test_staged_dir_replaces_on_success(tmp_path: Path) -> None:
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with staged_dir(dst) as tmp:
        assert tmp.parent == tmp_path and tmp != dst
        (tmp / "new.txt").write_text("new")
        assert (dst / "old.txt").exists()  # not touched until the block ends
    assert sorted(p.name for p in dst.iterdir()) == ["new.txt"]
    assert stat.S_IMODE(dst.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging dir left


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_staged_dir_keeps_the_old_dir_on_error(tmp_path: Path, error: type) -> None:
    dst = tmp_path / "nested" / "model"
    dst.mkdir(parents=True)
    (dst / "old.txt").write_text("old")
    with pytest.raises(error):
        with staged_dir(dst) as tmp:
            (tmp / "half.txt").write_text("half")
            raise error("interrupted")
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt"]
    assert [p.name for p in dst.parent.iterdir()] == ["model"]


def test_staged_dir_makes_parents_and_no_dir_on_error(tmp_path: Path) -> None:
    dst = tmp_path / "a" / "b" / "model"
    with pytest.raises(ValueError):
        with staged_dir(dst):
            raise ValueError("bad input")
    assert not dst.exists() and list(dst.parent.iterdir()) == []


# --------------------------------------------------------------------------- killed writers

# A child that writes `new.txt` + `more/deep.txt` into `dst` through `staged_dir`, and dies
# (os._exit: no `except`, no `finally`, as with SIGKILL) just before its K-th file system
# step: a rename (`os.replace`/`os.rename`), a tree removal, or one unlink/rmdir inside it.
_KILLED_WRITER = """
import os, shutil, sys
from pathlib import Path

dst, k = Path(sys.argv[1]), int(sys.argv[2])
from tests.kill_steps import before_step

step, seen = before_step(k)

from cosyvoice2 import files
with files.staged_dir(dst) as tmp:
    (tmp / "new.txt").write_text("new")
    (tmp / "more").mkdir()
    (tmp / "more" / "deep.txt").write_text("new")
    for name in ("replace", "rename", "unlink", "rmdir"):
        setattr(os, name, step(getattr(os, name)))
    shutil.rmtree = step(shutil.rmtree)
print("steps", seen[0])
"""

OLD = {"old.txt": "old", "sub/a.txt": "a", "sub/b.txt": "b"}
NEW = {"new.txt": "new", "more/deep.txt": "new"}


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _killed_writer(dst: Path, k: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(dst), str(k)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_staged_dir_killed_at_every_step_keeps_old_or_new(tmp_path: Path) -> None:
    """Killed before each rename, tree removal, or single unlink/rmdir of the swap:
    `dst` is old or new, or missing with the old dir whole as the backup; the next
    `recover_dir` (or writer) brings back old-or-new and removes every leftover."""
    k, outcomes = 1, []
    while True:
        case = tmp_path / f"k{k}"
        dst = case / "model"
        _write_tree(dst, OLD)
        proc = _killed_writer(dst, k)
        if proc.returncode == 0:  # past the last step: it finished
            assert _tree(dst) == NEW and sorted(p.name for p in case.iterdir()) == ["model"]
            break
        assert proc.returncode == 137, proc.stderr
        if dst.exists():
            outcomes.append("old" if _tree(dst) == OLD else "new")
            assert _tree(dst) in (OLD, NEW), f"kill before step {k}: {_tree(dst)}"
        else:
            outcomes.append("backup")
            assert _tree(backup_path(dst)) == OLD, f"kill before step {k}: old dir not whole"
        recover_dir(dst)
        assert _tree(dst) in (OLD, NEW), f"kill before step {k}, recovered: {_tree(dst)}"
        assert sorted(p.name for p in case.iterdir()) == ["model"], f"leftovers after step {k}"
        with staged_dir(dst) as tmp:  # the next writer starts cleanly
            (tmp / "next.txt").write_text("next")
        assert _tree(dst) == {"next.txt": "next"}
        assert sorted(p.name for p in case.iterdir()) == ["model"]
        k += 1
    # every state of the swap was reached: old, mid-swap (backup only), new with a backup
    assert {"old", "backup", "new"} <= set(outcomes), outcomes


def test_the_next_writer_recovers_a_dir_lost_mid_swap(tmp_path: Path) -> None:
    """Killed between the two renames: the next `staged_dir` (not only `recover_dir`)
    restores the old dir first, and an error in its block leaves that old dir."""
    dst = tmp_path / "model"
    _write_tree(dst, OLD)
    k = 1
    while _killed_writer(dst, k).returncode == 137 and dst.exists():
        shutil.rmtree(tmp_path)
        _write_tree(dst, OLD)
        k += 1
    assert not dst.exists() and backup_path(dst).is_dir()
    with pytest.raises(RuntimeError):
        with staged_dir(dst):
            assert _tree(dst) == OLD  # restored before the block runs
            raise RuntimeError("failed conversion")
    assert _tree(dst) == OLD and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_live_writers_staging_dir_is_not_taken_for_stale(tmp_path: Path) -> None:
    dst = tmp_path / "model"
    code = (
        "import sys, time\nfrom cosyvoice2.files import staged_dir\n"
        "with staged_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'x').write_text('x')\n    print(tmp, flush=True)\n    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(dst)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        live = Path(proc.stdout.readline().strip())
        assert live.is_dir() and live.parent == tmp_path
        recover_dir(dst)
        with staged_dir(dst) as tmp:
            (tmp / "y").write_text("y")
        assert (live / "x").is_file()  # still there: its writer lives
        proc.kill()
        proc.wait()
        recover_dir(dst)
        assert not live.exists()  # its writer died: removed
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    finally:
        proc.kill()
        proc.wait()


def test_staged_dir_without_locks(tmp_path: Path, monkeypatch) -> None:
    """Where `fcntl` is missing, the swap and the recovery work; staging dirs stay."""
    from cosyvoice2 import files

    monkeypatch.setattr(files, "fcntl", None)
    dst = tmp_path / "model"
    _write_tree(dst, OLD)
    with staged_dir(dst) as tmp:
        _write_tree(tmp, NEW)
    assert _tree(dst) == NEW
    dst.rename(backup_path(dst))
    recover_dir(dst)
    assert _tree(dst) == NEW and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
