"""A fast BLAS for MLX on Linux, found and loaded before MLX is, with no `LD_PRELOAD`.

The `mlx[cpu]` wheel links a reference BLAS (`mlx_cpu.libs/libblas-*.so`) whose fp32
matrix product is dozens of times slower than OpenBLAS; every GEMM of the model goes
through its `cblas_sgemm`. A library loaded with `RTLD_GLOBAL` before `libmlx.so` is
loaded joins the process's global symbol scope, which the dynamic linker searches
before `libmlx.so`'s own dependencies: MLX then binds `cblas_sgemm` (and `cblas_dgemm`,
`cblas_cgemm`, the only BLAS symbols it imports) to that library, as `LD_PRELOAD`
would make it.

`setup()` runs when the package is imported (`cosyvoice2/__init__.py`), so a user who
runs `pip install cosyvoice2-mlx` and `cosyvoice2 synth` gets the fast path. Where
it looks (`COSYVOICE2_BLAS`):

- `auto` (default): an OpenBLAS the process already has (`LD_PRELOAD`); else the
  system's (Debian's `libopenblas0-pthread` and the like); else the OpenBLAS of the
  `scipy-openblas32` wheel (a dependency on Linux x86-64). That wheel prefixes its
  symbols (`scipy_cblas_sgemm`), so a three-function shim that exports the plain
  names is compiled once with the system's C compiler into the cache
  (`$COSYVOICE2_CACHE/blas/`); without a compiler this candidate is skipped. The shim
  also sets that OpenBLAS to one thread per caller (unless `OPENBLAS_NUM_THREADS` is
  set): its thread server serialises GEMMs called from several threads at once, which
  the flow's two CFG-branch threads do (`docs/PERFORMANCE.md` has the measurement).
- `system` or `scipy-openblas32`: that candidate only; a path: that library.
- `off`: leave MLX's bundled BLAS (the bench's slow-BLAS runs, and child processes
  that run torch or CTranslate2, which a process-wide OpenBLAS slows down).

When none is found the process says so once, on stderr, with what to install.
Nothing happens off Linux (MLX on macOS uses Accelerate) or once MLX is already
loaded (then it is too late; the notice says so). `status()` tells what was chosen;
the bench records it with each run.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cosyvoice2 import settings

SWITCH = "COSYVOICE2_BLAS"
SYSTEM_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
SYMBOLS = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")  # what libmlx.so imports from BLAS
SHIM_SOURCE = """\
/* cosyvoice2-mlx: the CBLAS GEMMs MLX imports, forwarded to scipy-openblas32's prefixed names. */
#include <stdlib.h>
#define ARGS int o, int ta, int tb, int m, int n, int k
void scipy_openblas_set_num_threads(int);
void scipy_cblas_sgemm(ARGS, float al, const float *a, int lda, const float *b, int ldb,
                       float be, float *c, int ldc);
void scipy_cblas_dgemm(ARGS, double al, const double *a, int lda, const double *b, int ldb,
                       double be, double *c, int ldc);
void scipy_cblas_cgemm(ARGS, const void *al, const void *a, int lda, const void *b, int ldb,
                       const void *be, void *c, int ldc);
void cblas_sgemm(ARGS, float al, const float *a, int lda, const float *b, int ldb, float be,
                 float *c, int ldc) { scipy_cblas_sgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
void cblas_dgemm(ARGS, double al, const double *a, int lda, const double *b, int ldb, double be,
                 double *c, int ldc) { scipy_cblas_dgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
void cblas_cgemm(ARGS, const void *al, const void *a, int lda, const void *b, int ldb,
                 const void *be, void *c, int ldc) { scipy_cblas_cgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
/* One OpenBLAS thread per caller unless OPENBLAS_NUM_THREADS says otherwise: this build's
   thread server serialises GEMMs that several threads call at once (the flow runs its two
   CFG branches in two threads), so its own threads cost more than they give. */
__attribute__((constructor)) static void one_thread_per_caller(void) {
  if (getenv("OPENBLAS_NUM_THREADS") == NULL) scipy_openblas_set_num_threads(1);
}
"""
NOTICE = (
    "cosyvoice2: MLX is using its bundled reference BLAS, a much slower fp32 matrix product"
    " than OpenBLAS. {why} Install one of: Debian/Ubuntu `apt-get install libopenblas0-pthread`,"
    " or a C compiler (`apt-get install gcc`) for the scipy-openblas32 wheel."
    " Set COSYVOICE2_BLAS=off to silence this."
)

_status: dict[str, str] | None = None
_handles: list[ctypes.CDLL] = []  # loaded libraries stay loaded for the process's life


def status() -> dict[str, str]:
    """What `setup` chose: `{"blas": ..., "path": ..., "note": ...}`.

    `blas` is `preloaded` (an OpenBLAS in `LD_PRELOAD`), `system`, `scipy-openblas32`,
    `path` (a library named by `COSYVOICE2_BLAS`), `bundled` (MLX's own) or
    `platform` (not Linux: MLX's own choice, Accelerate on macOS)."""
    return dict(_status) if _status is not None else setup()


def setup() -> dict[str, str]:
    """Find and load a fast BLAS before MLX is loaded (once per process); see the module doc."""
    global _status
    if _status is None:
        _status = _choose()
        if _status.get("notice"):
            print(_status.pop("notice"), file=sys.stderr)
    return dict(_status)


def _choose() -> dict[str, str]:
    if not sys.platform.startswith("linux"):
        return {"blas": "platform", "path": "", "note": "not Linux: MLX's own BLAS"}
    want = (settings.text(SWITCH) or "auto").strip()
    if want == "off":
        return {"blas": "bundled", "path": "", "note": f"{SWITCH}=off"}
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if "blas" in p.lower()]
    if preload:
        return {"blas": "preloaded", "path": preload[0], "note": "LD_PRELOAD"}
    if "mlx.core" in sys.modules:
        why = "MLX was imported before cosyvoice2, too late to choose its BLAS."
        return {"blas": "bundled", "path": "", "note": why, "notice": NOTICE.format(why=why)}
    found, kind, why = find(want)
    if found is None:
        why = why[0].upper() + why[1:] + "."
        return {"blas": "bundled", "path": "", "note": why, "notice": NOTICE.format(why=why)}
    _load(found)
    return {"blas": kind, "path": str(found), "note": why}


def find(want: str = "auto") -> tuple[Path | None, str, str]:
    """The BLAS library `want` names (see the module doc), without loading it:
    `(path, kind, note)`, or `(None, "bundled", why none)`. The bench uses it to give every
    MLX worker the same library (through `LD_PRELOAD`, which also reaches the peer's)."""
    if want not in ("auto", "system", "scipy-openblas32"):
        path = Path(want).expanduser()
        if not path.is_file():
            raise ValueError(
                f"{SWITCH}={want!r}: expected auto, system, scipy-openblas32, off or a library file"
            )
        return path, "path", SWITCH
    reasons = []
    if want in ("auto", "system"):
        found = system_openblas()
        if found is not None:
            return found, "system", "the system's OpenBLAS"
        reasons.append("no system OpenBLAS")
    if want in ("auto", "scipy-openblas32"):
        shim, why = scipy_openblas_shim()
        if shim is not None:
            return shim, "scipy-openblas32", "the scipy-openblas32 wheel's OpenBLAS"
        reasons.append(why)
    return None, "bundled", "; ".join(reasons)


def _load(path: Path) -> None:
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    missing = [s for s in SYMBOLS[:1] if not hasattr(lib, s)]
    if missing:
        raise ValueError(f"{path} does not export {', '.join(missing)}: not a CBLAS library")
    _handles.append(lib)


def system_openblas() -> Path | None:
    """The system's OpenBLAS shared library, or None."""
    for p in SYSTEM_PATHS:
        if os.path.isfile(p):
            return Path(p)
    return None


def scipy_openblas_shim() -> tuple[Path | None, str]:
    """The shim over the scipy-openblas32 wheel's library, compiled once into the cache;
    (None, why) when the wheel or a C compiler is missing or the build fails."""
    try:
        import scipy_openblas32
    except ImportError:
        return None, "the scipy-openblas32 wheel is not installed"
    lib = Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"
    if not lib.is_file():
        return None, f"scipy-openblas32 has no {lib.name}"
    st = lib.stat()
    key = hashlib.sha256(f"{SHIM_SOURCE}|{lib}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[
        :16
    ]
    shim = settings.path("COSYVOICE2_CACHE") / "blas" / key / "libcosyvoice2_blas.so"
    if shim.is_file():
        return shim, ""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler to build the shim over the scipy-openblas32 wheel"
    try:
        shim.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=shim.parent) as tmp:
            src = Path(tmp) / "shim.c"
            src.write_text(SHIM_SOURCE)
            out = Path(tmp) / shim.name
            cmd = [cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(out),
                   f"-L{lib.parent}", f"-l{scipy_openblas32.get_library()}",
                   f"-Wl,-rpath,{lib.parent}"]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["failed"])[0]
                return None, f"building the scipy-openblas32 shim failed ({first})"
            os.replace(out, shim)  # atomic: a concurrent build leaves one whole file
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building the scipy-openblas32 shim failed ({e})"
    return shim, ""
