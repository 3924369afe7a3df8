"""What a results file records about where and with what it ran: machine, versions, memory.

`machine_kind()` names the kind of machine a baseline belongs to
(`bench/baselines/<kind>.json`): OS, architecture, CPU model name, on Linux x86 the
CPU's generation as its family (and model) number (`cpu_generation`), core count, and on
x86 the widest instruction-set tier the CPU offers (`cpu_isa`), e.g.
`linux-x86_64-amd-epyc-f25-2c-avx2` or `darwin-arm64-apple-m1-virtual-3c`. Both are part
of the kind because virtual machines report one model name for CPUs of several
generations ("AMD EPYC": Zen 3 with AVX2 only, Zen 4 and Zen 5 with AVX-512 and BF16),
and the kernels' speed, and which of them run, follow the generation: the tier tells
Zen 3 from Zen 4, the family Zen 4 (25) from Zen 5 (26).
"""

from __future__ import annotations

import os
import platform
import re
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's marketing name (`/proc/cpuinfo` on Linux, `sysctl` on macOS)."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The x86 tiers, widest first, each with the CPU flags (`/proc/cpuinfo` names) it needs.
ISA_TIERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("amx", ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f")),
    ("avx512bf16", ("avx512_bf16", "avx512f")),
    ("avx512", ("avx512f",)),
    ("avx2", ("avx2", "fma")),
)
RECORDED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as `/proc/cpuinfo` names them (Linux; macOS on Intel via
    `sysctl`, lower-cased and mapped to those names); empty where unknown."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                capture_output=True,
                text=True,
                timeout=5,
            )
        except OSError:
            return set()
        return {f.lower() for f in out.stdout.split()}  # e.g. AVX2, FMA, AVX512F
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa(flags: set[str] | None = None) -> str | None:
    """The widest tier of `ISA_TIERS` the CPU has (`sse` below them); None off x86."""
    if not _x86():
        return None
    flags = cpu_flags() if flags is None else flags
    for name, needs in ISA_TIERS:
        if all(f in flags for f in needs):
            return name
    return "sse"


def cpu_ids(cpuinfo: str | None = None) -> dict[str, str | int] | None:
    """The x86 CPU's `vendor_id`, `cpu family` and `model` numbers, from the first
    processor of `/proc/cpuinfo` (or the text given); None where any is absent (off
    Linux, other architectures)."""
    fields = {"vendor_id": "vendor", "cpu family": "family", "model": "model"}
    ids: dict[str, str | int] = {}
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        for line in text.splitlines():
            if not line.strip() and ids:
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            name = fields.get(key.strip().lower())
            if name and name not in ids:
                ids[name] = value.strip() if name == "vendor" else int(value)
    except (OSError, ValueError):
        return None
    return ids if len(ids) == 3 else None


def cpu_generation() -> str | None:
    """The CPU's generation as a kind names it: `f<family>` on AMD (and Hygon), whose
    family numbers follow the generations (23 Zen and Zen 2, 25 Zen 3 and Zen 4, 26
    Zen 5), `f<family>m<model>` elsewhere (Intel's family has been 6 for two decades; its
    model number names the generation); None where unknown (off Linux x86)."""
    ids = cpu_ids() if _x86() else None
    if not ids:
        return None
    if ids["vendor"] in ("AuthenticAMD", "HygonGenuine"):
        return f"f{ids['family']}"
    return f"f{ids['family']}m{ids['model']}"


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def cpu_count() -> int:
    """CPUs this process may use (affinity-aware on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def memory_gb() -> float | None:
    """Physical memory in GB (10^9 bytes)."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        return round(pages * size / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True)
            return round(int(out.stdout.strip()) / 1e9, 1)
        except (OSError, ValueError):
            pass
    return None


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|cpu|processor|\d+-core|@.*$", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def machine_kind() -> str:
    """The name of this machine kind, used to pick the baseline file."""
    cpu = _slug(cpu_model())
    generation = cpu_generation()
    if generation:
        cpu = f"{cpu}-{generation}"
    kind = f"{sys.platform.rstrip('0123456789')}-{platform.machine().lower()}-{cpu}-{cpu_count()}c"
    isa = cpu_isa()
    return f"{kind}-{isa}" if isa else kind


def machine_info() -> dict:
    """The `machine` record of a results file."""
    return {
        "kind": machine_kind(),
        "os": platform.system(),
        "os_release": platform.release(),
        "platform": platform.platform(),
        "arch": platform.machine(),
        "cpu": cpu_model(),
        "cpu_ids": cpu_ids(),
        "isa": cpu_isa(),
        "cpu_flags": sorted(f for f in cpu_flags() if f in RECORDED_FLAGS),
        "cores": cpu_count(),
        "memory_gb": memory_gb(),
        "hostname": platform.node(),
        "loadavg": _loadavg(),
    }


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> tuple[str | None, bool | None]:
    """The repository's HEAD commit and whether the work tree has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip(), bool(status.stdout.strip())
    except OSError:
        return None, None


def versions() -> dict:
    """The `versions` record: python, mlx, mlx-lm, this package, git commit."""
    commit, dirty = git_commit()
    return {
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "numpy": _version("numpy"),
        "cosyvoice2_mlx": _version("cosyvoice2-mlx"),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def openblas_preloaded() -> bool:
    """Whether this process runs with an OpenBLAS preloaded (MLX on Linux: much faster fp32 matmul)."""
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def preloaded_blas(env: dict[str, str] | None = None) -> str:
    """The BLAS library in `LD_PRELOAD` (of `env`, default this process's), or `bundled`
    (MLX's own reference BLAS on Linux; MLX's platform choice elsewhere)."""
    preload = (os.environ if env is None else env).get("LD_PRELOAD", "")
    return next((p for p in preload.split(":") if "blas" in p.lower()), "bundled")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (`ru_maxrss`: KB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e6 if sys.platform == "darwin" else rss * 1024 / 1e6
