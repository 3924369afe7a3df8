"""Weights labels are derived from the weights' own record, never assumed, never overridden.

A result says `synthetic`, `real` or `unknown` about the weights it came from.
The record: an official dir made by `cosyvoice2_testing.synthetic` holds
`synthetic.json`; the converter writes `weights` into the MLX dir's config
(`synthetic`, or `unknown`: nothing in the released files says they are the
release). Everything downstream (the model's `weights_label`, the bench targets,
the bench validator, eval, the report) reads that record; a missing record is
`unknown` (never `real`), and no command-line flag relabels a run.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest

from tests.bad_inputs import cli_refused

AREA = "labels"
DATA = Path(__file__).parent / "data" / "eval" / "report"


def _mlx_copy(mlx_tiny_dir: Path, dst: Path, weights: str | None) -> Path:
    """A copy of the tiny MLX dir whose config records `weights` (no record when None)."""
    shutil.copytree(mlx_tiny_dir, dst)
    meta = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    meta.pop("weights", None)
    if weights is not None:
        meta["weights"] = weights
    (dst / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    return dst


# ---------------------------------------------------------------- the converter


@pytest.mark.parametrize(
    ("record", "expected"),
    [(None, "unknown"), ({"weights": "real"}, "synthetic")],
    ids=["no-synthetic-json", "synthetic-json-claiming-real"],
)
def test_converter_records_the_weights_label(
    record: dict | None, expected: str, tiny_official_dir: Path, tmp_path: Path
) -> None:
    """No `synthetic.json`: `unknown`, not `real`. A `synthetic.json` is synthetic, whatever it says."""
    from cosyvoice2.convert import convert

    src = shutil.copytree(tiny_official_dir, tmp_path / "official")
    (src / "synthetic.json").unlink()
    if record is not None:
        (src / "synthetic.json").write_text(json.dumps(record), encoding="utf-8")
    dst = convert(src, tmp_path / "mlx")
    assert json.loads((dst / "config.json").read_text(encoding="utf-8"))["weights"] == expected


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({}, "unknown"),
        ({"weights": "synthetic"}, "synthetic"),
        ({"weights": "real"}, "real"),
        ({"weights": "unknown"}, "unknown"),
        ({"weights": "REAL!"}, "unknown"),
        ({"weights": None}, "unknown"),
    ],
)
def test_model_weights_label_is_the_record_or_unknown(meta: dict, expected: str) -> None:
    from cosyvoice2.model import CosyVoice2

    assert CosyVoice2.weights_label.fget(types.SimpleNamespace(meta=meta)) == expected


def test_loaded_model_without_a_record_is_unknown(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    import cosyvoice2

    model = cosyvoice2.load(_mlx_copy(mlx_tiny_dir, tmp_path / "mlx", None))
    assert model.weights_label == "unknown"


# ---------------------------------------------------------------- bench


def test_bench_labels_come_from_the_record(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    from bench.interface import official_dir_label
    from bench.reference import OfficialTarget
    from bench.targets import CosyVoice2Target

    for weights, expected in ((None, "unknown"), ("synthetic", "synthetic"), ("x", "unknown")):
        d = _mlx_copy(mlx_tiny_dir, tmp_path / f"mlx-{weights}", weights)
        assert CosyVoice2Target().prepare([], {"model": str(d)}).weights["label"] == expected

    official = tmp_path / "official"
    official.mkdir()
    (official / "llm.pt").write_bytes(b"")  # an official dir, as far as labels go
    assert official_dir_label(official) == "unknown"
    prepared = OfficialTarget().prepare([], {"official_model": str(official)})
    assert prepared.weights["label"] == "unknown"
    (official / "synthetic.json").write_text("{}", encoding="utf-8")
    assert official_dir_label(official) == "synthetic"
    prepared = OfficialTarget().prepare([], {"official_model": str(official)})
    assert prepared.weights["label"] == "synthetic"


def test_bench_validator_accepts_unknown_only_besides_the_two(tmp_path: Path) -> None:
    from bench.results import validate

    doc = json.loads((DATA / "bench.json").read_text(encoding="utf-8"))
    assert validate(doc) == []
    for label in ("synthetic", "real", "unknown"):
        doc["weights"]["label"] = label
        assert validate(doc) == [], label
    doc["weights"]["label"] = "probably-real"
    assert any("weights.label" in p for p in validate(doc))


# ---------------------------------------------------------------- eval


def test_eval_weights_label(tmp_path: Path) -> None:
    from eval.synth import CosyVoice2Synthesizer, weights_label

    assert weights_label(tmp_path) == "unknown"
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    assert weights_label(tmp_path) == "unknown"
    (tmp_path / "config.json").write_text(json.dumps({"weights": "bogus"}), encoding="utf-8")
    assert weights_label(tmp_path) == "unknown"
    (tmp_path / "config.json").write_text(json.dumps({"weights": "real"}), encoding="utf-8")
    assert weights_label(tmp_path) == "real"
    assert CosyVoice2Synthesizer(tmp_path).describe()["weights"] == "real"
    (tmp_path / "synthetic.json").write_text(json.dumps({"weights": "real"}), encoding="utf-8")
    assert weights_label(tmp_path) == "synthetic"
    with pytest.raises(TypeError):  # no way to pass a label in
        CosyVoice2Synthesizer(tmp_path, weights="real")  # type: ignore[call-arg]


def test_eval_has_no_relabelling_flag(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "synthetic.json").write_text("{}", encoding="utf-8")
    for cmd in ("run", "synth"):
        argv = [cmd, "--set", str(tmp_path / "set.lst"), "--model-dir", str(model)]
        argv += ["--weights", "real", "--out", str(tmp_path / "out")]
        cli_refused(
            AREA,
            f"eval {cmd} --weights real on a synthetic model dir",
            argv,
            module="eval",
            watch=tmp_path,
            match="--weights",
        )
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- reports


def _eval_doc(tmp_path: Path, name: str, weights: str | None) -> Path:
    doc = json.loads((DATA / "eval_en_real_fp32_n10.json").read_text(encoding="utf-8"))
    for d in (doc, doc["settings"]):
        d.pop("weights", None)
        if weights is not None:
            d["weights"] = weights
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_reports_read_a_missing_label_as_unknown(tmp_path: Path) -> None:
    from reports.formats import read_bench, read_eval

    assert read_eval(_eval_doc(tmp_path, "e.json", None)).weights == "unknown"
    doc = json.loads((DATA / "bench.json").read_text(encoding="utf-8"))
    del doc["weights"]
    for case in doc["cases"]:
        case.pop("weights", None)
    (tmp_path / "b.json").write_text(json.dumps(doc), encoding="utf-8")
    bench = read_bench(tmp_path / "b.json")
    assert bench.weights == "unknown" and {c.weights for c in bench.cases} == {"unknown"}


def test_report_shows_unknown_weights_apart_from_real(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from reports.build import build_report
    from reports.formats import read_eval

    unknown = read_eval(_eval_doc(tmp_path, "unknown.json", "unknown"))
    assert unknown.label.endswith("[unknown weights]")
    md = build_report([unknown], [], tmp_path / "report").read_text(encoding="utf-8")
    assert "> **Unknown weights.**" in md
    assert "| en | unknown **(not recorded as real)** |" in md
    assert "## Set `en` (unknown weights)" in md
    assert "no comparison with the paper" in md  # unknown is not compared as real
    assert (tmp_path / "report" / "quality_vs_steps_en_unknown.png").is_file()

    real = read_eval(_eval_doc(tmp_path, "real.json", "real"))
    md = build_report([unknown, real], [], tmp_path / "both").read_text(encoding="utf-8")
    assert "## Set `en`\n" in md and "## Set `en` (unknown weights)" in md
    paper = md.split("## Against the paper", 1)[1].split("## Set", 1)[0]
    assert "unknown" not in paper and "| test-en | fp32, 10 steps |" in paper
