"""The no-silent-skip rule of `nox -s tests` (tests/conftest.py): with `COSYVOICE2_NO_SKIP`
set, a skipped test fails and names what is missing; only kernel tests may skip, and
only where the extension cannot be built or is switched off on purpose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CASES = """
import pytest

def test_missing_package():
    pytest.skip("espeak-ng not installed")

def test_kernels():
    pytest.skip("cosyvoice2_kernels not built")

def test_ok():
    pass
"""


def run(tmp_path: Path, module: str, **env: str) -> tuple[int, str]:
    (tmp_path / "test_cases.py").write_text(module)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COSYVOICE2_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), str(tmp_path)],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def test_skips_pass_outside_strict_mode(tmp_path: Path) -> None:
    code, out = run(tmp_path, CASES)
    assert code == 0, out
    assert "1 passed, 2 skipped" in out


def test_strict_mode_fails_every_skip_and_names_what_is_missing(tmp_path: Path) -> None:
    code, out = run(tmp_path, CASES, COSYVOICE2_NO_SKIP="1")
    assert code == 1, out
    assert "2 failed, 1 passed" in out
    assert "MISSING: espeak-ng not installed" in out


@pytest.mark.parametrize("why", ["COSYVOICE2_KERNELS", "COSYVOICE2_KERNELS_UNBUILDABLE"])
def test_strict_mode_lets_kernel_tests_skip_only_without_the_extension(
    tmp_path: Path, why: str
) -> None:
    env = {"COSYVOICE2_NO_SKIP": "1", why: "0" if why == "COSYVOICE2_KERNELS" else "1"}
    code, out = run(tmp_path, CASES, **env)
    assert code == 1, out
    assert "1 failed, 1 passed, 1 skipped" in out  # the kernel skip stays a skip


def test_strict_mode_fails_a_module_level_importorskip(tmp_path: Path) -> None:
    module = 'import pytest\npytest.importorskip("no_such_module_xyz")\n\ndef test_x():\n    pass\n'
    code, out = run(tmp_path, module, COSYVOICE2_NO_SKIP="1")
    assert code != 0, out
    assert "MISSING" in out and "no_such_module_xyz" in out
