"""The `COSYVOICE2_*` environment switches: one table and one parser.

Every runtime read of a `COSYVOICE2_*` variable in `cosyvoice2/` and
`cosyvoice2_testing/` goes through `flag`, `integer` or `path` here, so each
variable is spelled, defaulted and validated the same way wherever it is used.
Values are read at call time, never cached here: tests switch them with
`monkeypatch.setenv` while the process runs.

`SWITCHES` also lists the variables read elsewhere (the C++ extension, the test
harness) so that `docs/ARCHITECTURE.md` can show all of them in one table
(`markdown_table`; `tests/test_settings.py` keeps the two in step).

Booleans accept `1/on/true/yes` and `0/off/false/no` (any case, surrounding
spaces ignored); an unset or empty variable takes its default; any other value is
a `ValueError` naming the variable. This module imports nothing else from the
package (layer 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TRUE = ("1", "on", "true", "yes")
FALSE = ("0", "off", "false", "no")


@dataclass(frozen=True)
class Switch:
    """One environment variable: how it is parsed, its default, what it does, who reads it."""

    name: str
    kind: str  # "flag", "integer", "path" or "text"
    default: str  # as written in the docs table; flags' and integers' defaults are parsed from it
    values: str
    meaning: str
    reader: str


# Read through this module: the backend switches when a backend is chosen (at load), the others at call time.
_READ_HERE = (
    Switch("COSYVOICE2_KERNELS", "flag", "1", "flag", "`0` makes the package behave as if the C++ extension were not installed (it is not even imported): the speech LM is not swapped, the flow uses MLX's ops", "`cosyvoice2.backend` (`load_extension`, when a backend is chosen at load)"),
    Switch("COSYVOICE2_FLOW_KERNELS", "flag", "1", "flag", "`0` keeps the flow's element-wise ops in MLX instead of the numba row kernels (which only the CPU route without the extension uses)", "`cosyvoice2.backend` (`load_row_kernels`, when a backend is chosen at load)"),
    Switch("COSYVOICE2_FLOW_BRANCH_THREADS", "flag", "1", "flag", "`0` runs the estimator's two CFG branches one after the other in the calling thread (batch 1, as the extension's kernels take it; one batched call on the composed route) instead of on two threads (CPU with >= 2 cores only)", "`cosyvoice2.backend` (`choose`, at load)"),
    Switch("COSYVOICE2_FLOW_THREADS", "integer", "", "integer >= 1", "threads of the numba flow kernels; unset: the CPUs this process may run on", "`cosyvoice2.row_kernels` (`num_threads`)"),
    Switch("COSYVOICE2_STREAM_LLM_THREAD", "flag", "0", "flag", "`1` runs the speech LM in its own thread while streaming (CPU with >= 2 cores, branch threads on); off by default since it competes with the flow's branch threads", "`cosyvoice2.streaming` (`overlap_enabled`)"),
    Switch("COSYVOICE2_BLAS", "text", "auto", "`auto`, `system`, `scipy-openblas32`, `off`, a library path", "which BLAS MLX's CPU matmul binds to on Linux, loaded before MLX: `auto` takes an OpenBLAS in `LD_PRELOAD`, else the system's, else the scipy-openblas32 wheel's through a shim compiled once; `off` keeps MLX's bundled reference BLAS", "`cosyvoice2.blas` (`setup`, when the package is imported)"),
    Switch("COSYVOICE2_MALLOC_TUNE", "flag", "1", "flag", "`0` leaves glibc's allocator as it is; by default blocks of a mebibyte and more are mapped and handed back to the system when freed (a fixed `M_MMAP_THRESHOLD`), which keeps a process's resident memory near what it uses", "`cosyvoice2.malloc` (`tune`, when the package is imported)"),
    Switch("COSYVOICE2_CACHE", "path", "~/.cache/cosyvoice2-mlx", "directory", "where synthetic official models, ONNX exports, converted Whisper models and the scipy-openblas32 shim are cached", "`cosyvoice2_testing.synthetic`, `cosyvoice2_testing.onnx_exports`, `eval/whisper_convert.py`, `cosyvoice2.blas`"),
)  # fmt: skip

# Read by the C++ extension itself (listed for the docs table).
_READ_BY_EXTENSION = (
    Switch("COSYVOICE2_KERNELS_ISA", "text", "the best available", "`amx`, `avx512bf16`, `avx512`, `avx2`, `portable`", "forces the extension's instruction-set variant", "the C++ extension (`kernels/src/linear.cpp`)"),
    Switch("COSYVOICE2_KERNELS_THREADS", "text", "the CPUs, at most 8", "integer >= 1", "threads of the extension's pool (created once)", "the C++ extension (`kernels/src/pool.cpp`)"),
    Switch("COSYVOICE2_KERNELS_SPIN_US", "text", "50", "integer (microseconds)", "how long the extension's idle workers poll before sleeping", "the C++ extension (`kernels/src/pool.cpp`)"),
)  # fmt: skip

# Read by the test harness (tests/conftest.py, noxfile.py), not by the package.
_READ_BY_TESTS = (
    Switch("COSYVOICE2_NO_SKIP", "text", "unset", "any non-empty value", "a skipped test fails instead (set by `nox -s tests`)", "tests/conftest.py, noxfile.py"),
    Switch("COSYVOICE2_KERNELS_UNBUILDABLE", "text", "unset", "any non-empty value", "the extension could not be built: its tests may skip even with `COSYVOICE2_NO_SKIP`", "tests/conftest.py, noxfile.py"),
    Switch("COSYVOICE2_POWER_REPORT", "text", "unset", "file path", "where the parity power tests write their report", "tests/conftest.py"),
)  # fmt: skip

SWITCHES: dict[str, Switch] = {
    s.name: s for s in (*_READ_HERE, *_READ_BY_EXTENSION, *_READ_BY_TESTS)
}


def _switch(name: str, kind: str) -> Switch:
    s = SWITCHES.get(name)
    if s is None:
        raise KeyError(f"{name}: not a known switch (cosyvoice2/settings.py SWITCHES)")
    if s.kind != kind:
        raise TypeError(f"{name} is a {s.kind} switch, not a {kind}")
    return s


def _raw(name: str) -> str | None:
    """The variable's value with surrounding spaces removed, or None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or None


def parse_flag(name: str, value: str) -> bool:
    """`value` as a boolean (`1/on/true/yes`, `0/off/false/no`, any case); else a ValueError naming `name`."""
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ValueError(
        f"{name}={value!r}: expected one of {'/'.join(TRUE)} or {'/'.join(FALSE)} (any case)"
    )


def flag(name: str) -> bool:
    """The boolean switch `name`, read now; its default when unset or empty."""
    s = _switch(name, "flag")
    value = _raw(name)
    return parse_flag(name, s.default if value is None else value)


def integer(name: str) -> int | None:
    """The integer switch `name`, read now; its default (None for an empty default) when unset or empty."""
    s = _switch(name, "integer")
    value = _raw(name)
    if value is None:
        return int(s.default) if s.default else None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def text(name: str) -> str | None:
    """The text switch `name`, read now; None when unset or empty."""
    _switch(name, "text")
    return _raw(name)


def path(name: str) -> Path:
    """The directory switch `name`, read now; its default (with `~` expanded) when unset or empty."""
    s = _switch(name, "path")
    value = _raw(name)
    return Path(value) if value is not None else Path(s.default).expanduser()


def markdown_table() -> str:
    """The table of `SWITCHES` as it appears in docs/ARCHITECTURE.md."""
    rows = [
        "| variable | values | default | what it does | read by |",
        "|---|---|---|---|---|",
    ]
    for s in SWITCHES.values():
        default = f"`{s.default}`" if s.kind != "text" and s.default else (s.default or "unset")
        rows.append(f"| `{s.name}` | {s.values} | {default} | {s.meaning} | {s.reader} |")
    return "\n".join(rows) + "\n"
