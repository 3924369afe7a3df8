"""`cosyvoice2.files.staged_dir`: a directory appears whole or not at all."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cosyvoice2.files import staged_dir


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
