"""Hide torch and the official CosyVoice code from this process, as in an environment without them.

Load it first, as a pytest plugin or by importing it, to check that tests or code run
without the parity environment:

    python -m pytest -p tests.no_torch tests/test_cli.py ...

Every import finder is wrapped so that it does not find the hidden packages: `import torch`
raises ModuleNotFoundError (`pytest.importorskip("torch")` skips) and
`importlib.util.find_spec("torch")` answers None, which is how libraries that use torch
when it is there (transformers, through mlx-lm; scipy) decide that it is not.
"""

from __future__ import annotations

import sys
from typing import Any

HIDDEN = ("torch", "torchaudio", "cosyvoice")


class _Hiding:
    """An import finder that finds what `finder` finds, except the hidden packages."""

    def __init__(self, finder: Any) -> None:
        self.finder = finder

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name.split(".")[0] in HIDDEN:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr: str) -> Any:  # invalidate_caches, find_distributions, ...
        return getattr(self.finder, attr)


def hide() -> None:
    """Hide `HIDDEN`; refuses once one of them is already imported (too late to hide it)."""
    loaded = loaded_hidden()
    if loaded:
        raise RuntimeError(f"already imported, cannot be hidden: {loaded[:5]}")
    sys.meta_path[:] = [f if isinstance(f, _Hiding) else _Hiding(f) for f in sys.meta_path]


def loaded_hidden() -> list[str]:
    """The modules of `HIDDEN` (or under them) that are really imported in this process."""
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if module is not None and name.split(".")[0] in HIDDEN
    )


hide()
