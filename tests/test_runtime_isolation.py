"""The runtime package `cosyvoice2` does not depend on the test-support package `cosyvoice2_testing`.

Two checks: no source file under `cosyvoice2/` imports it (also inside functions, which
importing alone would not reveal), and importing every `cosyvoice2` module in a fresh
interpreter leaves it out of `sys.modules`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "cosyvoice2"
TESTING = "cosyvoice2_testing"


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement in `path` (absolute and relative forms)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_runtime_source_imports_the_testing_package() -> None:
    sources = sorted(RUNTIME.rglob("*.py"))
    assert len(sources) > 20, "the runtime sources were not found"
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            m for m in imported_modules(p) if m.split(".")[0] == TESTING
        )
        for p in sources
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"runtime modules import {TESTING}: {offenders}"


def test_imported_modules_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    """The scan above can fail: it finds a lazy import of the testing package."""
    src = tmp_path / "m.py"
    src.write_text(f"def f():\n    from {TESTING}.synthetic import cache_root\n")
    assert f"{TESTING}.synthetic" in imported_modules(src)


def test_importing_every_runtime_module_leaves_the_testing_package_out() -> None:
    code = f"""
import importlib, pkgutil, sys
import cosyvoice2
names = [m.name for m in pkgutil.walk_packages(cosyvoice2.__path__, "cosyvoice2.")]
for name in names:
    importlib.import_module(name)
print(len(names))
loaded = sorted(m for m in sys.modules if m.split(".")[0] == {TESTING!r})
assert not loaded, loaded
"""
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) > 20, run.stdout
