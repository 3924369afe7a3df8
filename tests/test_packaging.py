"""pyproject.toml declares what each part imports, nothing less and, for the runtime, nothing more.

Every third-party module a source file imports (also inside functions) must come from a
distribution its part declares: the runtime (`cosyvoice2/`) from `dependencies` (or the
`serve`/`eval` extras for the server and `--stt-model`), `eval/` from the `eval` extra,
`reports/` from `report`. Every runtime dependency must be imported by the runtime.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
OURS = {
    "cosyvoice2",
    "cosyvoice2_testing",
    "cosyvoice2_kernels",
    "bench",
    "eval",
    "reports",
    "sharding",
    "tests",
}
# Imported only where the module says it is optional, and not installable from an index
# under that name: the C++ extension (kernels/), UniSpeech's speaker model (eval, opt-in).
NOT_FROM_AN_INDEX = {"cosyvoice2_kernels", "models"}
# Optional, guarded by an ImportError fallback where imported: Chinese script conversion
# (eval), and httpx/httpx2, huggingface_hub's HTTP library from its 1.0 on (cosyvoice2.hub).
GUARDED = {"zhconv", "httpx", "httpx2"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared(*groups: str) -> set[str]:
    out = set()
    for g in groups:
        reqs = (
            PYPROJECT["project"]["dependencies"]
            if g == "runtime"
            else PYPROJECT["project"]["optional-dependencies"][g]
        )
        out |= {_name(r) for r in reqs}
    return out


def imports(folder: str) -> dict[str, set[str]]:
    """Top-level module -> the files of `folder` importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                found.setdefault(n.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def third_party(found: dict[str, set[str]]) -> dict[str, set[str]]:
    std = set(sys.stdlib_module_names) | {"__future__"}
    return {
        m: f
        for m, f in found.items()
        if m not in std and m not in OURS | NOT_FROM_AN_INDEX | GUARDED
    }


def distributions(module: str) -> set[str]:
    """The installed distributions that provide `module` (normalised names)."""
    dists = metadata.packages_distributions().get(module, [])
    return {d.lower().replace("_", "-") for d in dists}


def undeclared(folder: str, allowed: set[str]) -> dict[str, list[str]]:
    bad = {}
    for module, files in third_party(imports(folder)).items():
        dists = distributions(module)
        assert dists, f"{module} (imported by {sorted(files)}) is not installed here"
        if not dists & allowed:
            bad[module] = sorted(files)
    return bad


def test_the_runtime_imports_only_what_it_declares() -> None:
    allowed = declared("runtime", "serve", "eval") | {"mlx-cpu", "starlette", "python-multipart"}
    # fastapi brings starlette; python-multipart is imported as `multipart` (serve extra)
    bad = undeclared("cosyvoice2", allowed)
    assert not bad, f"cosyvoice2/ imports undeclared modules: {bad}"


def test_every_runtime_dependency_is_imported_by_the_runtime() -> None:
    used: set[str] = set()
    for module in third_party(imports("cosyvoice2")):
        used |= distributions(module)
    unused = {d for d in declared("runtime") if d not in used and d not in ("mlx",)}
    # `mlx` is declared for macOS and `mlx[cpu]` for Linux: the same import
    assert not unused, f"declared but never imported by cosyvoice2/: {sorted(unused)}"


def test_eval_and_reports_import_only_their_extras() -> None:
    assert not undeclared("eval", declared("runtime", "eval")), "eval/ imports beyond [eval]"
    assert not undeclared("reports", declared("runtime", "report")), "reports/ beyond [report]"
    assert not undeclared("sharding", declared("runtime")), "sharding/ beyond the runtime's"


def test_the_scan_can_fail(tmp_path: Path, monkeypatch) -> None:
    """An import of an undeclared distribution is found (here: pytest, a test-only one)."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n    import pytest\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert undeclared("pkg", declared("runtime")) == {"pytest": ["pkg/m.py"]}


def test_one_python_range() -> None:
    """pyproject's range, nox's sessions and ruff's target agree."""
    noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    main = re.search(r'^PYTHON = "(3\.\d+)"', noxfile, re.M).group(1)
    others = re.findall(r'"(3\.\d+)"', re.search(r"^PYTHONS = \[(.*)\]", noxfile, re.M).group(1))
    tested = sorted({main, *others}, key=lambda v: int(v.split(".")[1]))
    spec = PYPROJECT["project"]["requires-python"]
    lo, hi = re.fullmatch(r">=3\.(\d+),<3\.(\d+)", spec).groups()
    assert tested == [f"3.{m}" for m in range(int(lo), int(hi))], (spec, tested)
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py3{lo}"
