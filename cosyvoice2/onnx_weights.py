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

The file is untrusted. It is read as bytes (at most `MAX_ONNX_BYTES`, checked
against its size before reading) and parsed as a protobuf here, so nothing
else is ever opened: a tensor whose data lives in an external file is refused,
never followed. Before any tensor becomes an array, its declared size (dims x
element size) is checked against the data the file really holds for it, so a
forged shape cannot make the reader allocate more than the file's size. Every
refusal is an `OnnxFileError` (a `CheckpointError`) of one line naming the file
and the tensor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cosyvoice2.errors import CheckpointError

_GENERATED_PREFIX = "onnx::"

MAX_ONNX_BYTES = 1 << 30
"""The largest ONNX file read (1 GiB): the released `speech_tokenizer_v2.onnx` is about 500 MB,
`campplus.onnx` about 28 MB; the whole file is held in memory while it is parsed."""

_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# TensorProto.DataType -> (name, bytes per element in raw_data, the typed field used without
# raw_data, values of that field per element); the types numpy_helper turns into arrays.
_DTYPES: dict[int, tuple[str, int, str, int]] = {
    1: ("float32", 4, "float_data", 1),
    2: ("uint8", 1, "int32_data", 1),
    3: ("int8", 1, "int32_data", 1),
    4: ("uint16", 2, "int32_data", 1),
    5: ("int16", 2, "int32_data", 1),
    6: ("int32", 4, "int32_data", 1),
    7: ("int64", 8, "int64_data", 1),
    9: ("bool", 1, "int32_data", 1),
    10: ("float16", 2, "int32_data", 1),
    11: ("float64", 8, "double_data", 1),
    12: ("uint32", 4, "uint64_data", 1),
    13: ("uint64", 8, "uint64_data", 1),
    14: ("complex64", 8, "float_data", 2),
    15: ("complex128", 16, "double_data", 2),
    16: ("bfloat16", 2, "int32_data", 1),
}


class OnnxFileError(CheckpointError, ValueError):
    """An ONNX file or graph that cannot be read safely: unparsable, truncated, too large, with
    external data, or with a tensor whose declared size does not match its data. Also a
    `ValueError`, which this reader raised for bad files before it had its own error."""


class OnnxFileMissing(CheckpointError, FileNotFoundError):
    """The ONNX file does not exist (also a `FileNotFoundError`)."""


def _short(name: str, limit: int = 120) -> str:
    """A tensor name for a one-line message: repr (no raw newlines), cut to `limit` characters."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _external_location(tensor: Any) -> str | None:
    """Where a tensor says its data lives outside the file, or None when it is in the file."""
    if tensor.data_location != _EXTERNAL and not len(tensor.external_data):
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return "?"


def _refuse_external(graph: Any, source: str) -> None:
    """Refuse a graph (and its subgraphs) holding any tensor whose data is stored outside the file."""

    def check(tensor: Any, what: str) -> None:
        location = _external_location(tensor)
        if location is not None:
            raise OnnxFileError(
                f"{source}: {what} {_short(tensor.name)} keeps its data in an external file"
                f" ({_short(location)}); external data is refused, never read"
            )

    for tensor in graph.initializer:
        check(tensor, "initializer")
    for sparse in graph.sparse_initializer:
        check(sparse.values, "sparse initializer")
        check(sparse.indices, "sparse initializer")
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                check(attr.t, f"tensor of node {_short(node.name)}")
            for tensor in attr.tensors:
                check(tensor, f"tensor of node {_short(node.name)}")
            if attr.HasField("sparse_tensor"):
                check(attr.sparse_tensor.values, f"tensor of node {_short(node.name)}")
            if attr.HasField("g"):
                _refuse_external(attr.g, source)
            for sub in attr.graphs:
                _refuse_external(sub, source)


def _check_names(graph: Any, source: str) -> None:
    """Refuse a graph whose names are not text: protobuf hands a string field holding invalid
    UTF-8 back as bytes, which the name rules below cannot read."""
    for tensor in graph.initializer:
        if not isinstance(tensor.name, str):
            raise OnnxFileError(f"{source}: initializer name {_short(tensor.name)} is not UTF-8")
    for node in graph.node:
        names = [node.name, node.op_type, *node.input, *node.output]
        names += [a.name for a in node.attribute]
        names += [a.t.name for a in node.attribute if a.HasField("t")]
        bad = next((n for n in names if not isinstance(n, str)), None)
        if bad is not None:
            raise OnnxFileError(
                f"{source}: node {_short(node.name)} has a name that is not UTF-8 ({_short(bad)})"
            )


def _check_tensor(tensor: Any, what: str, source: str) -> None:
    """Refuse a tensor whose declared size (dims x element size) is not the data it holds.

    Checked before `numpy_helper.to_array` sees it, so an array is only ever made from
    data that is really in the file, at its real size.
    """
    name = _short(tensor.name)
    location = _external_location(tensor)
    if location is not None:
        raise OnnxFileError(
            f"{source}: {what} {name} keeps its data in an external file ({_short(location)});"
            " external data is refused, never read"
        )
    if tensor.HasField("segment"):
        raise OnnxFileError(f"{source}: {what} {name} is stored in segments, which are not read")
    spec = _DTYPES.get(tensor.data_type)
    if spec is None:
        raise OnnxFileError(f"{source}: {what} {name} has unsupported data type {tensor.data_type}")
    dtype, itemsize, field, per = spec
    dims = list(tensor.dims)
    shown = f"{dims[:8]}{'...' if len(dims) > 8 else ''}"
    if any(d < 0 for d in dims):
        raise OnnxFileError(f"{source}: {what} {name} has negative dims {shown}")
    if math.prod(max(d, 1) for d in dims) * itemsize > MAX_ONNX_BYTES:  # e.g. (0, 2**62)
        raise OnnxFileError(
            f"{source}: {what} {name} declares dims {shown}, beyond any ONNX file this reads"
        )
    count = math.prod(dims)  # Python ints: no overflow, however large the dims
    if tensor.HasField("raw_data"):
        want, have, unit = count * itemsize, len(tensor.raw_data), "bytes"
    else:
        want, have, unit = count * per, len(getattr(tensor, field)), f"{field} values"
    if want != have:
        raise OnnxFileError(
            f"{source}: {what} {name} declares dims {shown} of {dtype} ({want} {unit})"
            f" but holds {have}: truncated or corrupt"
        )


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

    def __init__(self, graph: Any, source: str) -> None:
        from onnx import numpy_helper

        _check_names(graph, source)
        _refuse_external(graph, source)
        self._to_array = numpy_helper.to_array
        self.initializers = {t.name: t for t in graph.initializer}
        for tensor in graph.initializer:
            _check_tensor(tensor, "initializer", source)
        self._constant_nodes: dict[str, Any] = {}
        self._aliases: dict[str, str] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        _check_tensor(attr.t, f"value of Constant {_short(node.name)}", source)
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
        raise OnnxFileError(
            f"ONNX parameter {key} is given twice with different values"
            f" (nodes {_short(origin[key])} and {_short(node)})"
        )
    out[key] = value
    origin[key] = node


def weights_from_graph(graph: Any, source: str = "ONNX graph") -> dict[str, np.ndarray]:
    """Module-path-named parameters of an ONNX `GraphProto` (see the module docstring for the rules).

    Every tensor read is checked first (`OnnxFileError` otherwise); `source` names the graph
    in the messages.
    """
    consts = _Constants(graph, source)
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


def read_onnx_weights(path: str | Path, max_bytes: int = MAX_ONNX_BYTES) -> dict[str, np.ndarray]:
    """Load an ONNX file (protobuf only, no runtime) and return its parameters by module path.

    The file is read whole, if it is at most `max_bytes` long, and parsed here: no other file
    is opened (external data is refused). Bad files raise `OnnxFileError` (missing:
    `OnnxFileMissing`), each a one-line `CheckpointError` naming the file.
    """
    from onnx import ModelProto

    path = Path(path)
    if not path.is_file():
        raise OnnxFileMissing(f"ONNX file not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise OnnxFileError(
            f"cannot read ONNX file {path}: {size} bytes, over the {max_bytes}-byte limit"
        )
    with path.open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since it was measured
        raise OnnxFileError(f"cannot read ONNX file {path}: over the {max_bytes}-byte limit")
    if not data:
        raise OnnxFileError(f"cannot read ONNX file {path}: the file is empty")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or a nesting limit
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxFileError(
            f"cannot read ONNX file {path}: not a valid ONNX protobuf ({_short(first, 200)})"
        ) from None
    del data
    if not model.HasField("graph") or not len(model.opset_import):
        raise OnnxFileError(
            f"cannot read ONNX file {path}: no graph or no opset (truncated, or not an ONNX model)"
        )
    return weights_from_graph(model.graph, source=str(path))
