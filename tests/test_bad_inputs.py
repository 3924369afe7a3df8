"""The hardening checks of `tests/bad_inputs.py` fail where they should."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosyvoice2.errors import CosyVoiceError, InputError
from tests import bad_inputs


@pytest.fixture(autouse=True)
def _no_records(monkeypatch):
    """These planted cases are not bad inputs of the package: keep them out of the table."""
    monkeypatch.setattr(bad_inputs, "RECORDS", [])


def _raise(exc: BaseException):
    def fn():
        raise exc

    return fn


def test_refused_accepts_a_clean_error(tmp_path: Path) -> None:
    rec = bad_inputs.refused("t", "clean", _raise(InputError("bad thing")), tmp_path, "bad")
    assert rec.error == "bad thing" and not rec.files_changed
    assert bad_inputs.RECORDS == [rec]


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        (_raise(ValueError("x")), "ValueError instead of a CosyVoiceError"),
        (_raise(CosyVoiceError("two\nlines")), "not one line"),
        (lambda: None, "accepted"),
    ],
)
def test_refused_fails_otherwise(fn, why: str) -> None:
    with pytest.raises(AssertionError, match=why):
        bad_inputs.refused("t", "planted", fn)


def test_refused_fails_when_a_file_changed(tmp_path: Path) -> None:
    def write_then_fail():
        (tmp_path / "half.wav").write_bytes(b"RIFF")
        raise InputError("failed after writing")

    with pytest.raises(AssertionError, match="files under"):
        bad_inputs.refused("t", "partial file", write_then_fail, tmp_path)


def test_refused_checks_the_message_names_the_problem() -> None:
    with pytest.raises(AssertionError, match="does not mention"):
        bad_inputs.refused("t", "vague", _raise(InputError("error")), match="speed")


def test_cli_refused_fails_on_a_traceback_or_success(tmp_path: Path) -> None:
    # `python -m json.tool FILE` on a missing file: argparse error, one line, exit 2
    rec = bad_inputs.cli_refused("t", "missing", [str(tmp_path / "none.json")], module="json.tool")
    assert rec.exit_code == 2 and rec.peak_mb is not None and rec.peak_mb > 0
    (tmp_path / "crash.py").write_text("raise ValueError('boom')\n")
    with pytest.raises(AssertionError, match="traceback"):
        bad_inputs.cli_refused("t", "crash", [], module="crash", env={"PYTHONPATH": str(tmp_path)})
    good = tmp_path / "good.json"
    good.write_text("{}")
    with pytest.raises(AssertionError, match="exit code 0"):
        bad_inputs.cli_refused("t", "accepted", [str(good)], module="json.tool")


def test_bounded_measures_the_child_and_fails_above_the_limit() -> None:
    code = "from cosyvoice2.errors import InputError\nraise InputError('refused early')"
    rec = bad_inputs.bounded("t", "small", code, limit_mb=2000)
    assert rec.error == "refused early" and 0 < rec.peak_mb < 2000
    hog = "x = bytearray(300 << 20)\nx[::4096] = b'1' * len(x[::4096])\n" + code
    with pytest.raises(AssertionError, match="peak"):
        bad_inputs.bounded("t", "hog", hog, limit_mb=rec.peak_mb + 100)
    with pytest.raises(AssertionError, match="traceback"):
        bad_inputs.bounded("t", "crash", "raise ValueError('x')", limit_mb=2000)
    with pytest.raises(AssertionError, match="accepted"):
        bad_inputs.bounded("t", "ok", "pass", limit_mb=2000)


def test_the_report_keeps_the_documents_introduction(tmp_path: Path) -> None:
    bad_inputs.refused("t", "kept", _raise(InputError("bad")))
    doc = tmp_path / "bad-inputs.md"
    doc.write_text(f"# Intro\n\n{bad_inputs.MARKER}\n\nold table\n")
    bad_inputs.write_report(doc)
    text = doc.read_text()
    assert text.startswith("# Intro\n") and "old table" not in text
    assert "| t | kept | bad | raised | no | - |" in text
    assert text.rstrip().endswith(
        "1 bad inputs tried, 1 clean errors, 0 tracebacks, 0 with files changed."
    )
