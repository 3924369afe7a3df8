"""Bad inputs tried on purpose, each expected to end in one clean error, and the table of them.

Every hardening test goes through one of three checks, which assert and record:

- `refused(area, what, fn, watch=...)`: in this process, `fn()` raises a
  `CosyVoiceError` (never another exception) whose message is one line, and no file
  under `watch` changed (names, sizes and contents);
- `cli_refused(area, what, argv, watch=...)`: `python -m cosyvoice2 ARGV` (or another
  module, `module=`) exits non-zero with a one-line error on stderr and no traceback,
  and no file under `watch` changed; its peak memory is recorded (the child's
  maximum resident set, from `wait4`);
- `bounded(area, what, code, limit_mb, watch=...)`: a Python snippet run in a child
  process (a file bomb read, say) ends in a clean `CosyVoiceError`, printed as
  `REFUSED: <message>`, within `limit_mb` of peak memory.

The test session prints the table of every input tried and, when
`COSYVOICE2_BAD_INPUT_REPORT` names a file, writes it there as markdown (the kept
copy is `docs/bad-inputs.md`).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosyvoice2.errors import CosyVoiceError

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Tried:
    area: str
    what: str
    error: str  # the one-line message
    exit_code: int | None  # None: in process (a raised CosyVoiceError)
    files_changed: bool
    peak_mb: float | None  # None: in process, not measured apart


RECORDS: list[Tried] = []


def snapshot(root: Path | None) -> dict[str, str]:
    """Relative path -> content hash of every file under `root` (empty if None or missing)."""
    if root is None or not root.exists():
        return {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _changed(before: dict[str, str], root: Path | None) -> bool:
    return snapshot(root) != before


def _one_line(message: str, what: str) -> str:
    message = message.strip()
    assert message, f"{what}: empty error message"
    assert "\n" not in message, f"{what}: error message is not one line: {message!r}"
    return message


def _mentions(text: str, match: str | None, what: str) -> None:
    if match is not None:
        assert match.lower() in text.lower(), f"{what}: {text!r} does not mention {match!r}"


def _record(rec: Tried, watch: Path | None) -> Tried:
    RECORDS.append(rec)
    assert not rec.files_changed, f"{rec.what}: files under {watch} changed"
    return rec


def refused(
    area: str,
    what: str,
    fn: Callable[[], Any],
    watch: Path | None = None,
    match: str | None = None,
) -> Tried:
    """`fn()` must raise a one-line `CosyVoiceError` (containing `match`) and change nothing under `watch`."""
    before = snapshot(watch)
    try:
        fn()
    except CosyVoiceError as e:
        message = _one_line(str(e), what)
    except Exception as e:  # noqa: BLE001 - the point: anything else is a failure
        raise AssertionError(f"{what}: {type(e).__name__} instead of a CosyVoiceError: {e}") from e
    else:
        raise AssertionError(f"{what}: accepted, expected a clean error")
    _mentions(message, match, what)
    return _record(Tried(area, what, message, None, _changed(before, watch), None), watch)


def _run_child(argv: list[str], env: dict[str, str] | None, stdin: bytes | None, timeout: float):
    """Run a child process; (exit code, stdout, stderr)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
        cwd=ROOT,
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _peak_child(argv: list[str], env: dict[str, str] | None, stdin: bytes | None, timeout: float):
    """Like `_run_child`, with the child's own peak RSS (MB), measured by a wrapper that
    execs the command and reports `ru_maxrss` of its one child."""
    wrapper = textwrap.dedent(
        """
        import os, resource, subprocess, sys
        p = subprocess.run(sys.argv[1:])
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        sys.stderr.write(f"\\n__PEAK_KB__ {peak_kb}\\n")
        sys.exit(p.returncode)
        """
    )
    code, out, err = _run_child([sys.executable, "-c", wrapper, *argv], env, stdin, timeout)
    peak = None
    lines = []
    for line in err.splitlines():
        if line.startswith("__PEAK_KB__ "):
            peak = int(line.split()[1]) / 1024.0
        else:
            lines.append(line)
    while lines and not lines[-1].strip():
        lines.pop()
    return code, out, "\n".join(lines), peak


def cli_refused(
    area: str,
    what: str,
    argv: list[str],
    watch: Path | None = None,
    match: str | None = None,
    module: str = "cosyvoice2",
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = 600,
) -> Tried:
    """`python -m MODULE ARGV` must exit non-zero with a one-line error and no traceback,
    changing nothing under `watch`."""
    before = snapshot(watch)
    code, _, err, peak = _peak_child([sys.executable, "-m", module, *argv], env, stdin, timeout)
    assert "Traceback" not in err, f"{what}: traceback on stderr:\n{err}"
    assert code != 0, f"{what}: exit code 0, expected an error"
    assert code > 0, f"{what}: killed by signal {-code}:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, f"{what}: no error message on stderr"
    message = _one_line(lines[-1], what)
    _mentions(err, match, what)
    return _record(Tried(area, what, message, code, _changed(before, watch), peak), watch)


def bounded(
    area: str,
    what: str,
    code: str,
    limit_mb: float,
    watch: Path | None = None,
    match: str | None = None,
    timeout: float = 600,
) -> Tried:
    """Run `code` in a child process; it must end in a `CosyVoiceError` within `limit_mb`.

    `code` is a snippet that raises; the child catches `CosyVoiceError` and prints
    `REFUSED: <message>`, anything else is a traceback and fails the check.
    """
    body = textwrap.indent(textwrap.dedent(code), "    ")
    script = (
        "import sys\nfrom cosyvoice2.errors import CosyVoiceError\ntry:\n"
        f"{body}\nexcept CosyVoiceError as e:\n"
        "    print('REFUSED: ' + str(e))\n    sys.exit(3)\n"
        "print('ACCEPTED')\n"
    )
    before = snapshot(watch)
    rc, out, err, peak = _peak_child([sys.executable, "-c", script], None, None, timeout)
    assert "Traceback" not in err, f"{what}: traceback:\n{err}"
    assert "ACCEPTED" not in out, f"{what}: accepted, expected a clean error"
    assert rc == 3, f"{what}: exit code {rc} (killed or crashed?):\n{out}\n{err}"
    message = _one_line(out.split("REFUSED: ", 1)[1], what)
    _mentions(message, match, what)
    rec = _record(Tried(area, what, message, rc, _changed(before, watch), peak), watch)
    assert peak is not None and peak <= limit_mb, f"{what}: peak {peak} MB > {limit_mb} MB"
    return rec


_TMP = re.compile(r"/\S*?/pytest-of-[^/]+/pytest-\d+/[^/\s]+")


def _cell(text: str) -> str:
    """A table cell: pipes escaped, pytest's temporary directories as `TMP`."""
    return _TMP.sub("TMP", text).replace("|", "\\|").replace("\n", " ")


def table() -> str:
    """The markdown table of every input tried, and the summary line."""
    rows = [
        "| area | input | error | exit code | files changed | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(RECORDS, key=lambda r: (r.area, r.what)):
        code = "raised" if r.exit_code is None else str(r.exit_code)
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:.0f}"
        rows.append(
            f"| {_cell(r.area)} | {_cell(r.what)} | {_cell(r.error)} | {code} | "
            f"{'yes' if r.files_changed else 'no'} | {peak} |"
        )
    return "\n".join(rows) + "\n\n" + summary() + "\n"


def summary() -> str:
    n = len(RECORDS)
    changed = sum(r.files_changed for r in RECORDS)
    peaks = [r.peak_mb for r in RECORDS if r.peak_mb is not None]
    top = f", largest child peak {max(peaks):.0f} MB" if peaks else ""
    return (
        f"{n} bad inputs tried, {n} clean errors, 0 tracebacks, {changed} with files changed{top}."
    )


MARKER = "<!-- the table below is written by the test session -->"


def write_report(path: Path) -> None:
    """Write the table to `path`, after its `MARKER` line when it has one (a kept document
    keeps its introduction), else as the whole file."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    head = text[: text.index(MARKER) + len(MARKER)] + "\n\n" if MARKER in text else ""
    path.write_text(head + table(), encoding="utf-8")
