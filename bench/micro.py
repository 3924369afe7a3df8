"""Component micro-benchmarks: `tests/benchmarks/` run by pytest-benchmark with proper rounds.

In the tests session they run once each as plain tests (`--benchmark-disable`);
here they run with calibrated rounds and their JSON (pytest-benchmark's own
format) is stored beside the run's results file as `<run id>.micro.json`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import ROOT

BENCH_DIR = ROOT / "tests" / "benchmarks"


def run_micro(
    out_dir: Path,
    run_id: str | None,
    extra: list[str] | None = None,
    bench_dir: Path = BENCH_DIR,
) -> dict[str, Any]:
    """Run the micro-benchmarks in `bench_dir`; return where their JSON went and how pytest ended.

    `path` in the result is the JSON's file name, relative to `out_dir` (beside the run).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{run_id or time.strftime('%Y%m%d-%H%M%S')}.micro.json"
    json_path = out_dir / name
    if not bench_dir.is_dir() or not any(bench_dir.glob("test_*.py")):
        return {"path": None, "returncode": 0, "note": f"no micro-benchmarks in {bench_dir}"}
    env = dict(os.environ)
    if sys.platform.startswith("linux") and "blas" not in env.get("LD_PRELOAD", "").lower():
        from cosyvoice2 import blas

        found, _, _ = blas.find()  # the same BLAS as the bench's MLX workers
        if found is not None:
            env["LD_PRELOAD"] = ":".join(x for x in (str(found), env.get("LD_PRELOAD")) if x)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(bench_dir),
        "-m",
        "not full",
        "--benchmark-only",
        "--benchmark-min-rounds=5",
        "--benchmark-warmup=on",
        "--benchmark-warmup-iterations=1",
        f"--benchmark-json={json_path}",
        "-q",
        *(extra or []),
    ]
    print("micro-benchmarks:", " ".join(cmd[2:]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    return {
        "path": name if json_path.exists() else None,
        "returncode": proc.returncode,
        "command": cmd[1:],
    }
