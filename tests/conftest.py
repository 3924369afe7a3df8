"""Shared fixtures: synthetic official model dirs and the official reference modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep torch from fighting MLX/OpenBLAS for the two cores; parity numerics do not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _need_reference() -> None:
    pytest.importorskip("torch")
    pytest.importorskip(
        "cosyvoice", reason="the official CosyVoice code (parity environment) is not installed"
    )


@pytest.fixture(scope="session")
def tiny_pt_dir() -> Path:
    """Synthetic official dir (tiny) with the three `.pt` files, without the ONNX files."""
    _need_reference()
    from cosyvoice2_testing.synthetic import cached_official_dir

    return cached_official_dir("tiny", seed=0, onnx=False)


@pytest.fixture(scope="session")
def tiny_official_dir() -> Path:
    """Synthetic official dir (tiny), complete: `.pt` files, ONNX files and tokenizer."""
    _need_reference()
    from cosyvoice2_testing.synthetic import cached_official_dir

    return cached_official_dir("tiny", seed=0, onnx=True)


@pytest.fixture(scope="session")
def full_official_dir() -> Path:
    """Synthetic official dir at the real 0.5B shapes (generated once, about 2.5 GB)."""
    _need_reference()
    from cosyvoice2_testing.synthetic import cached_official_dir

    return cached_official_dir("full", seed=0, onnx=True)


@pytest.fixture(scope="session")
def full_pt_dir() -> Path:
    """Synthetic official dir at the real 0.5B shapes, `.pt` files only (no ONNX): for the
    CI-affordable full-size parity subset of the default run."""
    _need_reference()
    from cosyvoice2_testing.synthetic import cached_official_dir

    return cached_official_dir("full", seed=0, onnx=False)


@pytest.fixture(scope="session")
def torch_threads() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_mlx_dir(tiny_official_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic official dir converted to an MLX model dir (once per session)."""
    from cosyvoice2.convert import convert

    return convert(tiny_official_dir, tmp_path_factory.mktemp("mlx") / "tiny")


@pytest.fixture(scope="session")
def mlx_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MLX model dir from random weights, built without torch or the official code
    (`tests/mlx_tiny.py`), once per session: for every test that does not compare with the
    official code. Parity tests use `tiny_mlx_dir`, whose weights the official side shares."""
    from tests.mlx_tiny import make_mlx_tiny_dir

    return make_mlx_tiny_dir(tmp_path_factory.mktemp("mlx-tiny") / "tiny")


@pytest.fixture(scope="session")
def prompt_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 s voiced prompt at 22.05 kHz (an odd rate on purpose) with a harmonic signal."""
    import numpy as np
    import soundfile as sf

    path = tmp_path_factory.mktemp("prompt") / "prompt.wav"
    sr = 22050
    t = np.arange(int(2.0 * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(path, x.astype(np.float32), sr)
    return path


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty hub cache (`HF_HOME`) for one test module (the hub tests)."""
    return tmp_path_factory.mktemp("hf-home")


ASTERISK_CLIPS = ("agent-alreadyon", "auth-incorrect")


@pytest.fixture
def asterisk_meta(tmp_path: Path) -> Path:
    """Two Asterisk prompts (real speech with transcripts) as an eval test set `meta.lst`."""
    from eval.realspeech import english_transcripts, voice_dir

    try:
        d = voice_dir("en_US_f_Allison")
        texts = english_transcripts()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    root = tmp_path / "set"
    root.mkdir()
    lines = [f"{c}|{texts[c]}|{d / (c + '.wav')}|{texts[c]}" for c in ASTERISK_CLIPS]
    (root / "meta.lst").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "meta.lst"


# ------------------------------------------------------------------ routes and power

from tests.routes import KERNELS_SKIP, route  # noqa: E402,F401  (the `route` fixture)

# ------------------------------------------------------------------ no silent skip

STRICT_ENV = "COSYVOICE2_NO_SKIP"  # set by `nox -s tests` / `tests_full`
UNBUILDABLE_ENV = "COSYVOICE2_KERNELS_UNBUILDABLE"  # set by nox when kernels/build.sh built nothing


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _kernel_skip_allowed(reason: str) -> bool:
    """A kernel test may skip only where the extension cannot be built here, or in the
    deliberate run with it switched off (`COSYVOICE2_KERNELS=0`)."""
    if not reason.startswith(KERNELS_SKIP):
        return False
    off = os.environ.get("COSYVOICE2_KERNELS", "").strip().lower() in ("0", "off", "false", "no")
    return off or bool(os.environ.get(UNBUILDABLE_ENV))


def _fail_skip(report) -> None:
    """In strict mode, turn a skip that is not an allowed kernel skip into a failure naming what is missing."""
    if not os.environ.get(STRICT_ENV) or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if _kernel_skip_allowed(reason):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped, and skips fail here ({STRICT_ENV} is set by nox -s tests): MISSING: {reason}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result())


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    from tests import power

    if power.RECORDS:
        terminalreporter.section("parity power checks")
        terminalreporter.write_line(power.table())
        path = os.environ.get("COSYVOICE2_POWER_REPORT")
        if path:
            import json

            Path(path).write_text(json.dumps([r.as_dict() for r in power.RECORDS], indent=1) + "\n")

    from tests import bad_inputs

    if bad_inputs.RECORDS:
        terminalreporter.section("bad inputs tried")
        terminalreporter.write_line(bad_inputs.table())
        path = os.environ.get("COSYVOICE2_BAD_INPUT_REPORT")
        if path:
            bad_inputs.write_report(Path(path))
