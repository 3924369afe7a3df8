"""Writing a directory so that it appears whole or not at all.

Converted models, synthetic checkpoints and caches are directories of several
files; a reader (or a rerun after Ctrl-C) must never see one half written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_dir(dst: str | Path) -> Iterator[Path]:
    """A fresh directory beside `dst` to fill; it replaces `dst` when the block ends cleanly.

    On an error (or KeyboardInterrupt) inside the block the staging directory is
    removed and `dst`, if it existed, is left as it was. The result is readable by
    all (mode 0755, where `mkdtemp` gives 0700).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
