"""Every speed or memory figure in the documents names a results file kept in the repository.

A quoted figure is only as good as the run behind it, so `README.md`, `bench/README.md`,
`kernels/README.md`, `docs/ARCHITECTURE.md` and `docs/PERFORMANCE.md` may quote one only
beside the name of a results file kept in the repository (`bench/runs/<run id>.json`,
or a baseline `bench/baselines/<kind>.json`),
which `python -m bench show FILE` prints. Docstrings and comments say what and why and
quote no measured speed at all.

The check is a heuristic, kept simple and stated here so that it can be reasoned about:

- A document is cut into blocks: runs of non-blank lines outside code fences; a table
  (lines starting with `|`) is a block of its own, and its caption (the paragraph right
  above it, touching it or ending with a colon) counts as part of it for naming a file.
- A block quotes a figure when it matches one of `FIGURE_PATTERNS`: a number with a
  sub-second time unit (ms, us, ns), a memory or data size (KB ... TB, KiB ... TiB), a
  rate (FLOP/s, B/s, tokens/s), a speed ratio ("2.5x faster", "30% slower"), an RTF
  value, or seconds taken ("took 4 s", "3.5 s per ...", "s/s"); a table also quotes
  figures when its header names a timing or memory column (ms, RTF, wall, MB, tok/s,
  first token, ...). Durations of audio ("5 s of speech") and settings without such
  units are not figures.
- A block that quotes a figure passes when it names at least one kept results file
  that exists; naming a file that does not exist fails it. (Names in blocks without a
  figure are not checked: commands use placeholders such as `bench/runs/RUN.json`.)
- Source files (docstrings and comments of `cosyvoice2/`, `bench/`, `eval/`,
  `kernels/`, `reports/`, `noxfile.py`) are checked line by line for the speed patterns
  (times, rates, ratios, RTF, seconds taken); sizes computed from the model's shapes
  (weights, caches) are allowed there, and so are the few settings listed in
  `SOURCE_SETTINGS`.

The planted-figure tests show that the check fails where it should.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = (
    "README.md",
    "bench/README.md",
    "kernels/README.md",
    "docs/ARCHITECTURE.md",
    "docs/PERFORMANCE.md",
)
KEPT_DIRS = ("bench/runs", "bench/baselines")
KEPT_FILE = re.compile(r"bench/(?:runs|baselines)/[A-Za-z0-9_.\-]+\.json")

_N = r"\d+(?:[.,]\d+)?"
FIGURE_PATTERNS: dict[str, str] = {
    "sub-second time": rf"\b{_N}\s?(?:ms|µs|us|ns)\b",
    "memory size": rf"\b{_N}\s?(?:[KMGT]i?B)\b",
    "rate": rf"\b{_N}\s?(?:[KMGT]?FLOP/s|[KMGT]i?B/s|tok/s|tokens?/s|tokens? per second|it/s)",
    "speed ratio": (
        rf"\b{_N}\s?(?:x|×|times)\s+(?:faster|slower|quicker|less time|more time)\b"
        rf"|\b(?:faster|slower)\s+by\s+(?:about\s+)?\d"
        rf"|\b{_N}\s?%\s+(?:faster|slower|less time|more time)"
    ),
    "RTF": r"\bRTF\s*(?:of|=|:|<=|>=|<|>|~|≈|about|is|at|below|under)?\s*\d",
    "time taken": (
        rf"\b{_N}\s?s\s+(?:per|wall|CPU|of CPU)\b"
        rf"|\b(?:took|takes|taking|within)\s+(?:about\s+|~)?{_N}\s?s\b"
        rf"|\b{_N}\s?s/s\b"
    ),
}
FIGURES = {name: re.compile(p) for name, p in FIGURE_PATTERNS.items()}
TABLE_HEADER = re.compile(
    r"\b(?:ms|rtf|wall|gflop|mb|gb|tok/s|tokens/s|first token|first chunk|per token|latency)\b",
    re.IGNORECASE,
)
SPEED = ("sub-second time", "rate", "speed ratio", "RTF", "time taken")
"""The patterns checked in source files (sizes there come from the shapes)."""

SOURCE_SETTINGS = {
    "25 ms frames every 10 ms": "the fbank / Whisper feature frame length and shift",
    "20 ms for times": "bench/compare.py's noise floor, a setting of the comparison",
    "per 10 ms frame": "bench/fidelity.py's F0 frame shift",
    "Each 40 ms frame": "bench/fidelity.py's F0 frame length",
    "within +-2 ms": "bench/fidelity.py's click window around a join",
    "over the 20 ms around": "bench/fidelity.py's local-variation window",
}
"""Exact phrases that match a pattern in source files but state a setting, not a measurement."""

SOURCE_ROOTS = ("cosyvoice2", "bench", "eval", "reports", "kernels/src", "kernels/python")
SOURCE_FILES = ("noxfile.py", "kernels/bench_decode.py")
SOURCE_SUFFIXES = (".py", ".h", ".cpp", ".inc")


@dataclass
class Block:
    line: int
    text: str
    table: bool

    @property
    def end(self) -> int:
        return self.line + self.text.count("\n")


def introduces(caption: Block | None, table: Block) -> bool:
    """Whether `caption` is `table`'s caption: the paragraph right above it, either touching
    it or ending with a colon ("Run X (`bench/runs/X.json`):")."""
    return (
        caption is not None
        and not caption.table
        and (caption.end + 1 == table.line or caption.text.rstrip().endswith(":"))
    )


def blocks(text: str) -> list[Block]:
    """Paragraphs and tables of a markdown text, code fences left out."""
    out: list[Block] = []
    cur: list[str] = []
    start, table, fenced = 0, False, False

    def flush() -> None:
        if cur:
            out.append(Block(start, "\n".join(cur), table))
            cur.clear()

    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            flush()
            fenced = not fenced
            continue
        if fenced or not line.strip():
            flush()
            continue
        is_table = line.lstrip().startswith("|")
        if cur and is_table != table:
            flush()
        if not cur:
            start, table = i, is_table
        cur.append(line)
    flush()
    return out


def figures_in(block: Block) -> list[str]:
    """What in `block` counts as a quoted speed or memory figure."""
    found = [
        f"{name}: {m.group(0)!r}" for name, r in FIGURES.items() for m in r.finditer(block.text)
    ]
    if block.table:
        header = block.text.splitlines()[0]
        if TABLE_HEADER.search(header) and re.search(r"\|\s*[-+]?\d", block.text):
            found.append(f"table of figures: {header.strip()[:60]!r}")
    return found


def violations(text: str, root: Path = ROOT, where: str = "document") -> list[str]:
    """Each block of `text` that quotes a figure without naming an existing kept results file."""
    out = []
    previous: Block | None = None
    for block in blocks(text):
        named = KEPT_FILE.findall(block.text)
        if block.table and introduces(previous, block):
            named += KEPT_FILE.findall(previous.text)
        figs = figures_in(block)
        for name in named if figs else []:  # elsewhere a name may be a placeholder (RUN.json)
            if not (root / name).is_file():
                out.append(f"{where}:{block.line}: names {name}, which does not exist")
        if figs and not any((root / name).is_file() for name in named):
            out.append(
                f"{where}:{block.line}: quotes {'; '.join(figs[:3])} without naming a kept"
                f" results file ({' or '.join(KEPT_DIRS)}/...json)"
            )
        previous = block
    return out


def source_violations(text: str, where: str) -> list[str]:
    """Lines of a source file that quote a measured speed (see the module docstring)."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if KEPT_FILE.search(line):
            continue
        stripped = line
        for phrase in SOURCE_SETTINGS:
            stripped = stripped.replace(phrase, "")
        hits = [m.group(0) for name in SPEED for m in FIGURES[name].finditer(stripped)]
        if hits:
            out.append(f"{where}:{i}: {hits[0]!r} in {line.strip()[:90]!r}")
    return out


def source_files() -> list[Path]:
    files = [ROOT / f for f in SOURCE_FILES]
    for d in SOURCE_ROOTS:
        files += [p for p in sorted((ROOT / d).rglob("*")) if p.suffix in SOURCE_SUFFIXES]
    return [p for p in files if p.is_file()]


# ------------------------------------------------------------------------------ the documents


@pytest.mark.parametrize("doc", DOCS)
def test_document_quotes_figures_only_beside_a_kept_results_file(doc: str) -> None:
    problems = violations((ROOT / doc).read_text(encoding="utf-8"), where=doc)
    assert not problems, "\n".join(problems)


def test_sources_quote_no_measured_speed() -> None:
    files = source_files()
    assert len(files) > 50, "the source scan found too few files: check SOURCE_ROOTS"
    problems = [
        v
        for p in files
        for v in source_violations(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))
    ]
    assert not problems, "\n".join(problems)


def test_kept_results_files_are_valid_and_shown() -> None:
    """Every kept file (those a figure may name) is a valid results file that `show` prints."""
    from bench.report import describe
    from bench.results import load

    kept = {str(p.relative_to(ROOT)) for d in KEPT_DIRS for p in (ROOT / d).glob("*.json")}
    kept = {k for k in kept if not k.endswith(".micro.json")}
    assert kept, "no kept results file at all (the baseline is expected)"
    for name in sorted(kept):
        doc = load(ROOT / name)  # raises on a broken file
        assert doc["run_id"] in describe(doc), name
    baseline = "bench/baselines/linux-x86_64-amd-epyc-f25-2c-avx2.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "show", baseline],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "quiet-2026-11-27-b" in proc.stdout, proc.stderr


# ------------------------------------------------------------------ the check can fail

PLANTED = [
    "Decoding takes 57 ms per token with the kernels.",
    "At its peak the streaming flow holds 3.4 GB.",
    "Prefill runs at 120 GFLOP/s on two cores.",
    "Ours is 2.5x faster than the official code.",
    "The headline case runs at RTF 6.4 on this machine.",
    "The first chunk took 4.7 s on the quiet machine.",
    "The flow needs 3.5 s per second of audio.",
    "| speech LM | ms/token |\n|---|---|\n| fp32 | 105 |",
]
BASELINE = "bench/baselines/linux-x86_64-amd-epyc-f25-2c-avx2.json"


@pytest.mark.parametrize("planted", PLANTED)
def test_a_planted_figure_fails_the_check_until_its_file_is_named(planted: str) -> None:
    text = (ROOT / "bench/README.md").read_text(encoding="utf-8")
    doc = text + "\n\n" + planted + "\n"
    found = violations(doc, where="planted")
    assert len(found) == 1 and "without naming a kept results file" in found[0], found
    if planted.startswith("|"):  # a table is named by its caption
        backed = f"{text}\n\nFrom `{BASELINE}`:\n{planted}\n"
    else:
        backed = f"{text}\n\n{planted} (`{BASELINE}`)\n"
    assert violations(backed, where="backed") == []


def test_a_figure_naming_a_missing_file_fails() -> None:
    doc = "Decoding takes 57 ms per token (`bench/runs/no-such-run.json`).\n"
    found = violations(doc, where="planted")
    assert any("does not exist" in v for v in found) and len(found) == 2, found


def test_audio_durations_and_settings_are_not_figures() -> None:
    doc = (
        "A prompt of 3 s, 28 tokens for `short` (5 s of speech); the first chunk holds\n"
        "0.24 s of audio. The official code polls every 0.1 s; tolerance 25% by default.\n"
    )
    assert violations(doc) == []


@pytest.mark.parametrize(
    "planted",
    [
        '"""One estimator call took 2.3 s here."""',
        "# about 30% faster than op by op",
        "// about 30-200 us per call at decode shapes",
        '"""Prefill at about 115-140 GFLOP/s on 2 cores."""',
    ],
)
def test_a_planted_speed_in_a_docstring_fails(planted: str) -> None:
    assert len(source_violations(planted, "planted.py")) == 1
