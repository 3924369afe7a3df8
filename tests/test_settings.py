"""The environment switches: one parser (`cosyvoice2/settings.py`), one table in
docs/ARCHITECTURE.md, and no other reader of a `COSYVOICE2_*` variable in the
runtime or test-support packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cosyvoice2 import backend, branches, row_kernels, settings, streaming
from cosyvoice2_testing import synthetic

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
SCANNED = ("cosyvoice2", "cosyvoice2_testing")


def doc_section() -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("## Environment switches\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_doc_table_is_the_module_table() -> None:
    section = doc_section()
    assert settings.markdown_table() in section, (
        "docs/ARCHITECTURE.md's table differs from cosyvoice2.settings.markdown_table()"
    )
    rows = [line for line in section.splitlines() if line.startswith("| `COSYVOICE2_")]
    assert [r.split("`")[1] for r in rows] == list(settings.SWITCHES)


def _env_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of each `os.environ.get/[]`/`os.getenv` of a literal `COSYVOICE2_*` name."""
    found = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and node.args:
            f = ast.unparse(node.func)
            if f in ("os.environ.get", "os.getenv", "environ.get", "getenv", "os.environ.pop"):
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in (
            "os.environ",
            "environ",
        ):
            key = node.slice
        if key is None:
            continue
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            if key.value.startswith("COSYVOICE2_"):
                found.append((node.lineno, key.value))
        else:  # a key held in a variable may be a switch's name: only settings.py reads those
            found.append((node.lineno, ast.unparse(key)))
    return found


def test_only_settings_reads_the_switches() -> None:
    bad = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "cosyvoice2" / "settings.py":
                continue
            source = path.read_text(encoding="utf-8")
            if "environ" not in source and "getenv" not in source:
                continue
            for line, name in _env_reads(ast.parse(source)):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not bad, "read these through cosyvoice2.settings:\n" + "\n".join(bad)


def test_scan_finds_a_direct_read() -> None:
    source = (
        "import os\n"
        'x = os.environ.get("COSYVOICE2_KERNELS", "1")\n'
        'y = os.getenv("COSYVOICE2_CACHE")\n'
        'z = os.environ["HOME"] + os.environ[ENV]\n'
    )
    assert _env_reads(ast.parse(source)) == [
        (2, "COSYVOICE2_KERNELS"),
        (3, "COSYVOICE2_CACHE"),
        (4, "ENV"),
    ]


@pytest.mark.parametrize("value", ["1", "on", "TRUE", "Yes", " true "])
def test_flag_true_spellings(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("COSYVOICE2_STREAM_LLM_THREAD", value)
    assert settings.flag("COSYVOICE2_STREAM_LLM_THREAD") is True


@pytest.mark.parametrize("value", ["0", "off", "FALSE", "No", " 0 "])
def test_flag_false_spellings(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("COSYVOICE2_KERNELS", value)
    assert settings.flag("COSYVOICE2_KERNELS") is False


@pytest.mark.parametrize("value", ["2", "maybe", "enabled", "0.0"])
def test_flag_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("COSYVOICE2_FLOW_BRANCH_THREADS", value)
    with pytest.raises(ValueError, match=f"COSYVOICE2_FLOW_BRANCH_THREADS={value!r}"):
        settings.flag("COSYVOICE2_FLOW_BRANCH_THREADS")


def test_defaults_when_unset_or_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = {
        "COSYVOICE2_KERNELS": True,
        "COSYVOICE2_FLOW_KERNELS": True,
        "COSYVOICE2_FLOW_BRANCH_THREADS": True,
        "COSYVOICE2_STREAM_LLM_THREAD": False,
    }
    for empty in (None, "", "  "):
        for name, default in expected.items():
            if empty is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, empty)
            assert settings.flag(name) is default, (name, empty)
    monkeypatch.delenv("COSYVOICE2_FLOW_THREADS", raising=False)
    assert settings.integer("COSYVOICE2_FLOW_THREADS") is None
    monkeypatch.setenv("HOME", "/nowhere")
    monkeypatch.setenv("COSYVOICE2_CACHE", "")
    assert settings.path("COSYVOICE2_CACHE") == Path("/nowhere/.cache/cosyvoice2-mlx")


def test_integer_and_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COSYVOICE2_FLOW_THREADS", "3")
    assert settings.integer("COSYVOICE2_FLOW_THREADS") == 3
    assert row_kernels.num_threads() == 3
    monkeypatch.setenv("COSYVOICE2_FLOW_THREADS", "three")
    with pytest.raises(ValueError, match="COSYVOICE2_FLOW_THREADS='three'"):
        settings.integer("COSYVOICE2_FLOW_THREADS")
    monkeypatch.setenv("COSYVOICE2_CACHE", str(tmp_path))
    assert settings.path("COSYVOICE2_CACHE") == tmp_path
    assert synthetic.cache_root() == tmp_path


def test_unknown_or_mistyped_switch() -> None:
    with pytest.raises(KeyError, match="COSYVOICE2_NOPE"):
        settings.flag("COSYVOICE2_NOPE")
    with pytest.raises(TypeError, match="COSYVOICE2_CACHE"):
        settings.flag("COSYVOICE2_CACHE")


def test_backend_switches_are_read_when_a_backend_is_chosen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`backend.choose` (at load) follows the environment as it is then; a backend already
    chosen keeps its choice (nothing reads the switches per call)."""
    before = backend.choose()
    monkeypatch.setenv("COSYVOICE2_FLOW_BRANCH_THREADS", "off")
    assert not backend.choose().branch_threads
    with backend.active(before):
        assert branches.enabled() == before.branch_threads
    with backend.active(backend.choose()):
        assert not branches.enabled()
        assert not streaming.overlap_enabled()
    monkeypatch.setenv("COSYVOICE2_KERNELS", "no")
    assert backend.choose().extension is None
    monkeypatch.setenv("COSYVOICE2_FLOW_KERNELS", "0")
    assert backend.choose().route == "composed"
    monkeypatch.setenv("COSYVOICE2_KERNELS", "bogus")
    with pytest.raises(ValueError, match="COSYVOICE2_KERNELS='bogus'"):
        backend.choose()
