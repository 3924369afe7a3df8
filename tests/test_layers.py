"""The layer rule of docs/ARCHITECTURE.md: no module of `cosyvoice2/` imports one of a higher layer.

Every `import` and `from ... import` in the package (at any depth, inside functions
too) is resolved to a `cosyvoice2` module and checked against `LAYERS`. A module
missing from `LAYERS` fails too, so a new module gets its layer when it is added.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cosyvoice2"

LAYERS: dict[str, int] = {
    **dict.fromkeys(
        [
            "errors",
            "files",
            "config",
            "official_yaml",
            "ops",
            "sampling",
            "checkpoint",
            "torch_pickle",
        ],
        0,
    ),
    "onnx_weights": 0,
    "settings": 0,
    "blas": 0,
    "backend": 0,
    "row_kernels": 0,
    "malloc": 0,
    "lm_models": 0,
    "branches": 0,
    "packed": 0,
    **dict.fromkeys(["kernel_layers", "flow", "hift", "llm", "frontend"], 1),
    "speakers": 1,
    "decoding": 1,
    "bistream": 1,
    "hift_source": 1,
    "stft": 1,
    "mapped_embedding": 1,
    "transformer_lm": 1,
    "streaming": 2,
    "options": 2,
    "engine": 3,
    "model_dir": 4,
    "mlx_audio_plus": 4,
    "convert": 4,
    "hub": 4,
    "model": 5,
    **dict.fromkeys(["__init__", "cli", "__main__"], 6),
    **dict.fromkeys(["server", "server_core"], 6),
}


def layer_of(module: str) -> int:
    """The layer of `cosyvoice2.X[.Y]` (a subpackage's modules share its layer)."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    if head not in LAYERS:
        raise KeyError(f"{module}: no layer in LAYERS (tests/test_layers.py, docs/ARCHITECTURE.md)")
    return LAYERS[head]


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1 and parts[:-1] != ["cosyvoice2"]:
        parts = parts[:-1]
    return ".".join(parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """The `cosyvoice2` modules a module's source imports (`from cosyvoice2 import x` -> cosyvoice2.x)."""
    out: set[str] = set()
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "cosyvoice2")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(
                    base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
                )
            else:
                target = node.module or ""
            if target.split(".")[0] != "cosyvoice2":
                continue
            if target == "cosyvoice2":
                out.update(f"cosyvoice2.{a.name}" for a in node.names)
            else:
                out.add(target)
    return out


def violations(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root.parent)
        mine = layer_of(module)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for target in sorted(imported(tree, module, path.name == "__init__.py")):
            theirs = layer_of(target)
            if theirs > mine:
                found.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    return found


def test_no_module_imports_a_higher_layer() -> None:
    assert violations() == []


def test_the_check_finds_an_upward_import(tmp_path: Path) -> None:
    """A planted `from cosyvoice2.model import CosyVoice2` in a layer-1 module is found."""
    pkg = tmp_path / "cosyvoice2"
    (pkg / "flow").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from cosyvoice2.model import load\n")
    (pkg / "model.py").write_text("from cosyvoice2 import engine\n")
    (pkg / "engine.py").write_text("")
    (pkg / "flow" / "__init__.py").write_text("")
    (pkg / "flow" / "decoder.py").write_text(
        "def f():\n    from cosyvoice2.model import CosyVoice2\n"
    )
    assert violations(pkg) == [
        "cosyvoice2.flow.decoder (layer 1) imports cosyvoice2.model (layer 5)"
    ]


def test_a_module_without_a_layer_fails() -> None:
    with pytest.raises(KeyError, match="no layer"):
        layer_of("cosyvoice2.newthing")
