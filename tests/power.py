"""Power checks: a parity comparison must fail when a small, realistic bug is put into our side.

A parity test that passes proves little unless the same comparison would fail on a
plausible mistake. `assert_power` runs one comparison twice, clean and with a bug
injected into our code (never into the reference), and asserts

- the clean error is within the tolerance, and
- the bugged error exceeds the tolerance by at least `FACTOR` (10x).

For exact comparisons (tokens, tolerance 0) the error is a count of mismatching
positions and the bugged count must reach `DISCRETE_MARGIN`.

Every check is recorded; the test session prints a table of them (comparison,
bug, clean error, tolerance, bugged error) and, when `COSYVOICE2_POWER_REPORT`
names a file, writes them there as JSON.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pytest

FACTOR = 10.0
DISCRETE_MARGIN = 10


@dataclass(frozen=True)
class PowerRecord:
    test: str
    comparison: str
    bug: str
    clean: float
    tol: float
    bugged: float

    @property
    def required(self) -> float:
        return FACTOR * self.tol if self.tol > 0 else float(DISCRETE_MARGIN)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "required": self.required}


RECORDS: list[PowerRecord] = []


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]


def assert_power(
    comparison: str,
    measure: Callable[[], float],
    tol: float,
    bug: contextlib.AbstractContextManager,
    bug_name: str,
) -> PowerRecord:
    """Measure `comparison` clean and under `bug`; assert it passes clean and fails bugged by `FACTOR`."""
    clean = float(measure())
    with bug:
        bugged = float(measure())
    rec = PowerRecord(_current_test(), comparison, bug_name, clean, tol, bugged)
    RECORDS.append(rec)
    print(
        f"[power] {comparison}: clean {clean:.3g}, tolerance {tol:.3g}, "
        f"bugged ({bug_name}) {bugged:.3g}"
    )
    assert clean <= tol, f"{comparison}: clean error {clean:.3g} > tolerance {tol:.3g}"
    assert bugged >= rec.required, (
        f"{comparison}: with the bug '{bug_name}' the error is {bugged:.3g}, "
        f"not >= {rec.required:.3g} ({FACTOR:g}x the tolerance {tol:.3g}): the test is too weak"
    )
    return rec


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set `obj.name = value` for the block, then restore it.

    An MLX `nn.Module` is a dict that keeps its arrays and submodules as items, not
    in `__dict__`: those are saved and restored as items (MonkeyPatch, which looks
    in `__dict__`, would delete them on undo).
    """
    if isinstance(obj, dict) and name in obj:
        # as an item both ways: `setattr` of a value that is not an array or a module
        # (a function, say) would land in `__dict__` and shadow the item after the restore
        saved = obj[name]
        try:
            obj[name] = value
            yield
        finally:
            obj[name] = saved
        return
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(obj, name, value)
        yield
    finally:
        mp.undo()


@contextlib.contextmanager
def wrapped(obj: Any, name: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace the callable `obj.name` by `make(original)` for the block, then restore it."""
    with patched(obj, name, make(getattr(obj, name))):
        yield


def table(records: list[PowerRecord] | None = None) -> str:
    """The records as a markdown table."""
    rows = [
        "| test | comparison | bug | clean | tolerance | bugged | bugged / tolerance |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records if records is not None else RECORDS:
        ratio = f"{r.bugged / r.tol:.3g}x" if r.tol > 0 else f"{r.bugged:g} mismatches"
        rows.append(
            f"| {r.test} | {r.comparison} | {r.bug} | {r.clean:.3g} | {r.tol:.3g} "
            f"| {r.bugged:.3g} | {ratio} |"
        )
    return "\n".join(rows)
