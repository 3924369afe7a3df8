"""Dying just before the K-th file system step, as a SIGKILL would: for child processes of
the interruption tests.

`before_step(k)` returns `step`, a wrapper: `os.replace = step(os.replace)` makes the
process end with `os._exit(KILLED)` (no `except`, no `finally`, as with SIGKILL) when
the k-th wrapped call starts (k = 0: never), and `seen`, the list holding the number of
wrapped calls so far.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

KILLED = 137  # the exit status of a child stopped before its step


def before_step(k: int) -> tuple[Callable[[Callable[..., Any]], Callable[..., Any]], list[int]]:
    seen = [0]

    def step(fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*a: Any, **kw: Any) -> Any:
            seen[0] += 1
            if seen[0] == k:
                os._exit(KILLED)
            return fn(*a, **kw)

        return inner

    return step, seen
