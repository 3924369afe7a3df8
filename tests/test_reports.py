"""Report builder: a report with plots from small fixed results files (tests/data/eval/report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from reports.build import DPI, FIGSIZE, build_report  # noqa: E402
from reports.formats import BenchCase, BenchRun, join_rtf, read_bench, read_eval  # noqa: E402

DATA = Path(__file__).parent / "data" / "eval" / "report"


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_report_from_fixed_results(tmp_path: Path) -> None:
    evals = [read_eval(p) for p in sorted(DATA.glob("eval_*.json"))]
    benches = [read_bench(DATA / "bench.json")]
    assert len(evals) == 7 and len(benches[0].cases) == 6
    md_path = build_report(evals, benches, tmp_path)
    md = md_path.read_text(encoding="utf-8")

    expected = {
        "quality_vs_steps_en.png",
        "tradeoff_en.png",
        "wer_distribution_en.png",
        "quality_vs_steps_en_synthetic.png",
        "wer_distribution_en_synthetic.png",
    }
    assert {p.name for p in tmp_path.glob("*.png")} == expected
    w, h = int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)
    for name in expected:
        img = _png(tmp_path / name)
        assert img.shape == (h, w, 3), name
        # not blank: a white background with a fair amount of drawing on it
        drawn = np.any(img < 200, axis=2).mean()
        assert 0.01 < drawn < 0.6, f"{name}: {drawn:.3f} of pixels drawn"
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20, name
        assert f"]({name})" in md  # embedded in the markdown

    # synthetic runs are labelled; the paper table has the real runs only
    assert "> **Synthetic weights.**" in md
    assert "## Set `en` (synthetic weights)" in md
    assert "| en | synthetic **(synthetic)** |" in md
    real_10 = json.loads((DATA / "eval_en_real_fp32_n10.json").read_text())
    ours = 100 * real_10["summary"]["mean_error_rate"]
    row = next(line for line in md.splitlines() if line.startswith("| test-en | fp32, 10 steps |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"{ours:.2f}" and cells[4] == "2.57" and cells[5] == f"{ours - 2.57:+.2f}"
    assert cells[7] == "0.652" and cells[8].startswith("no: SIM encoder resemblyzer")
    assert not any(
        line.startswith("| test-en | fp32, 10 steps [synthetic]") for line in md.splitlines()
    )
    # failures are listed, one per run
    assert md.count("| utt4 | asr: RuntimeError: fixture failure |") == 7
    # the runs table carries the joined RTF of the bench case with the same settings
    run_row = next(
        line
        for line in md.splitlines()
        if line.startswith("| en | real | cosyvoice2-mlx | 8bit | 3 |")
    )
    assert "| 2.25 |" in run_row


def test_report_without_bench_or_real_weights(tmp_path: Path) -> None:
    evals = [read_eval(DATA / "eval_en_synthetic_fp32_n10.json")]
    md = build_report(evals, [], tmp_path).read_text(encoding="utf-8")
    assert "no comparison with the paper" in md
    assert "No bench results given" in md
    assert "*Quality against speed (RTF from the bench): no data" in md
    assert not (tmp_path / "tradeoff_en_synthetic.png").exists()


def test_join_rule() -> None:
    run = read_eval(DATA / "eval_en_real_fp32_n3.json")

    def case(rtf, **settings):
        base = {
            "target": "cosyvoice2",
            "llm": "fp32",
            "dtype": "fp32",
            "steps": 3,
            "text": "short",
            "stream": False,
        }
        return BenchCase(settings={**base, **settings}, figures={"rtf": rtf}, weights="real")

    bench = BenchRun(
        source=Path("b.json"),
        weights="real",
        machine="m",
        git_commit=None,
        run_id=None,
        cases=(
            case(1.0),
            case(3.0),
            case(9.0, text="long"),  # not the headline length: ignored when short exists
            case(7.0, stream=True),  # streaming: never joined
            case(8.0, steps=10),
            case(6.0, llm="8bit"),
            case(5.0, target="official"),
            case(4.0, dtype="bf16"),  # flow/HiFT in another dtype than eval runs
            case(4.5, kernels="off"),  # LLM kernels off: not how eval loads the model
        ),
    )
    assert join_rtf(run, [bench]) == 2.0  # median of the two short cases
    only_long = BenchRun(
        Path("b.json"), "real", "m", None, None, (case(9.0, text="long"), case(11.0, text="long"))
    )
    assert join_rtf(run, [only_long]) == 10.0
    synthetic = BenchRun(
        Path("b.json"),
        "synthetic",
        "m",
        None,
        None,
        (BenchCase(case(1.0).settings, {"rtf": 1.0}, "synthetic"),),
    )
    assert join_rtf(run, [synthetic]) is None  # weights must match


def test_readers_reject_other_files(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ValueError, match="not a bench results file"):
        read_bench(p)
    with pytest.raises(ValueError, match="not an eval results file"):
        read_eval(p)


def test_bench_fixture_is_a_valid_bench_file() -> None:
    """The fixture follows the bench's own schema, so the fields read here are the real ones."""
    results = pytest.importorskip("bench.results")
    assert results.validate(json.loads((DATA / "bench.json").read_text())) == []


def test_cli(tmp_path: Path) -> None:
    from reports.cli import main

    out = tmp_path / "rep"
    assert (
        main(["build", "--eval", str(DATA), "--bench", str(DATA / "bench.json"), "--out", str(out)])
        == 0
    )
    assert (out / "report.md").is_file() and len(list(out.glob("*.png"))) == 5
