"""Build a markdown report with PNG plots from eval and bench results.

For each test set: error rate and SIM against diffusion steps (a line per LLM
precision), the quality/speed trade-off (error rate against the bench's RTF for the
same settings), and the distribution of per-utterance error rates per run. Then a
table of every run, a comparison with the paper's figures for runs on real weights, the
bench cases read, and every failed utterance. Runs on synthetic weights are labelled in
every table, legend and title: their numbers test the harness, not the model. Runs whose
weights label is `unknown` (the model dir records neither synthetic nor real) are
labelled as such too, kept apart from real-weight runs and not compared with the paper.

With `bench_sections=True` the bench part of `reports.bench_plots` follows (speed,
latency, memory and fidelity against the settings, recommendations, history); a report
from bench results alone leaves out the eval sections.

Plots are written with matplotlib's Agg backend at a fixed size (`FIGSIZE` at `DPI`).
The report is drawn into a temporary folder beside `out_dir` and moved into place only
when every file is written, so a failed build leaves no partial report.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from reports.formats import WEIGHTS_MARKS, BenchRun, EvalRun, join_rtf
from reports.paper import PAPER, PAPER_SIM_ENCODER

FIGSIZE = (8.0, 4.5)  # inches
DPI = 100  # -> 800 x 450 pixels
PRECISION_ORDER = ("fp32", "bf16", "fp16", "8bit", "6bit", "4bit")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "set"


def _prec_key(p: str | None) -> tuple[int, str]:
    p = p or "default"
    return (PRECISION_ORDER.index(p) if p in PRECISION_ORDER else len(PRECISION_ORDER), p)


def _sort_key(r: EvalRun) -> tuple:
    return (
        r.set_name,
        r.weights,
        _prec_key(r.precision),
        r.n_timesteps or 0,
        r.seed or 0,
        str(r.source),
    )


def _fmt(x: float | None, digits: int = 2, scale: float = 1.0) -> str:
    return "n/a" if x is None else f"{x * scale:.{digits}f}"


def _weights_group(w: str) -> str:
    """`synthetic`, `unknown`, or "" (real weights, or none): groups are reported apart."""
    return w if w in WEIGHTS_MARKS else ""


def _weights_tag(w: str) -> str:
    return {"synthetic": " (synthetic weights)", "unknown": " (unknown weights)"}.get(w, "")


def _cell_mark(w: str) -> str:
    """The mark beside a weights label in a table cell."""
    return {"synthetic": " **(synthetic)**", "unknown": " **(not recorded as real)**"}.get(w, "")


def _line_style(w: str) -> str:
    return {"synthetic": "--", "unknown": ":"}.get(w, "-")


def _series_name(precision: str | None, weights: str) -> str:
    return f"{precision or 'default'}{WEIGHTS_MARKS.get(weights, '')}"


def _title(set_name: str, runs: list[EvalRun], what: str) -> str:
    note = ""
    if any(r.weights == "synthetic" for r in runs):
        note += "\nSYNTHETIC WEIGHTS: a harness check, not the model's quality"
    if any(r.weights == "unknown" for r in runs):
        note += "\nUNKNOWN WEIGHTS: not recorded as the real model"
    return f"{set_name}: {what}{note}"


def _file_stem(set_name: str, runs: list[EvalRun]) -> str:
    groups = {_weights_group(r.weights) for r in runs}
    return _slug(set_name) + "".join(f"_{g}" for g in ("synthetic", "unknown") if g in groups)


def plot_quality_vs_steps(set_name: str, runs: list[EvalRun], out: Path) -> Path | None:
    """Error rate and SIM against n_timesteps, a line per (precision, weights)."""
    series: dict[tuple, list[EvalRun]] = defaultdict(list)
    for r in runs:
        if r.n_timesteps is not None and r.mean_error_rate is not None:
            series[(_prec_key(r.precision), r.precision, r.weights)].append(r)
    if not series:
        return None
    plt = _pyplot()
    fig, (ax_w, ax_s) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    metric = runs[0].metric
    for (_, prec, weights), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r.n_timesteps)
        steps = [r.n_timesteps for r in rs]
        style = _line_style(weights)
        name = _series_name(prec, weights)
        ax_w.plot(steps, [100 * r.mean_error_rate for r in rs], style, marker="o", label=name)
        sims = [(r.n_timesteps, r.sim_mean) for r in rs if r.sim_mean is not None]
        if sims:
            ax_s.plot(*zip(*sims), style, marker="o", label=name)
    enc = sorted({r.sim_encoder or "none" for r in runs})
    ax_w.set(xlabel="diffusion steps (n_timesteps)", ylabel=f"{metric} x100 (mean per utterance)")
    ax_s.set(xlabel="diffusion steps (n_timesteps)", ylabel=f"SIM ({', '.join(enc)})")
    for ax in (ax_w, ax_s):
        ax.grid(alpha=0.3)
    ax_w.legend(title="LLM precision", fontsize="small")
    fig.suptitle(
        _title(set_name, runs, f"{metric} and SIM against diffusion steps"), fontsize="medium"
    )
    fig.tight_layout()
    path = out / f"quality_vs_steps_{_file_stem(set_name, runs)}.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_tradeoff(
    set_name: str, runs: list[EvalRun], benches: list[BenchRun], out: Path
) -> Path | None:
    """Error rate against RTF (from the bench, same precision and steps)."""
    points = [(r, join_rtf(r, benches)) for r in runs if r.mean_error_rate is not None]
    points = [(r, rtf) for r, rtf in points if rtf is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    by_prec: dict[tuple, list] = defaultdict(list)
    for r, rtf in points:
        by_prec[(_prec_key(r.precision), r.precision, r.weights)].append(
            (rtf, 100 * r.mean_error_rate, r)
        )
    for (_, prec, weights), pts in sorted(by_prec.items()):
        pts.sort(key=lambda p: p[0])
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            _line_style(weights),
            marker="o",
            label=_series_name(prec, weights),
        )
        for rtf, wer, r in pts:
            ax.annotate(
                f"{r.n_timesteps}",
                (rtf, wer),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize="x-small",
            )
    ax.set(xlabel="RTF (bench median; lower is faster)", ylabel=f"{runs[0].metric} x100")
    ax.grid(alpha=0.3)
    ax.legend(title="LLM precision (labels: steps)", fontsize="small")
    ax.set_title(
        _title(set_name, [p[0] for p in points], "quality against speed"), fontsize="medium"
    )
    fig.tight_layout()
    path = out / f"tradeoff_{_file_stem(set_name, [p[0] for p in points])}.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_distribution(set_name: str, runs: list[EvalRun], out: Path) -> Path | None:
    """Box plot of per-utterance error rates (x100) per run; the diamond is the mean."""
    runs = [r for r in runs if r.rates]
    if not runs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    data = [[100 * x for x in r.rates] for r in runs]
    labels = [r.label.replace(" [", "\n[") for r in runs]
    ax.boxplot(data, showmeans=True, meanprops={"marker": "D", "markersize": 5})
    ax.set_xticks(
        range(1, len(runs) + 1), labels, fontsize="x-small", rotation=20 if len(runs) > 4 else 0
    )
    ax.set(ylabel=f"{runs[0].metric} x100 per utterance")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(
        _title(set_name, runs, "per-utterance error rates (box: quartiles, diamond: mean)"),
        fontsize="medium",
    )
    fig.tight_layout()
    path = out / f"wer_distribution_{_file_stem(set_name, runs)}.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _runs_table(runs: list[EvalRun], benches: list[BenchRun]) -> list[str]:
    lines = [
        "| set | weights | TTS | precision | steps | seed | ASR | metric | mean x100 | corpus x100 | SIM | SIM encoder | RTF | failed | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        rtf = join_rtf(r, benches)
        lines.append(
            f"| {r.set_name} | {r.weights}{_cell_mark(r.weights)} "
            f"| {r.tts} | {r.precision or 'default'} | {r.n_timesteps if r.n_timesteps is not None else ''} "
            f"| {r.seed if r.seed is not None else ''} | {r.asr} | {r.metric} "
            f"| {_fmt(r.mean_error_rate, 2, 100)} | {_fmt(r.corpus_error_rate, 2, 100)} "
            f"| {_fmt(r.sim_mean, 3)} | {r.sim_encoder or 'none'} | {_fmt(rtf, 2)} | {r.n_failed} | {r.n_total} |"
        )
    return lines


def _paper_table(runs: list[EvalRun]) -> list[str]:
    real = [r for r in runs if r.weights == "real" and r.paper_set in PAPER]
    if not real:
        return [
            "No run on real weights of a Seed-TTS-eval set (test-en, test-zh, test-hard): "
            "no comparison with the paper."
        ]
    lines = [
        "Paper: CosyVoice2 (0.5B) on Seed-TTS-eval; error rates x100 with Whisper-large-v3 (en) "
        "or Paraformer-zh (zh), SIM with WavLM-large+ECAPA. A row with another ASR or encoder "
        "is not directly comparable (marked).",
        "",
        "| set | run | metric | ours x100 | paper x100 | difference | ours SIM | paper SIM | comparable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in real:
        p = PAPER[r.paper_set]
        diff = None if r.mean_error_rate is None else 100 * r.mean_error_rate - p.error_rate_x100
        notes = []
        if r.sim_encoder != PAPER_SIM_ENCODER:
            notes.append(f"SIM encoder {r.sim_encoder or 'none'}")
        if r.paper_set == "test-en" and "large-v3" not in (r.asr or ""):
            notes.append(f"ASR {r.asr}")
        if r.paper_set != "test-en":
            notes.append(f"ASR {r.asr} (paper: {p.asr})")
        lines.append(
            f"| {p.set_name} | {r.label} | {p.metric} | {_fmt(r.mean_error_rate, 2, 100)} | {p.error_rate_x100:.2f} "
            f"| {'n/a' if diff is None else f'{diff:+.2f}'} | {_fmt(r.sim_mean, 3)} | {p.sim:.3f} "
            f"| {'no: ' + '; '.join(notes) if notes else 'yes'} |"
        )
    return lines


def _bench_table(benches: list[BenchRun]) -> list[str]:
    if not benches:
        return ["No bench results given: no RTF, latency or memory figures."]
    lines = [
        "| source | weights | machine | target | llm | dtype | steps | text | stream | RTF | first chunk s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in benches:
        for c in b.cases:
            s, f = c.settings, c.figures
            lines.append(
                f"| {b.source.name} | {c.weights}{_cell_mark(c.weights)} "
                f"| {c.machine or b.machine} | {s.get('target', '')} | {s.get('llm', '')} | {s.get('dtype', '')} "
                f"| {s.get('steps', '')} | {s.get('text', '')} | {s.get('stream', '')} "
                f"| {_fmt(f.get('rtf'))} | {_fmt(f.get('first_chunk_s'))} | {_fmt(f.get('rss_peak_mb'), 0)} |"
            )
    return lines


def _publish(stage: Path, out: Path) -> None:
    """Move the finished files of `stage` into `out` (a rename when `out` is new)."""
    if not out.exists():
        stage.rename(out)
        return
    for f in sorted(stage.iterdir()):
        os.replace(f, out / f.name)
    stage.rmdir()


def build_report(
    eval_runs: list[EvalRun],
    benches: list[BenchRun],
    out_dir: str | Path,
    title: str = "cosyvoice2-mlx quality report",
    *,
    bench_sections: bool = False,
    history: Sequence[BenchRun] = (),
) -> Path:
    """Write `report.md` and its PNG plots into `out_dir`; returns the markdown path.

    `bench_sections` adds the bench plots and recommendations (`reports.bench_plots`),
    with `history` the stored runs for the history plot.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; the report is not
    try:
        _write_report(eval_runs, benches, stage, title, bench_sections, history)
        _publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out / "report.md"


def _write_report(
    eval_runs: list[EvalRun],
    benches: list[BenchRun],
    out: Path,
    title: str,
    bench_sections: bool,
    history: Sequence[BenchRun],
) -> None:
    runs = sorted(eval_runs, key=_sort_key)
    # one section (and set of plots) per test set, real, synthetic and unknown weights apart
    by_set: dict[tuple[str, str], list[EvalRun]] = defaultdict(list)
    for r in runs:
        by_set[(r.set_name, _weights_group(r.weights))].append(r)

    md = [f"# {title}", ""]
    md.append(
        f"Built {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')} from "
        f"{len(runs)} eval run(s) and {len(benches)} bench file(s)."
    )
    md.append("")
    if bench_sections and not runs:  # a bench report: the eval sections have nothing to show
        from reports.bench_plots import bench_sections as _bench_md

        md += _bench_md(benches, history, out, FIGSIZE, DPI)
        md += ["## Sources", ""]
        md += [f"- bench: `{b.source}` (run {b.run_id}, commit {b.git_commit})" for b in benches]
        (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
        return
    synthetic = sorted({r.set_name for r in runs if r.weights == "synthetic"})
    if synthetic or any(b.weights == "synthetic" for b in benches):
        md += [
            "> **Synthetic weights.** Some results below come from synthetic (random) weights: "
            "they check the harness end to end; their error rates and SIM say nothing about "
            "the model's quality. They are marked *(synthetic)* everywhere.",
            "",
        ]
    if any(r.weights == "unknown" for r in runs) or any(
        b.weights == "unknown" or any(c.weights == "unknown" for c in b.cases) for b in benches
    ):
        md += [
            "> **Unknown weights.** Some results below come from model dirs that record no "
            "weights label (neither synthetic weights nor the released model): they are marked "
            "*(not recorded as real)*, kept apart from real-weight runs and not compared with "
            "the paper.",
            "",
        ]
    encoders = sorted({r.sim_encoder or "none" for r in runs})
    md += [
        f"SIM encoders used: {', '.join(encoders)}. SIM values from different encoders are not comparable; "
        f"the paper's SIM uses {PAPER_SIM_ENCODER} (WavLM-large+ECAPA).",
        "",
        "## Runs",
        "",
        *_runs_table(runs, benches),
        "",
        "## Against the paper",
        "",
        *_paper_table(runs),
        "",
    ]
    for (set_name, group), rs in by_set.items():
        md += [f"## Set `{set_name}`{_weights_tag(group)}", ""]
        for what, path in (
            (
                "Error rate and SIM against diffusion steps",
                plot_quality_vs_steps(set_name, rs, out),
            ),
            (
                "Quality against speed (RTF from the bench)",
                plot_tradeoff(set_name, rs, benches, out),
            ),
            ("Per-utterance error rates", plot_distribution(set_name, rs, out)),
        ):
            if path is None:
                md += [
                    f"*{what}: no data (needs runs with steps and error rates"
                    f"{', and bench results with the same settings' if 'RTF' in what else ''}).*",
                    "",
                ]
            else:
                md += [f"### {what}", "", f"![{what}]({path.name})", ""]
    md += ["## Bench cases", "", *_bench_table(benches), ""]
    if bench_sections:
        from reports.bench_plots import bench_sections as _bench_md

        md += _bench_md(benches, history, out, FIGSIZE, DPI)
    failures = [(r, uid, why) for r in runs for uid, why in r.failures.items()]
    md += ["## Failed utterances", ""]
    if failures:
        md += ["| set | run | id | reason |", "|---|---|---|---|"]
        md += [f"| {r.set_name} | {r.label} | {uid} | {why} |" for r, uid, why in failures]
    else:
        md.append("None.")
    md += ["", "## Sources", ""]
    md += [f"- eval: `{r.source}` (commit {r.git_commit}, {r.date})" for r in runs]
    md += [f"- bench: `{b.source}` (run {b.run_id}, commit {b.git_commit})" for b in benches]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
