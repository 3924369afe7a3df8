"""The bench part of the report: which setting to use, from bench results files.

Sections (a plot and a table of the same numbers each, so the markdown reads without
the images):

- `rtf_vs_steps`: real-time factor against diffusion steps, a line per precision setting
  (LLM precision, flow/HiFT dtype, flow_bits), non-streaming cases.
- `first_chunk_vs_steps`: streaming first-chunk latency against steps, warm (solid) and
  cold (dashed) per precision and first_hop setting; the table adds the longest playback gap.
- `memory_vs_steps`: peak RSS against steps per precision setting, non-streaming cases.
- `fidelity_vs_rtf` (and `fidelity_vs_rtf_stream` for streaming cases): fidelity against
  real-time factor, every case a labelled point, the Pareto front as a step line and the
  two recommendations of `reports.recommend` marked; on real weights WER is the fidelity
  and `sim_vs_rtf` shows SIM when it was measured.
- `history`: the headline case's real-time factor and its streaming twin's first chunk
  over the runs' dates, a line per machine.

Cases are grouped by weights label, machine and text length; one plot per group. A file
is named after the plot, plus the values of the grouping axes that vary among the cases
read (e.g. `rtf_vs_steps_synthetic.png`), so names are stable for the same inputs.
Synthetic and real cases never share a plot. Plots of synthetic weights carry
`SYNTHETIC_NOTE` in the title, the legend title and every legend entry (as
`SYNTHETIC_TAG`); tables carry it in their caption and weights column.

Every PNG stores, in its PNG text chunks, `Title`, `Series` (a JSON list of the series
names drawn) and `Weights` (the weights label), for checks that read the file back.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from reports.formats import BenchCase, BenchRun
from reports.recommend import (
    FIDELITY_BOUND,
    SPEED_FACTOR,
    TOKEN_AGREEMENT_BOUND,
    WER_MARGIN,
    Point,
    pareto_front,
    recommend,
    wer_bound,
)

SYNTHETIC_NOTE = "SYNTHETIC weights: numerical drift, not speech quality"
SYNTHETIC_TAG = " [SYNTHETIC weights]"
UNKNOWN_NOTE = "UNKNOWN weights: not recorded as the real model"
UNKNOWN_TAG = " [unknown weights]"
HEADLINE = "cosyvoice2/llm=fp32/dtype=fp32/steps=10/text=short/stream=off"
HEADLINE_STREAM = "cosyvoice2/llm=fp32/dtype=fp32/steps=10/text=short/stream=on"
TARGET = "cosyvoice2"
REFERENCE = {
    "llm": "fp32",
    "dtype": "fp32",
    "steps": 10,
    "cfg": None,
    "flow_bits": None,
    "stream": False,
}
"""The reference setting of the fidelity figures, used when a case does not name it."""


@dataclass(frozen=True)
class Row:
    """A case with the run it comes from."""

    run: BenchRun
    case: BenchCase

    @property
    def s(self) -> dict:
        return self.case.settings

    def fig(self, name: str) -> float | None:
        return self.case.figures.get(name)

    def spread(self, name: str) -> str:
        lo, hi = self.case.spread.get(name, (None, None))
        if lo is None or hi is None:
            return "n/a"
        return f"{_fmt(lo)}-{_fmt(hi)}"


# ---------------------------------------------------------------------------- labels


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-").lower() or "x"


def note(weights: str) -> str:
    return {"synthetic": SYNTHETIC_NOTE, "unknown": UNKNOWN_NOTE}.get(weights, "")


def tag(weights: str) -> str:
    return {"synthetic": SYNTHETIC_TAG, "unknown": UNKNOWN_TAG}.get(weights, "")


def cell(weights: str) -> str:
    mark = {"synthetic": " **(SYNTHETIC)**", "unknown": " **(not recorded as real)**"}
    return f"{weights}{mark.get(weights, '')}"


def setting_label(s: dict, stream: bool = False) -> str:
    """ "LLM 8bit, flow fp32", "LLM fp32, flow 8-bit", "LLM fp32, flow bf16 products" (flow_bits
    16), plus the axes off their defaults."""
    if s.get("flow_bits") == 16:
        flow = "flow bf16 products"
        if s.get("dtype") not in (None, "fp32"):
            flow += f" ({s['dtype']})"
    elif s.get("flow_bits"):
        flow = f"flow {s['flow_bits']}-bit"
        if s.get("dtype") not in (None, "fp32"):
            flow += f" ({s['dtype']})"
    else:
        flow = f"flow {s.get('dtype') or 'fp32'}"
    parts = [f"LLM {s.get('llm') or 'default'}", flow]
    if s.get("kernels") not in (None, "auto"):
        parts.append(f"kernels {s['kernels']}")
    if s.get("cfg") is not None:
        parts.append(f"cfg {s['cfg']}")
    if stream:
        if s.get("first_hop") is not None:
            parts.append(f"first_hop {s['first_hop']}")
        if s.get("saved"):
            parts.append("saved speaker")
        if s.get("final") not in (None, "full"):
            parts.append(f"final {s['final']}")
    label = ", ".join(parts)
    target = s.get("target", TARGET)
    return label if target == TARGET else f"{target}: {label}"


def point_label(r: Row) -> str:
    steps = r.s.get("steps")
    return f"{setting_label(r.s, bool(r.s.get('stream')))}, {steps} step{'' if steps == 1 else 's'}"


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _order(label: str) -> tuple:
    return (not label.startswith("LLM fp32, flow fp32"), label)


# ---------------------------------------------------------------------------- grouping


@dataclass(frozen=True)
class Group:
    weights: str
    machine: str
    text: str
    suffix: str  # file-name suffix: "" or "_<varying axes>"
    rows: tuple[Row, ...]

    @property
    def title(self) -> str:
        return f"{self.weights} weights, {self.machine}, text {self.text}"

    def stem(self, name: str) -> str:
        return f"{name}{self.suffix}"


def groups(benches: Sequence[BenchRun]) -> list[Group]:
    """The cases of the `cosyvoice2` target (and its peers) by weights, machine and text."""
    rows = [Row(b, c) for b in benches for c in b.cases]
    keyed: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for r in rows:
        machine = r.case.machine or r.run.machine  # a merged run's cases name their own
        keyed[(r.case.weights, machine, str(r.s.get("text", "?")))].append(r)
    varying = [len({k[i] for k in keyed}) > 1 for i in range(3)]
    out = []
    for key in sorted(keyed):
        parts = [slug(v) for v, vary in zip(key, varying) if vary]
        suffix = "".join(f"_{p}" for p in parts)
        out.append(Group(*key, suffix=suffix, rows=tuple(keyed[key])))
    return out


# ---------------------------------------------------------------------------- drawing


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _figure(plt, figsize, dpi, ncols: int = 1):
    return plt.subplots(1, ncols, figsize=figsize, dpi=dpi)


def _title(what: str, weights: str, where: str) -> str:
    n = note(weights)
    return f"{what}\n{where}" + (f"\n{n}" if n else "")


def save(fig, path: Path, title: str, series: list[str], weights: str, dpi: int) -> None:
    """Save at the fixed size with the title, series names and weights label as PNG text."""
    meta = {"Title": title, "Series": json.dumps(series), "Weights": weights}
    fig.savefig(path, dpi=dpi, metadata=meta)


def _legend(ax, weights: str, title: str) -> None:
    n = note(weights)
    ax.legend(title=f"{title}\n{n}" if n else title, fontsize="x-small", title_fontsize="x-small")


@dataclass
class Ctx:
    out: Path
    figsize: tuple[float, float]
    dpi: int

    def finish(self, plt, fig, ax_list, stem: str, title: str, series, weights) -> Path:
        fig.suptitle(title, fontsize="small")
        for ax in ax_list:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out / f"{stem}.png"
        save(fig, path, title, list(series), weights, self.dpi)
        plt.close(fig)
        return path


def _caption(g: Group) -> list[str]:
    n = note(g.weights)
    return [f"*{n}.*", ""] if n else []


def _lines_by_steps(
    ctx: Ctx,
    g: Group,
    rows: list[Row],
    figure: str,
    name: str,
    what: str,
    ylabel: str,
    label: Callable[[Row], str],
) -> tuple[Path | None, list[str]]:
    rows = [r for r in rows if r.fig(figure) is not None and r.s.get("steps") is not None]
    if not rows:
        return None, []
    series: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        series[label(r)].append(r)
    plt = _pyplot()
    fig, ax = _figure(plt, ctx.figsize, ctx.dpi)
    names = []
    for key in sorted(series, key=_order):
        rs = sorted(series[key], key=lambda r: r.s["steps"])
        xs = [r.s["steps"] for r in rs]
        ys = [r.fig(figure) for r in rs]
        lo = [y - r.case.spread.get(figure, (y, y))[0] for r, y in zip(rs, ys)]
        hi = [r.case.spread.get(figure, (y, y))[1] - y for r, y in zip(rs, ys)]
        entry = key + tag(g.weights)
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=entry)
        names.append(entry)
    ax.set(xlabel="diffusion steps", ylabel=ylabel)
    _legend(ax, g.weights, "setting (bars: min-max over repeats)")
    title = _title(what, g.weights, g.title)
    path = ctx.finish(plt, fig, [ax], g.stem(name), title, names, g.weights)
    table = _caption(g) + [
        f"| setting | weights | steps | {ylabel} (median) | min-max | repeats |",
        "|---|---|---|---|---|---|",
    ]
    for key in sorted(series, key=_order):
        for r in sorted(series[key], key=lambda r: r.s["steps"]):
            table.append(
                f"| {key} | {cell(g.weights)} | {r.s['steps']} | {_fmt(r.fig(figure))} "
                f"| {r.spread(figure)} | {r.run.repeats if r.run.repeats is not None else 'n/a'} |"
            )
    return path, table


def _new_speaker(r: Row) -> float | None:
    """A new speaker's first-chunk latency (prompt processing included), else the cold call's
    (runs before the bench timed prompt processing)."""
    v = r.fig("new_speaker_first_chunk_s")
    return v if v is not None else r.fig("cold_first_chunk_s")


def _first_chunk(ctx: Ctx, g: Group) -> tuple[Path | None, list[str]]:
    rows = [
        r
        for r in g.rows
        if r.s.get("stream") and r.fig("first_chunk_s") is not None and r.s.get("steps") is not None
    ]
    if not rows:
        return None, []
    series: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        series[setting_label(r.s, stream=True)].append(r)
    plt = _pyplot()
    fig, ax = _figure(plt, ctx.figsize, ctx.dpi)
    names = []
    for i, key in enumerate(sorted(series, key=_order)):
        rs = sorted(series[key], key=lambda r: r.s["steps"])
        color = f"C{i % 10}"
        xs = [r.s["steps"] for r in rs]
        warm = f"{key}, warm{tag(g.weights)}"
        ax.plot(xs, [r.fig("first_chunk_s") for r in rs], "-", color=color, marker="o", label=warm)
        names.append(warm)
        cold_pts = [(r.s["steps"], _new_speaker(r)) for r in rs]
        cold_pts = [(x, y) for x, y in cold_pts if y is not None]
        if cold_pts:
            kind = "new speaker" if any(r.fig("new_speaker_first_chunk_s") for r in rs) else "cold"
            cold = f"{key}, {kind}{tag(g.weights)}"
            ax.plot(*zip(*cold_pts), "--", color=color, marker="s", label=cold)
            names.append(cold)
    ax.set(xlabel="diffusion steps", ylabel="first 0.2 s of audio (s)")
    _legend(ax, g.weights, "setting (solid: warm, dashed: new speaker or cold)")
    title = _title("Streaming first-chunk latency against diffusion steps", g.weights, g.title)
    path = ctx.finish(plt, fig, [ax], g.stem("first_chunk_vs_steps"), title, names, g.weights)
    table = _caption(g) + [
        "| setting | weights | steps | warm first chunk s (median) | min-max | cold first chunk s "
        "| new speaker first chunk s | longest playback gap s | repeats |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(series, key=_order):
        for r in sorted(series[key], key=lambda r: r.s["steps"]):
            table.append(
                f"| {key} | {cell(g.weights)} | {r.s['steps']} | {_fmt(r.fig('first_chunk_s'))} "
                f"| {r.spread('first_chunk_s')} | {_fmt(r.fig('cold_first_chunk_s'))} "
                f"| {_fmt(r.fig('new_speaker_first_chunk_s'))} "
                f"| {_fmt(r.fig('playback_gap_max_s'))} "
                f"| {r.run.repeats if r.run.repeats is not None else 'n/a'} |"
            )
    return path, table


# ---------------------------------------------------------------------------- fidelity


def _is_reference(r: Row) -> bool:
    if r.case.reference is not None and r.case.id:
        return r.case.reference == r.case.id
    return all(r.s.get(k) == v for k, v in REFERENCE.items()) and r.s.get("target") == TARGET


def _fidelity_metric(weights: str) -> tuple[str, str]:
    if weights == "real":
        return "wer", "WER % (lower is better)"
    return "mrstft_distance", "mrstft_distance to the reference (lower is better)"


def _bound(g: Group, metric: str) -> tuple[float | None, str]:
    if metric != "wer":
        return FIDELITY_BOUND, (
            f"mrstft_distance <= {FIDELITY_BOUND}, LLM top-1 agreement >= {TOKEN_AGREEMENT_BOUND}"
        )
    refs = [r.fig("wer") for r in g.rows if _is_reference(r) and r.fig("wer") is not None]
    if not refs:
        return None, f"WER within +{WER_MARGIN} of the reference setting (no reference case)"
    b = wer_bound(min(refs))
    return b, f"WER <= {b:.2f} % (reference setting's WER + {WER_MARGIN})"


def _scatter(
    ctx: Ctx,
    g: Group,
    rows: list[Row],
    x: str,
    xlabel: str,
    y: str,
    ylabel: str,
    stem: str,
    what: str,
    rec=None,
    front: list[Point] | None = None,
) -> Path:
    plt = _pyplot()
    fig, ax = _figure(plt, ctx.figsize, ctx.dpi)
    t = tag(g.weights)
    names = [f"cases{t}"]
    ok = [r for r in rows if _llm_agrees(r)]
    off = [r for r in rows if not _llm_agrees(r)]
    ax.scatter([r.fig(x) for r in ok], [r.fig(y) for r in ok], color="C0", label=names[0])
    if off:
        name = f"LLM top-1 agreement < {TOKEN_AGREEMENT_BOUND} (not recommended){t}"
        ax.scatter([r.fig(x) for r in off], [r.fig(y) for r in off], color="0.5", marker="x",
                   label=name)  # fmt: skip
        names.append(name)
    for r in rows:
        ax.annotate(
            point_label(r),
            (r.fig(x), r.fig(y)),
            textcoords="offset points",
            xytext=(3, 3),
            fontsize=5,
        )
    if front:
        name = f"Pareto front{t}"
        ax.step([p.rtf for p in front], [p.distance for p in front], "-", where="post",
                color="C1", label=name)  # fmt: skip
        names.append(name)
    if rec is not None:
        for p, marker, color, name in (
            (rec.best_within_speed, "*", "C2", f"best fidelity within {SPEED_FACTOR}x the fastest"),
            (rec.fastest_within_bound, "D", "C3", "fastest within the fidelity bound"),
        ):
            if p is not None:
                ax.scatter([p.rtf], [p.distance], marker=marker, s=160, facecolors="none",
                           edgecolors=color, linewidths=2, label=name + t)  # fmt: skip
                names.append(name + t)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    _legend(ax, g.weights, "cases (labels: setting, steps)")
    title = _title(what, g.weights, g.title)
    path = ctx.finish(plt, fig, [ax], g.stem(stem), title, names, g.weights)
    return path


def _points(rows: list[Row], x: str, y: str) -> list[Point]:
    return [Point(point_label(r), r.fig(x), r.fig(y), _llm_agrees(r)) for r in rows]


def _llm_agrees(r: Row) -> bool:
    """The case's LLM agrees with the reference LLM (`TOKEN_AGREEMENT_BOUND`), or has no figure."""
    a = r.fig("token_agreement_greedy")
    return a is None or a >= TOKEN_AGREEMENT_BOUND


def _rec_words(rec, bound_text: str, x_name: str) -> str:
    quick = rec.fastest_within_bound
    best = rec.best_within_speed
    a = f"For the lowest {x_name} within the fidelity bound ({bound_text}) use " + (
        f"**{quick.label}**" if quick else "*no case* (none is within the bound)"
    )
    b = f"for the best fidelity within {SPEED_FACTOR}x the fastest {x_name} use " + (
        f"**{best.label}**" if best else "*no case*"
    )
    return f"{a}; {b}."


def _fidelity(ctx: Ctx, g: Group) -> tuple[list[Path], list[str]]:
    metric, ylabel = _fidelity_metric(g.weights)
    bound, bound_text = _bound(g, metric)
    paths: list[Path] = []
    md: list[str] = []
    for stream, stem, what in (
        (False, "fidelity_vs_rtf", "Fidelity against real-time factor, non-streaming"),
        (True, "fidelity_vs_rtf_stream", "Fidelity against real-time factor, streaming"),
    ):
        rows = [
            r
            for r in g.rows
            if bool(r.s.get("stream")) == stream
            and r.s.get("target", TARGET) == TARGET
            and r.fig("rtf") is not None
            and r.fig(metric) is not None
        ]
        if not rows:
            continue
        rows.sort(key=lambda r: (point_label(r), r.run.run_id or ""))
        pts = _points(rows, "rtf", metric)
        rec = recommend(pts, bound)
        front = pareto_front([p for p in pts if p.eligible])
        paths.append(
            _scatter(
                ctx,
                g,
                rows,
                "rtf",
                "real-time factor (median)",
                metric,
                ylabel,
                stem,
                what,
                rec,
                front,
            )  # fmt: skip
        )
        kind = "streaming" if stream else "non-streaming"
        md += [f"#### {kind.capitalize()} cases", "", f"![{what}]({paths[-1].name})", ""]
        md += [
            f"Recommendation ({kind}): " + _rec_words(rec, bound_text, "real-time factor"),
            "",
        ]
        if stream:
            fc = [r for r in rows if r.fig("first_chunk_s") is not None]
            if fc:
                rec_fc = recommend(_points(fc, "first_chunk_s", metric), bound)
                md += [
                    "By first chunk (warm): " + _rec_words(rec_fc, bound_text, "first chunk"),
                    "",
                ]
        on_front = {p.label for p in front}
        md += _caption(g) + [
            f"| case | weights | RTF (median) | min-max | {metric} | LLM top-1 agreement"
            " | on Pareto front |",
            "|---|---|---|---|---|---|---|",
        ]
        for r, p in zip(rows, pts):
            agree = r.fig("token_agreement_greedy")
            gate = "" if p.eligible else f" (< {TOKEN_AGREEMENT_BOUND}: not recommended)"
            md.append(
                f"| {p.label} | {cell(g.weights)} | {_fmt(p.rtf)} | {r.spread('rtf')} "
                f"| {_fmt(p.distance)} | {_fmt(agree)}{gate} | {'yes' if p.label in on_front else ''} |"
            )
        md.append("")
        sims = [r for r in rows if r.fig("sim") is not None]
        if sims and not stream:
            paths.append(
                _scatter(
                    ctx,
                    g,
                    sims,
                    "rtf",
                    "real-time factor (median)",
                    "sim",
                    "SIM (higher is better)",
                    "sim_vs_rtf",
                    "SIM against real-time factor",
                )  # fmt: skip
            )
            md += [f"![SIM against real-time factor]({paths[-1].name})", ""]
            md += ["| case | weights | RTF (median) | SIM |", "|---|---|---|---|"]
            md += [
                f"| {point_label(r)} | {cell(g.weights)} | {_fmt(r.fig('rtf'))} | {_fmt(r.fig('sim'))} |"
                for r in sims
            ]
            md.append("")
    return paths, md


# ---------------------------------------------------------------------------- history


def _date(text: str | None) -> _dt.datetime | None:
    if not text:
        return None
    try:
        d = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return d if d.tzinfo else d.replace(tzinfo=_dt.UTC)


def _history(ctx: Ctx, runs: Sequence[BenchRun]) -> tuple[list[Path], list[str]]:
    entries = []  # (weights, machine, date, run, rtf, first chunk)
    for b in runs:
        by_id = {c.id: c for c in b.cases}
        head, twin = by_id.get(HEADLINE), by_id.get(HEADLINE_STREAM)
        rtf = head.figures.get("rtf") if head else None
        if head and twin and head.machine != twin.machine:
            twin = None  # ran on another machine (a merged run): not one machine's history point
        fc = twin.figures.get("first_chunk_s") if twin else None
        when = _date(b.created)
        if when is None or (rtf is None and fc is None):
            continue
        w = (head or twin).weights
        entries.append((w, (head or twin).machine or b.machine, when, b, rtf, fc))
    if not entries:
        return [], ["No stored run has the headline case with a date: no history."]
    by_weights: dict[str, list] = defaultdict(list)
    for e in entries:
        by_weights[e[0]].append(e)
    paths, md = [], []
    for w in sorted(by_weights):
        es = sorted(by_weights[w], key=lambda e: (e[2], e[3].run_id or ""))
        plt = _pyplot()
        fig, (ax_r, ax_f) = _figure(plt, ctx.figsize, ctx.dpi, ncols=2)
        names = []
        for machine in sorted({e[1] for e in es}):
            mine = [e for e in es if e[1] == machine]
            name = machine + tag(w)
            r_pts = [(e[2], e[4]) for e in mine if e[4] is not None]
            f_pts = [(e[2], e[5]) for e in mine if e[5] is not None]
            if r_pts:
                ax_r.plot(*zip(*r_pts), "-", marker="o", label=name)
            if f_pts:
                ax_f.plot(*zip(*f_pts), "-", marker="o", label=name)
            names.append(name)
        ax_r.set(xlabel="run created", ylabel="real-time factor (headline case)")
        ax_f.set(xlabel="run created", ylabel="first chunk s (streaming twin)")
        for ax in (ax_r, ax_f):
            ax.tick_params(axis="x", labelsize=6, labelrotation=30)
        _legend(ax_r, w, "machine")
        suffix = "" if len(by_weights) == 1 else f"_{slug(w)}"
        title = _title("Headline figures over runs", w, f"{w} weights, {HEADLINE}")
        paths.append(ctx.finish(plt, fig, [ax_r, ax_f], f"history{suffix}", title, names, w))
        md += [f"![Headline figures over runs]({paths[-1].name})", ""]
        md += _caption(Group(w, "", "", "", ())) + [
            "| created | run | commit | machine | weights | RTF (headline) | first chunk s (streaming twin) |",
            "|---|---|---|---|---|---|---|",
        ]
        for _, machine, when, b, rtf, fc in es:
            commit = b.git_commit[:7] if b.git_commit else "unknown commit"
            md.append(
                f"| {when.date().isoformat()} | {b.run_id or b.source.name} | {commit} | {machine} "
                f"| {cell(w)} | {_fmt(rtf)} | {_fmt(fc)} |"
            )
        md.append("")
    return paths, md


# ---------------------------------------------------------------------------- sections


def call_to_call_noise(history: Sequence[BenchRun]) -> tuple[float, float, int] | None:
    """The spread of the RTF across the timed calls of one case, `(max - min) / median`, over
    the stored runs' cases with several calls: (median spread, largest spread, cases); None
    without any such case."""
    spreads = []
    for b in history:
        if (b.repeats or 0) < 2:
            continue
        for c in b.cases:
            lo_hi, med = c.spread.get("rtf"), c.figures.get("rtf")
            if lo_hi is not None and med:
                spreads.append((lo_hi[1] - lo_hi[0]) / med)
    if not spreads:
        return None
    spreads.sort()
    return spreads[len(spreads) // 2], spreads[-1], len(spreads)


def _noise_words(history: Sequence[BenchRun]) -> str:
    noise = call_to_call_noise(history)
    head = "Runs with one timed call per case have no spread of their own: "
    if noise is None:
        return head + "no stored run with several calls per case measures the noise."
    med, top, n = noise
    return (
        head + f"in the stored runs with several timed calls, a case's RTF spread (max - min over "
        f"median) is {med * 100:.0f}% in the median and up to {top * 100:.0f}% ({n} cases): "
        "differences of that size between single-call cases may be noise."
    )


def bench_sections(
    benches: Sequence[BenchRun],
    history: Sequence[BenchRun],
    out: Path,
    figsize: tuple[float, float],
    dpi: int,
) -> list[str]:
    """Draw the bench plots into `out`; return the markdown of their sections."""
    ctx = Ctx(out, figsize, dpi)
    gs = groups(benches)
    md = ["## Bench: noise", ""]
    md.append(
        "Tables give the median over a case's repeats and the min-max spread over them; "
        "the plots' bars show the same spread. Repeats per case, by run:"
    )
    md.append("")
    for b in benches:
        reps = b.repeats if b.repeats is not None else "not recorded"
        md.append(f"- `{b.run_id or b.source.name}` ({cell(b.weights)} weights): {reps}")
    md.append("")
    if any(b.repeats == 1 for b in benches):
        md += [_noise_words(history), ""]
    if any(b.weights == "synthetic" or any(c.weights == "synthetic" for c in b.cases)
           for b in benches):  # fmt: skip
        md += [f"> **{SYNTHETIC_NOTE}.** Fidelity figures of synthetic runs measure how far a "
               "setting drifts numerically from the reference setting; they say nothing about "
               "speech quality.", ""]  # fmt: skip

    def nonstream(g: Group) -> list[Row]:
        return [r for r in g.rows if not r.s.get("stream")]

    for heading, name, fig_name, ylabel, what in (
        ("RTF against diffusion steps", "rtf_vs_steps", "rtf", "RTF",
         "Real-time factor against diffusion steps, non-streaming"),
        ("Peak memory against diffusion steps", "memory_vs_steps", "rss_peak_mb",
         "peak RSS MB", "Peak RSS against diffusion steps, non-streaming"),
    ):  # fmt: skip
        md += [f"## Bench: {heading}", ""]
        drawn = False
        for g in gs:
            path, table = _lines_by_steps(
                ctx, g, nonstream(g), fig_name, name, what, ylabel, lambda r: setting_label(r.s)
            )
            if path is not None:
                drawn = True
                md += [f"### {g.title}", "", f"![{what}]({path.name})", "", *table, ""]
        if not drawn:
            md += [f"*{heading}: no non-streaming cases with this figure.*", ""]
        if name == "rtf_vs_steps":
            md += ["## Bench: streaming first chunk against diffusion steps", ""]
            drawn = False
            for g in gs:
                path, table = _first_chunk(ctx, g)
                if path is not None:
                    drawn = True
                    md += [f"### {g.title}", "", f"![first chunk]({path.name})", "", *table, ""]
            if not drawn:
                md += ["*No streaming cases with a first-chunk figure.*", ""]
    md += ["## Bench: fidelity against speed, and recommendations", ""]
    md += [
        f"Fidelity is `mrstft_distance` to the reference setting on synthetic or unknown "
        f"weights (bound: `mrstft_distance <= {FIDELITY_BOUND}`, see `reports.recommend."
        f"FIDELITY_BOUND`) and WER on real weights (bound: the reference setting's WER "
        f"+{WER_MARGIN} absolute). Recommendations: the fastest case within the bound, and "
        f"the best-fidelity case whose RTF is at most {SPEED_FACTOR}x the fastest case's.",
        "",
    ]
    drawn = False
    for g in gs:
        paths, part = _fidelity(ctx, g)
        if paths:
            drawn = True
            md += [f"### {g.title}", "", *part]
    if not drawn:
        md += ["*No cases with fidelity figures.*", ""]
    md += ["## Bench: history of the headline figures", ""]
    md += [
        f"Headline case `{HEADLINE}` (RTF) and its streaming twin `{HEADLINE_STREAM}` "
        "(first chunk), by run date, a line per machine.",
        "",
    ]
    _, part = _history(ctx, history)
    md += part
    return md
