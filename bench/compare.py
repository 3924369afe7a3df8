"""`bench compare RUN BASELINE`: ratios per case and figure, and the regression verdict.

Cases are matched by id. For every figure with a direction (`bench.figures.FIGURES`)
present in both, the ratio is run / baseline (medians). The *worsening* is that
ratio for lower-is-better figures (times, memory) and its inverse for
higher-is-better ones (tokens/s), so a 2x slowdown reads 2.00 either way. A figure
regresses when its worsening exceeds 1 + tolerance (default 25%, chosen for noisy
shared machines; some figures state their own, e.g. load time 50%), and counts as
improved below 1 / (1 + tolerance). When both values are under the figure's floor
(e.g. 20 ms for times) the difference is noise and is not judged.

Cases only in the run are `new`; cases only in the baseline are `missing` (a
failure with `strict`). Comparing runs of different weights labels or machine kinds
is allowed but warned about. A run whose cases ran on several machine kinds (merged
from ranks on different machines, `bench.shards`) is never compared as one machine:
each case is compared only with a baseline case of its own kind (the others are listed
as not compared), and `bench compare` without a baseline compares each kind's cases
with that kind's baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bench.figures import DEFAULT_TOLERANCE, FIGURES
from bench.results import case_index, case_machine, machine_kinds


@dataclass
class Row:
    case: str
    figure: str
    baseline: float
    run: float
    ratio: float
    worse: float
    tolerance: float
    verdict: str  # ok | improved | REGRESSION | noise


@dataclass
class Comparison:
    rows: list[Row] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    """Cases that are ok in the baseline but not in the run (error / unsupported)."""
    warnings: list[str] = field(default_factory=list)
    other_machine: list[str] = field(default_factory=list)
    """Cases not compared: the run's ran on another machine kind than the baseline's."""
    strict: bool = False

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "REGRESSION"]

    @property
    def ok(self) -> bool:
        if self.regressions or self.failed:
            return False
        return not (self.strict and self.missing)


def tolerance_for(name: str, default: float, overrides: dict[str, float]) -> float:
    if name in overrides:
        return overrides[name]
    fig = FIGURES[name]
    return fig.tolerance if fig.tolerance is not None else default


def compare(
    run: dict[str, Any],
    baseline: dict[str, Any],
    tolerance: float = DEFAULT_TOLERANCE,
    overrides: dict[str, float] | None = None,
    floors: bool = True,
    strict: bool = False,
) -> Comparison:
    """Compare two results documents (see the module docstring for the rules)."""
    overrides = overrides or {}
    unknown = set(overrides) - set(FIGURES)
    if unknown:
        raise ValueError(f"tolerance given for unknown figures {sorted(unknown)}")
    out = Comparison(strict=strict)
    several = len(machine_kinds(run)) > 1 or len(machine_kinds(baseline)) > 1
    for what, get in (
        ("weights", lambda d: d.get("weights", {}).get("label")),
        ("machine kind", lambda d: d.get("machine", {}).get("kind")),
    ):
        a, b = get(run), get(baseline)
        if a != b and not (several and what == "machine kind"):
            out.warnings.append(f"{what} differ: run {a!r}, baseline {b!r}")
    if several:
        out.warnings.append(
            "cases of several machine kinds: each is compared only with a baseline case of its kind"
        )
    for what, doc in (("run", run), ("baseline", baseline)):
        load = busiest(doc)
        cores = doc.get("machine", {}).get("cores") or 1
        if load is not None and load > 1.25 * cores:
            out.warnings.append(
                f"the {what} was measured on a loaded machine (load average up to {load:.1f}"
                f" on {cores} cores): wall times are inflated, `cpu_s` is the steadier figure"
            )
    runs, bases = case_index(run), case_index(baseline)
    for cid, rc in runs.items():
        bc = bases.get(cid)
        if bc is None:
            out.new.append(cid)
            continue
        if bc.get("status") != "ok":
            continue
        kinds = case_machine(run, rc).get("kind"), case_machine(baseline, bc).get("kind")
        if several and kinds[0] != kinds[1]:
            out.other_machine.append(f"{cid}: ran on {kinds[0]}, baseline on {kinds[1]}")
            continue
        if rc.get("status") != "ok":
            out.failed.append(f"{cid}: {rc.get('status')}: {rc.get('error') or rc.get('reason')}")
            continue
        for name, fig in FIGURES.items():
            if fig.better is None or name not in rc["figures"] or name not in bc["figures"]:
                continue
            r = float(rc["figures"][name]["median"])
            b = float(bc["figures"][name]["median"])
            tol = tolerance_for(name, tolerance, overrides)
            out.rows.append(_judge(cid, name, r, b, tol, fig.better, fig.floor if floors else 0.0))
    out.missing = [cid for cid in bases if cid not in runs]
    return out


def busiest(doc: dict[str, Any]) -> float | None:
    """The highest 1-minute load average recorded at a case's start or end (None if unknown)."""
    loads = [
        v
        for c in doc.get("cases", [])
        for k in ("loadavg_start", "loadavg_end")
        if isinstance(v := c.get("env", {}).get(k), (int, float))
    ]
    return max(loads, default=None)


def _judge(case: str, name: str, run: float, base: float, tol: float, better: str, floor: float):
    ratio = run / base if base else (1.0 if run == base else math.inf)
    if better == "lower":
        worse = ratio
    else:
        worse = base / run if run else (1.0 if run == base else math.inf)
    if floor > 0 and abs(run) < floor and abs(base) < floor:
        verdict = "noise"
    elif worse > 1.0 + tol:
        verdict = "REGRESSION"
    elif worse < 1.0 / (1.0 + tol):
        verdict = "improved"
    else:
        verdict = "ok"
    return Row(case, name, base, run, ratio, worse, tol, verdict)


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def format_table(cmp: Comparison, markdown: bool = False, only_changes: bool = False) -> str:
    """The comparison as a text (or markdown) table, then the verdict."""
    head = ["case", "figure", "baseline", "run", "run/base", "worse x", "tol", "verdict"]
    rows = [
        [
            r.case,
            r.figure,
            _fmt(r.baseline),
            _fmt(r.run),
            _fmt(r.ratio),
            _fmt(r.worse),
            f"{r.tolerance:.0%}",
            r.verdict,
        ]
        for r in cmp.rows
        if not only_changes or r.verdict in ("REGRESSION", "improved")
    ]
    lines: list[str] = []
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in rows]
    lines.append("")
    for w in cmp.warnings:
        lines.append(f"warning: {w}")
    for cid in cmp.new:
        lines.append(f"new case (no baseline): {cid}")
    for cid in cmp.missing:
        lines.append(f"missing from run: {cid}")
    for line in cmp.other_machine:
        lines.append(f"not compared (another machine kind): {line}")
    for f in cmp.failed:
        lines.append(f"failed in run: {f}")
    n_reg = len(cmp.regressions)
    improved = sum(r.verdict == "improved" for r in cmp.rows)
    verdict = "PASS" if cmp.ok else "FAIL"
    lines.append(
        f"{verdict}: {len(cmp.rows)} figures compared, {n_reg} regressions,"
        f" {improved} improvements, {len(cmp.failed)} failed cases"
    )
    return "\n".join(lines)
