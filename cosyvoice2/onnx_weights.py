"""Read the parameters of a `torch.onnx.export` file by module path, with the `onnx` protobuf reader.

The official `campplus.onnx` and `speech_tokenizer_v2.onnx` were written by the
legacy TorchScript exporter with constant folding. Folding renames many
parameters: a weight that passed through a cast, a transpose or a folded
batch norm becomes a new initializer with a generated name (`onnx::Conv_4423`,
`onnx::MatMul_2536`), and identical tensors are stored once and fanned out
through `Identity` nodes. What survives intact is the name of the node that
consumes the tensor: `/head/layer1/layer1.0/conv1/Conv` is the `Conv` of module
`head.layer1.0.conv1` (the exporter writes a `Sequential` child's scope as
`layer1/layer1.0`, which is collapsed here). This module therefore names every
parameter after its consumer:

| op                    | inputs read                 | names                                  |
|-----------------------|-----------------------------|----------------------------------------|
| `Conv`, `ConvTranspose` | 1, 2                      | `<path>.weight`, `<path>.bias`         |
| `MatMul`              | the constant operand (2-D)  | `<path>.weight`, **transposed**        |
| `Gemm`                | 1 (transposed unless transB), 2 | `<path>.weight`, `<path>.bias`     |
| `Add` after a `MatMul` in the same scope | the constant operand | `<path>.bias`               |
| `LayerNormalization`  | 1, 2                        | `<path>.weight`, `<path>.bias`         |
| `BatchNormalization`  | 1, 2, 3, 4                  | `<path>.weight`, `.bias`, `.running_mean`, `.running_var` |

`MatMul` weights are stored (in, out) in the file (the exporter transposes
`nn.Linear.weight`); they are returned transposed, (out, in), so that every
array has the layout of the PyTorch `state_dict` entry of the same name.
Convolution weights keep PyTorch's (out, in, *kernel) layout. A batch norm that
the exporter folded into the convolution before it does not appear: that
convolution then has a bias it did not have in PyTorch.

Constants that feed no parameter-consuming op (shapes, rotary tables, masks)
are left out, except initializers whose names were kept from the module
(`encoders.positional_embedding`), which are returned under those names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_GENERATED_PREFIX = "onnx::"


def module_path(node_name: str) -> str:
    """`/head/layer1/layer1.0/conv1/Conv` -> `head.layer1.0.conv1` (the op's own name dropped)."""
    parts = [p for p in node_name.strip("/").split("/") if p][:-1]
    out: list[str] = []
    for i, part in enumerate(parts):
        if i + 1 < len(parts) and parts[i + 1].startswith(part + "."):
            continue  # `layer1/layer1.0`: the Sequential's scope repeated in its child's name
        out.append(part)
    return ".".join(out)


class _Constants:
    """Every constant tensor of a graph by value name: initializers, `Constant` outputs, `Identity` aliases."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self._to_array = numpy_helper.to_array
        self.initializers = {t.name: t for t in graph.initializer}
        self._constant_nodes: dict[str, Any] = {}
        self._aliases: dict[str, str] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self._constant_nodes[node.output[0]] = attr.t
            elif node.op_type == "Identity" and node.input and node.output:
                self._aliases[node.output[0]] = node.input[0]
        self._cache: dict[str, np.ndarray] = {}

    def source(self, name: str) -> str:
        seen = set()
        while name in self._aliases and name not in seen:
            seen.add(name)
            name = self._aliases[name]
        return name

    def get(self, name: str) -> np.ndarray | None:
        name = self.source(name)
        if name in self._cache:
            return self._cache[name]
        tensor = self.initializers.get(name)
        if tensor is None:
            tensor = self._constant_nodes.get(name)
        if tensor is None:
            return None
        array = np.array(self._to_array(tensor))  # a writable copy, independent of the protobuf
        self._cache[name] = array
        return array


def _put(
    out: dict[str, np.ndarray], origin: dict[str, str], key: str, value: np.ndarray, node: str
) -> None:
    if key in out:
        if out[key].shape == value.shape and np.array_equal(out[key], value):
            return
        raise ValueError(
            f"ONNX parameter {key} is given twice with different values (nodes {origin[key]} and {node})"
        )
    out[key] = value
    origin[key] = node


def weights_from_graph(graph: Any) -> dict[str, np.ndarray]:
    """Module-path-named parameters of an ONNX `GraphProto` (see the module docstring for the rules)."""
    consts = _Constants(graph)
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    used: set[str] = set()
    matmul_scopes: set[str] = set()

    def take(node: Any, index: int) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            return None
        value = consts.get(node.input[index])
        if value is not None:
            used.add(consts.source(node.input[index]))
        return value

    nodes = [n for n in graph.node if n.name and n.op_type not in ("Constant", "Identity")]
    for node in nodes:
        path = module_path(node.name)
        if not path:
            continue
        op = node.op_type
        if op in ("Conv", "ConvTranspose", "LayerNormalization"):
            for index, suffix in ((1, "weight"), (2, "bias")):
                value = take(node, index)
                if value is not None:
                    _put(out, origin, f"{path}.{suffix}", value, node.name)
        elif op == "BatchNormalization":
            for index, suffix in enumerate(
                ("weight", "bias", "running_mean", "running_var"), start=1
            ):
                value = take(node, index)
                if value is not None:
                    _put(out, origin, f"{path}.{suffix}", value, node.name)
        elif op == "MatMul":
            for index in (1, 0):
                value = consts.get(node.input[index]) if index < len(node.input) else None
                if value is not None and value.ndim == 2:
                    take(node, index)
                    _put(out, origin, f"{path}.weight", np.ascontiguousarray(value.T), node.name)
                    matmul_scopes.add(path)
                    break
        elif op == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            weight = take(node, 1)
            if weight is not None:
                weight = weight if trans_b else np.ascontiguousarray(weight.T)
                _put(out, origin, f"{path}.weight", weight, node.name)
            bias = take(node, 2)
            if bias is not None:
                _put(out, origin, f"{path}.bias", bias, node.name)
    for node in nodes:  # Linear biases: the Add that follows a MatMul of the same scope
        if node.op_type != "Add":
            continue
        path = module_path(node.name)
        if path not in matmul_scopes:
            continue
        for index in (0, 1):
            value = consts.get(node.input[index]) if index < len(node.input) else None
            if value is not None and value.size > 1:
                take(node, index)
                _put(out, origin, f"{path}.bias", value, node.name)
                break
    for name in consts.initializers:  # parameters that kept their module names and feed no op above
        if name in used or name.startswith(_GENERATED_PREFIX) or "." not in name or "/" in name:
            continue
        value = consts.get(name)
        if value is not None and value.dtype.kind == "f" and name not in out:
            out[name] = value
    return dict(sorted(out.items()))


def read_onnx_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Load an ONNX file (protobuf only, no runtime) and return its parameters by module path."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise ValueError(
            f"cannot read ONNX file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    return weights_from_graph(model.graph)
