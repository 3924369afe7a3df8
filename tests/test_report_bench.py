"""The bench part of the report: plots, tables and recommendations from small fixture runs.

Fixtures (`tests/data/bench_runs`, hand-made, following the bench results schema):
`synthetic_sweep.json` (steps 1/3/10 x LLM fp32/8bit, flow_bits 8, streaming cases with
and without first_hop, fidelity figures), `old_format.json` (a run from before
flow_bits/cfg and the fidelity figures, long text), `real_weights.json` (WER and SIM) and
`history/` (stored runs of the headline case on three dates, one without a commit).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from reports import recommend as rec_mod  # noqa: E402
from reports.bench_plots import (  # noqa: E402
    SYNTHETIC_NOTE,
    SYNTHETIC_TAG,
    setting_label,
)
from reports.build import DPI, FIGSIZE, build_report  # noqa: E402
from reports.cli import main  # noqa: E402
from reports.formats import read_bench  # noqa: E402
from reports.recommend import Point, pareto_front, recommend, wer_bound  # noqa: E402

DATA = Path(__file__).parent / "data" / "bench_runs"
SWEEP = DATA / "synthetic_sweep.json"
OLD = DATA / "old_format.json"
REAL = DATA / "real_weights.json"
HISTORY = DATA / "history"
SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def _png(path: Path) -> tuple[tuple[int, int], dict]:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size, dict(im.text)


def _series(path: Path) -> list[str]:
    size, text = _png(path)
    assert size == SIZE, (path.name, size)
    return json.loads(text["Series"])


def _table(md: str, header_start: str) -> list[list[str]]:
    """The rows (cells) of the first table whose header starts with `header_start`."""
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


# ------------------------------------------------------------------ recommend (pure)


def P(label: str, rtf: float, d: float) -> Point:
    return Point(label, rtf, d)


def test_pareto_front_known_answer() -> None:
    pts = [P("a", 1.0, 0.9), P("b", 0.8, 1.0), P("c", 0.9, 1.1), P("d", 1.6, 0.3), P("e", 2.0, 0.3)]
    assert [p.label for p in pareto_front(pts)] == ["b", "a", "d"]


def test_pareto_front_ties_empty_one_and_nonfinite() -> None:
    assert pareto_front([]) == []
    assert pareto_front([P("x", 1.0, 2.0)]) == [P("x", 1.0, 2.0)]
    # equal on both axes: both kept, by label; same speed with worse distance: dominated
    pts = [P("z", 1.0, 0.5), P("y", 1.0, 0.5), P("w", 1.0, 0.7), P("v", 0.5, 0.5)]
    assert [p.label for p in pareto_front(pts)] == ["v"]
    pts = [P("z", 1.0, 0.5), P("y", 1.0, 0.5), P("w", 1.0, 0.7)]
    assert [p.label for p in pareto_front(pts)] == ["y", "z"]
    assert [p.label for p in pareto_front([P("n", math.nan, 0.1), P("o", 1.0, 1.0)])] == ["o"]


def test_recommend_known_answers() -> None:
    pts = [
        P("fast-bad", 0.8, 1.0),
        P("near-ok", 1.15, 0.6),
        P("near-worse", 1.0, 0.9),
        P("bound-edge", 1.3, 0.5),  # exactly at the bound: within
        P("slow-good", 3.0, 0.0),
    ]
    r = recommend(pts, bound=0.5)
    assert r.fastest.label == "fast-bad"
    assert r.best_within_speed.label == "near-ok"  # 1.15 <= 1.5 x 0.8, lowest distance there
    assert r.fastest_within_bound.label == "bound-edge"
    assert r.bound == 0.5
    # the limit admits a case exactly at 1.5 x the fastest despite binary rounding
    r = recommend([P("f", 0.6, 0.4), P("g", 0.9, 0.35)], bound=None)
    assert r.best_within_speed.label == "g" and r.fastest_within_bound is None


def test_recommend_ties_empty_one() -> None:
    empty = recommend([])
    assert empty.fastest is None and empty.best_within_speed is None
    assert empty.fastest_within_bound is None
    one = recommend([P("only", 2.0, 0.1)], bound=0.5)
    assert one.fastest == one.best_within_speed == one.fastest_within_bound == P("only", 2.0, 0.1)
    assert recommend([P("only", 2.0, 0.9)], bound=0.5).fastest_within_bound is None
    # ties: same distance -> the faster; same both -> the first label
    r = recommend([P("b", 1.0, 0.2), P("a", 1.0, 0.2), P("c", 1.2, 0.2)], bound=0.2)
    assert r.best_within_speed.label == "a" and r.fastest_within_bound.label == "a"


def test_wer_bound() -> None:
    assert wer_bound(2.0) == 2.0 + rec_mod.WER_MARGIN
    assert wer_bound(None) is None


# ------------------------------------------------------------------ reading


def test_old_runs_read_missing_settings_as_null() -> None:
    old = read_bench(OLD)
    assert {c.settings["flow_bits"] for c in old.cases} == {None}
    assert {c.settings["cfg"] for c in old.cases} == {None}
    assert old.repeats == 2 and old.git_commit == "b" * 40
    sweep = read_bench(SWEEP)
    c = next(c for c in sweep.cases if c.settings["flow_bits"] == 8 and c.settings["steps"] == 3)
    assert c.figures["mrstft_distance"] == 0.5 and c.spread["rtf"] == (1.235, 1.365)
    assert c.reference == "cosyvoice2/llm=fp32/dtype=fp32/steps=10/text=short/stream=off"
    assert setting_label(c.settings) == "LLM fp32, flow 8-bit"
    assert setting_label({"llm": "8bit", "dtype": "fp32"}) == "LLM 8bit, flow fp32"
    assert setting_label({"llm": "fp32", "flow_bits": 16}) == "LLM fp32, flow bf16 products"


def test_fixtures_follow_the_bench_schema() -> None:
    """The fixtures are valid bench results files, apart from figure names not yet registered."""
    results = pytest.importorskip("bench.results")
    from reports.formats import BENCH_FIGURES

    for path in sorted(DATA.rglob("*.json")):
        problems = [
            p
            for p in results.validate(json.loads(path.read_text()))
            if not (
                p.endswith("unknown figure (register it in bench/figures.py)")
                and p.split(".figures.")[1].split(":")[0] in BENCH_FIGURES
            )
        ]
        assert problems == [], (path.name, problems)


# ------------------------------------------------------------------ the report


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sweep") / "report"
    runs = [read_bench(SWEEP)]
    history = [read_bench(p) for p in sorted(HISTORY.glob("*.json"))]
    md = build_report([], runs, out, bench_sections=True, history=history)
    return out, md.read_text(encoding="utf-8")


EXPECTED = {
    "rtf_vs_steps.png": [
        "LLM fp32, flow fp32",
        "LLM 4bit, flow fp32",
        "LLM 8bit, flow fp32",
        "LLM fp32, flow 8-bit",
    ],
    "memory_vs_steps.png": [
        "LLM fp32, flow fp32",
        "LLM 4bit, flow fp32",
        "LLM 8bit, flow fp32",
        "LLM fp32, flow 8-bit",
    ],
    "first_chunk_vs_steps.png": [
        "LLM fp32, flow fp32, warm",
        "LLM fp32, flow fp32, cold",
        "LLM fp32, flow fp32, first_hop 10, warm",
        "LLM fp32, flow fp32, first_hop 10, new speaker",
    ],
    "fidelity_vs_rtf.png": [
        "cases",
        "LLM top-1 agreement < 0.9 (not recommended)",
        "Pareto front",
        "best fidelity within 1.5x the fastest",
        "fastest within the fidelity bound",
    ],
    "fidelity_vs_rtf_stream.png": [
        "cases",
        "Pareto front",
        "best fidelity within 1.5x the fastest",
        "fastest within the fidelity bound",
    ],
    "history.png": ["linux-x86_64-fixture (Fixture CPU)"],
}


def test_every_plot_with_its_size_series_and_synthetic_label(sweep_report) -> None:
    out, md = sweep_report
    assert {p.name for p in out.glob("*.png")} == set(EXPECTED)
    for name, series in EXPECTED.items():
        got = _series(out / name)
        assert sorted(got) == sorted(s + SYNTHETIC_TAG for s in series), name
        _, text = _png(out / name)
        assert SYNTHETIC_NOTE in text["Title"] and text["Weights"] == "synthetic", name
        assert f"]({name})" in md, name
    assert not list(out.parent.glob(".report.*")), "the staging folder is left behind"


def test_markdown_sections_tables_and_recommendations(sweep_report) -> None:
    _, md = sweep_report
    for heading in (
        "## Bench: noise",
        "## Bench: RTF against diffusion steps",
        "## Bench: streaming first chunk against diffusion steps",
        "## Bench: Peak memory against diffusion steps",
        "## Bench: fidelity against speed, and recommendations",
        "## Bench: history of the headline figures",
    ):
        assert heading in md, heading
    assert "- `fixture-synthetic-sweep` (synthetic **(SYNTHETIC)** weights): 3" in md
    rtf = _table(md, "| setting | weights | steps | RTF (median)")
    assert len(rtf) == 10
    row = next(r for r in rtf if r[0] == "LLM 8bit, flow fp32" and r[2] == "3")
    assert row[1] == "synthetic **(SYNTHETIC)**" and row[3:] == ["1.15", "1.09-1.21", "3"]
    mem = _table(md, "| setting | weights | steps | peak RSS MB (median)")
    assert [
        "LLM fp32, flow 8-bit",
        "synthetic **(SYNTHETIC)**",
        "10",
        "2220",
        "2210-2230",
        "3",
    ] in mem
    fc = _table(md, "| setting | weights | steps | warm first chunk s")
    assert [
        "LLM fp32, flow fp32, first_hop 10",
        "synthetic **(SYNTHETIC)**",
        "10",
        "1.1",
        "1-1.2",
        "2.9",
        "3.4",
        "0.35",
        "3",
    ] in fc
    fid = _table(md, "| case | weights | RTF (median) | min-max | mrstft_distance")
    front = {r[0] for r in fid if r[6] == "yes"}
    assert front == {
        "LLM 8bit, flow fp32, 1 step",
        "LLM fp32, flow fp32, 1 step",
        "LLM 8bit, flow fp32, 3 steps",
        "LLM fp32, flow 8-bit, 3 steps",
        "LLM fp32, flow fp32, 3 steps",
        "LLM 8bit, flow fp32, 10 steps",
        "LLM fp32, flow fp32, 10 steps",
    }
    assert (
        "Recommendation (non-streaming): For the lowest real-time factor within the fidelity "
        "bound (mrstft_distance <= 0.2, LLM top-1 agreement >= 0.9) use **LLM 8bit, flow fp32, "
        "10 steps**; for the best fidelity within 1.5x the fastest real-time factor use **LLM "
        "8bit, flow fp32, 3 steps**."
    ) in md
    assert (
        "Recommendation (streaming): For the lowest real-time factor within the fidelity bound"
        in md
    )
    assert (
        "By first chunk (warm): For the lowest first chunk within the fidelity bound "
        "(mrstft_distance <= 0.2, LLM top-1 agreement >= 0.9) use **LLM fp32, flow fp32, "
        "first_hop 10, 10 steps**; for the best fidelity within 1.5x the fastest first chunk "
        "use **LLM fp32, flow fp32, 3 steps**."
    ) in md
    # every table of a synthetic group has the label in its caption
    assert md.splitlines().count(f"*{SYNTHETIC_NOTE}.*") == 6
    hist = _table(md, "| created | run | commit |")
    assert [(r[0], r[2], r[5], r[6]) for r in hist] == [
        ("2026-11-20", "1111111", "4.1", "1.6"),
        ("2026-11-28", "2222222", "3.6", "1.3"),
        ("2026-11-30", "unknown commit", "3.4", "n/a"),
    ]


def test_mixed_weights_are_plotted_apart_with_stable_names(tmp_path: Path) -> None:
    runs = [read_bench(p) for p in (SWEEP, OLD, REAL)]
    md = build_report([], runs, tmp_path / "a", bench_sections=True).read_text()
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert names == [
        "fidelity_vs_rtf_real_macos-arm64-fixture-fixture-m_short.png",
        "fidelity_vs_rtf_stream_synthetic_linux-x86_64-fixture-fixture-cpu_short.png",
        "fidelity_vs_rtf_synthetic_linux-x86_64-fixture-fixture-cpu_short.png",
        "first_chunk_vs_steps_synthetic_linux-x86_64-fixture-fixture-cpu_short.png",
        "memory_vs_steps_real_macos-arm64-fixture-fixture-m_short.png",
        "memory_vs_steps_synthetic_linux-x86_64-fixture-fixture-cpu_long.png",
        "memory_vs_steps_synthetic_linux-x86_64-fixture-fixture-cpu_short.png",
        "rtf_vs_steps_real_macos-arm64-fixture-fixture-m_short.png",
        "rtf_vs_steps_synthetic_linux-x86_64-fixture-fixture-cpu_long.png",
        "rtf_vs_steps_synthetic_linux-x86_64-fixture-fixture-cpu_short.png",
        "sim_vs_rtf_real_macos-arm64-fixture-fixture-m_short.png",
    ]
    for name in names:
        _, text = _png(tmp_path / "a" / name)
        series = _series(tmp_path / "a" / name)
        if "_real_" in name:  # never a synthetic point or label in a real-weights plot
            assert text["Weights"] == "real" and "SYNTHETIC" not in text["Title"]
            assert not any("SYNTHETIC" in s for s in series), name
        else:
            assert text["Weights"] == "synthetic"
            assert all(s.endswith(SYNTHETIC_TAG) for s in series), name
    # real weights: WER is the fidelity, the bound is the reference WER + 1
    assert (
        "For the lowest real-time factor within the fidelity bound (WER <= 3.00 % (reference "
        "setting's WER + 1.0)) use **LLM fp32, flow fp32, 3 steps**" in md
    )
    sim = _table(md, "| case | weights | RTF (median) | SIM |")
    assert ["LLM 8bit, flow fp32, 3 steps", "real", "0.5", "0.62"] in sim
    # the old run has no fidelity figures but its speed is shown; its repeats too
    assert "- `fixture-old-format` (synthetic **(SYNTHETIC)** weights): 2" in md
    # the same inputs give the same files again
    build_report([], runs, tmp_path / "b", bench_sections=True)
    assert sorted(p.name for p in (tmp_path / "b").glob("*.png")) == names


# ------------------------------------------------------------------ the command line


def test_cli_with_bench_results_only(tmp_path: Path, capsys) -> None:
    out = tmp_path / "rep"
    args = ["build", "--bench", str(SWEEP), "--history", str(HISTORY), "--out", str(out)]
    assert main(args) == 0
    assert (out / "report.md").is_file()
    assert {p.name for p in out.glob("*.png")} == set(EXPECTED)
    assert capsys.readouterr().out.strip() == str(out / "report.md")


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "no such file or folder"),
        ("{not json", "not JSON"),
        ('{"schema": "other"}', "not a bench results file"),
        ('{"schema": "cosyvoice2-mlx-bench/1", "cases": {}}', "cases: expected a list"),
        ('{"schema": "cosyvoice2-mlx-bench/1", "cases": [3]}', "cases[0]: expected an object"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_cli_bad_file_is_one_line_and_writes_nothing(tmp_path: Path, capsys, content, match):
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    out = tmp_path / "rep"
    assert main(["build", "--bench", str(bad), "--history", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == (
        ["bad.json"] if content is not None else []
    )


def test_cli_no_results_is_a_clean_error(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["build", "--bench", str(empty), "--out", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err
    assert err == "no eval or bench results found\n"
    assert not (tmp_path / "rep").exists()


def test_failed_build_leaves_no_partial_report(tmp_path: Path, monkeypatch) -> None:
    import reports.bench_plots as bp

    def boom(*a, **k):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(bp, "_history", boom)
    with pytest.raises(RuntimeError, match="drawing failed"):
        build_report([], [read_bench(SWEEP)], tmp_path / "rep", bench_sections=True)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_folder_gets_the_new_files(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    build_report([], [read_bench(SWEEP)], out, bench_sections=True)
    assert (out / "keep.txt").is_file() and (out / "rtf_vs_steps.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    shutil.rmtree(out)


def test_call_to_call_noise_from_stored_runs() -> None:
    from reports.bench_plots import call_to_call_noise
    from reports.formats import BenchCase, BenchRun

    def run(repeats, *cases):
        cs = tuple(
            BenchCase({}, {"rtf": med}, "synthetic", id=f"c{i}", spread={"rtf": (lo, hi)})
            for i, (lo, med, hi) in enumerate(cases)
        )
        return BenchRun(Path("x.json"), "synthetic", "m", "a", "r", cs, repeats=repeats)

    assert call_to_call_noise([]) is None
    assert call_to_call_noise([run(1, (3.0, 4.0, 5.0))]) is None  # one call: no spread
    med, top, n = call_to_call_noise(
        [run(3, (3.9, 4.0, 4.1), (1.8, 2.0, 2.2)), run(2, (0.9, 1.0, 1.5))]
    )
    assert n == 3
    assert med == pytest.approx(0.2) and top == pytest.approx(0.6)
