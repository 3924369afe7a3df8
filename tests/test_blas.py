"""`cosyvoice2.blas`: MLX's CPU matmul bound to a fast BLAS without `LD_PRELOAD` (Linux).

Each case runs in a fresh process (the choice is made once, before MLX loads), with
`LD_PRELOAD` removed. A counting CBLAS library built here proves the mechanism end to
end: named by `COSYVOICE2_BLAS`, it is the one MLX's matmul calls.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="MLX's bundled BLAS is a Linux matter"
)

COUNTING_BLAS = r"""
/* cblas_sgemm, naive, counting its calls: proves which library MLX's matmul binds to. */
static long calls = 0;
long counted_calls(void) { return calls; }
void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  calls++;
  int row = order == 101, tA = ta != 111, tB = tb != 111;
  for (int i = 0; i < m; i++)
    for (int j = 0; j < n; j++) {
      double s = 0;
      for (int p = 0; p < k; p++) {
        /* row-major: A[i][p] = a[i*lda+p] (or a[p*lda+i] transposed); column-major swaps */
        float x = row ? (tA ? a[p * lda + i] : a[i * lda + p]) : (tA ? a[i * lda + p] : a[p * lda + i]);
        float y = row ? (tB ? b[j * ldb + p] : b[p * ldb + j]) : (tB ? b[p * ldb + j] : b[j * ldb + p]);
        s += (double)x * y;
      }
      float *out = row ? &c[i * ldc + j] : &c[j * ldc + i];
      *out = alpha * (float)s + (beta == 0 ? 0 : beta * *out);
    }
}
"""

PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    first = sys.argv[1] == "mlx-first"
    if first:
        import mlx.core
    import cosyvoice2
    import mlx.core as mx
    import numpy as np

    a = mx.random.normal((33, 70), key=mx.random.key(1))
    b = mx.random.normal((70, 21), key=mx.random.key(2))
    got = np.array(a @ b)
    want = np.array(a).astype(np.float64) @ np.array(b).astype(np.float64)

    class Info(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]
    libdl = ctypes.CDLL("libc.so.6")
    info = Info()
    try:  # the library the global scope offers: the one libmlx.so bound to
        fn = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p)
        libdl.dladdr(fn, ctypes.byref(info))
        where = info.fname.decode()
    except AttributeError:  # none: libmlx.so bound to its own (bundled) libblas
        where = None
    status = cosyvoice2._blas.status()
    calls = None
    if status["blas"] == "path":
        calls = ctypes.CDLL(status["path"]).counted_calls()
    print(json.dumps({"status": status, "global_sgemm": where, "calls": calls,
                      "err": float(np.abs(got - want).max())}))
    """
)


def _probe(tmp_path: Path, blas: str, *, mlx_first: bool = False, **env: str) -> tuple[dict, str]:
    environ = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    environ.update(COSYVOICE2_BLAS=blas, COSYVOICE2_CACHE=str(tmp_path / "cache"), **env)
    environ["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "mlx-first" if mlx_first else "-"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture(scope="module")
def counting_blas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None, "a C compiler is needed to build the counting BLAS"
    d = tmp_path_factory.mktemp("blas")
    (d / "counting.c").write_text(COUNTING_BLAS)
    out = d / "libcounting.so"
    subprocess.run(
        [cc, "-O1", "-shared", "-fPIC", str(d / "counting.c"), "-o", str(out)], check=True
    )
    return out


def test_a_named_library_is_the_one_mlx_matmul_calls(tmp_path: Path, counting_blas: Path) -> None:
    result, stderr = _probe(tmp_path, str(counting_blas))
    assert result["status"] == {
        "blas": "path",
        "path": str(counting_blas),
        "note": "COSYVOICE2_BLAS",
    }
    assert result["calls"] >= 1  # MLX's matmul went through it
    assert result["err"] < 1e-4
    assert result["global_sgemm"] == str(counting_blas)
    assert stderr == ""


def test_off_leaves_mlx_bundled_blas(tmp_path: Path) -> None:
    result, stderr = _probe(tmp_path, "off")
    assert result["status"]["blas"] == "bundled"
    assert result["global_sgemm"] is None  # nothing in the global scope: libmlx's own libblas
    assert result["err"] < 1e-4
    assert stderr == ""  # asked for: no notice


@pytest.mark.skipif(
    not os.path.isfile("/usr/lib/x86_64-linux-gnu/libopenblas.so.0"), reason="no Debian OpenBLAS"
)
def test_system_openblas(tmp_path: Path) -> None:
    result, stderr = _probe(tmp_path, "system")
    assert result["status"]["blas"] == "system"
    assert "openblas" in result["global_sgemm"]
    assert result["err"] < 1e-4
    assert stderr == ""


def test_scipy_openblas32_through_a_shim_built_once(tmp_path: Path) -> None:
    pytest.importorskip("scipy_openblas32")
    result, stderr = _probe(tmp_path, "scipy-openblas32")
    status = result["status"]
    assert status["blas"] == "scipy-openblas32", stderr
    assert status["path"].startswith(str(tmp_path / "cache" / "blas"))
    assert result["global_sgemm"] == status["path"]  # the shim forwards to the wheel's library
    assert result["err"] < 1e-4
    built = Path(status["path"]).stat().st_mtime_ns
    again, _ = _probe(tmp_path, "scipy-openblas32", CC="/nonexistent/cc")  # no compiler needed now
    assert again["status"] == status and Path(status["path"]).stat().st_mtime_ns == built


def test_nothing_found_is_said_once(tmp_path: Path) -> None:
    pytest.importorskip("scipy_openblas32")
    result, stderr = _probe(tmp_path, "scipy-openblas32", CC="/nonexistent/cc")
    assert result["status"]["blas"] == "bundled"
    lines = [line for line in stderr.splitlines() if line.startswith("cosyvoice2:")]
    assert len(lines) == 1 and "bundled reference BLAS" in lines[0] and "shim" in lines[0]
    assert "Traceback" not in stderr


def test_mlx_loaded_first_is_too_late_and_said(tmp_path: Path) -> None:
    result, stderr = _probe(tmp_path, "auto", mlx_first=True)
    assert result["status"]["blas"] == "bundled"
    assert "too late" in stderr and stderr.count("cosyvoice2:") == 1


def test_a_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    environ.update(COSYVOICE2_BLAS=str(tmp_path / "missing.so"), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", "import cosyvoice2"], capture_output=True, text=True, env=environ
    )
    assert proc.returncode != 0
    assert "COSYVOICE2_BLAS=" in proc.stderr and "missing.so" in proc.stderr
