"""Read the official `cosyvoice2.yaml` as data, never as code.

The official code loads this file with HyperPyYAML, whose `!new:`, `!name:` and
`!apply:` tags import and call arbitrary Python objects. A downloaded model dir
is untrusted input, so this reader keeps every tag as inert data:

- `!new:pkg.Class {kwargs}` / `!name:pkg.func {kwargs}` / `!apply:pkg.func [args]`
  become `Tagged(kind, target, value)`;
- `!ref <key>` and `!ref <a> * <b>` are resolved against the top-level keys,
  arithmetic through a tiny evaluator that accepts only numbers and + - * /.

Nothing is imported or called. The converter and the parity tests read
hyperparameters from the result.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Tagged:
    """A HyperPyYAML object tag kept as data: `kind` is new/name/apply."""

    kind: str
    target: str
    value: Any

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a `!new:`/`!name:` tag (empty when it had none)."""
        return dict(self.value) if isinstance(self.value, dict) else {}


@dataclass(frozen=True)
class _Ref:
    expr: str


class _Loader(yaml.SafeLoader):
    """SafeLoader that understands HyperPyYAML tags without executing them."""


def _construct_tagged(loader: _Loader, tag_suffix: str, node: yaml.Node) -> Tagged:
    kind, _, target = tag_suffix.partition(":")
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node) or None
    return Tagged(kind, target, value)


def _construct_ref(loader: _Loader, node: yaml.Node) -> _Ref:
    return _Ref(str(loader.construct_scalar(node)))


for _kind in ("new", "name", "apply"):
    _Loader.add_multi_constructor(
        f"!{_kind}:", lambda ld, sfx, nd, k=_kind: _construct_tagged(ld, f"{k}:{sfx}", nd)
    )
_Loader.add_constructor("!ref", _construct_ref)

# PyYAML follows YAML 1.1, where `1e-06` (no dot) is a string; HyperPyYAML reads it as a float.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_REF_RE = re.compile(r"<([^<>]+)>")
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _eval_arith(expr: str) -> float | int:
    def ev(n: ast.AST) -> float | int:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        raise ValueError(f"unsupported expression in !ref: {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def _resolve(obj: Any, top: dict[str, Any], depth: int = 0) -> Any:
    if depth > 50:
        raise ValueError("!ref nesting too deep (cycle?)")
    if isinstance(obj, _Ref):
        names = _REF_RE.findall(obj.expr)
        if len(names) == 1 and obj.expr.strip() == f"<{names[0]}>":
            key = names[0]
            if key not in top:
                raise KeyError(f"!ref to unknown key <{key}>")
            return _resolve(top[key], top, depth + 1)
        values = {}
        for key in names:
            if key not in top:
                raise KeyError(f"!ref to unknown key <{key}>")
            values[key] = _resolve(top[key], top, depth + 1)
        expr = _REF_RE.sub(lambda m: repr(values[m.group(1)]), obj.expr)
        return _eval_arith(expr)
    if isinstance(obj, dict):
        return {k: _resolve(v, top, depth) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, top, depth) for v in obj]
    if isinstance(obj, Tagged):
        return Tagged(obj.kind, obj.target, _resolve(obj.value, top, depth))
    return obj


def load_official_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse `cosyvoice2.yaml` into plain data with `!ref`s resolved.

    Raises `ValueError` naming the file when it is not valid YAML.
    """
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - safe subclass
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not a valid cosyvoice2.yaml ({e.__class__.__name__})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a valid cosyvoice2.yaml (top level is not a mapping)")
    raw.update(overrides or {})
    return _resolve(raw, raw)
