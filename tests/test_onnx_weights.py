"""`cosyvoice2.onnx_weights`: parameters of `torch.onnx.export` files named by module path.

A hand-built graph checks each rule without torch; the synthetic exports (made
the way the real files were) check that the reader recovers every PyTorch
parameter under its `state_dict` name, through the generated initializer names.
The export comparisons count the parameters that are missing, extra or unequal,
and are power checks (`tests.power`): with `MatMul` weights left in the file's
(in, out) layout, or a `Sequential`'s scope not collapsed, the count must reach
10.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cosyvoice2 import onnx_weights  # noqa: E402
from cosyvoice2.onnx_weights import module_path, read_onnx_weights, weights_from_graph  # noqa: E402
from tests.power import assert_power, wrapped  # noqa: E402


def test_module_path():
    assert module_path("/head/conv1/Conv") == "head.conv1"
    assert module_path("/head/layer1/layer1.0/conv1/Conv") == "head.layer1.0.conv1"
    assert (
        module_path("/head/layer2/layer2.1/shortcut/shortcut.0/Conv") == "head.layer2.1.shortcut.0"
    )
    assert module_path("/blocks.3/mlp/mlp.2/MatMul") == "blocks.3.mlp.2"
    assert module_path("/blocks.0/attn_ln/LayerNormalization") == "blocks.0.attn_ln"
    assert module_path("/quantizer/project_in/Add_1") == "quantizer.project_in"
    assert module_path("/Mul_1") == ""


def _init(rng: np.random.Generator, name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _handmade_graph() -> tuple[onnx.GraphProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    inits = [
        _init(rng, "onnx::Conv_7", 4, 2, 3),
        _init(rng, "onnx::Conv_8", 4),
        _init(rng, "onnx::MatMul_9", 4, 6),  # (in, out)
        _init(rng, "blocks.0.mlp.0.bias", 6),
        _init(rng, "onnx::LayerNormalization_10", 6),  # shared by two layer norms through Identity
        _init(rng, "onnx::LayerNormalization_11", 6),
        _init(rng, "bn.running_mean", 6),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 6).astype(np.float32), "bn.running_var"),
        _init(rng, "onnx::Gemm_12", 3, 6),  # (out, in) with transB=1
        _init(rng, "fc.bias", 3),
        _init(rng, "encoders.positional_embedding", 10, 6),
        numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "onnx::Reshape_13"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "onnx::Add_14"),
    ]
    ones = numpy_helper.from_array(np.ones(6, np.float32), "c_scale")
    zeros = numpy_helper.from_array(np.zeros(6, np.float32), "c_bias")
    nodes = [
        helper.make_node(
            "Constant", [], ["/bn/Constant_output_0"], name="/bn/Constant", value=ones
        ),
        helper.make_node(
            "Constant", [], ["/bn/Constant_1_output_0"], name="/bn/Constant_1", value=zeros
        ),
        helper.make_node(
            "Identity", ["onnx::LayerNormalization_10"], ["blocks.1.ln.weight"], name="Identity_0"
        ),
        helper.make_node(
            "Conv",
            ["x", "onnx::Conv_7", "onnx::Conv_8"],
            ["c"],
            name="/head/layer1/layer1.0/conv1/Conv",
        ),
        helper.make_node(
            "MatMul", ["c", "onnx::MatMul_9"], ["m"], name="/blocks.0/mlp/mlp.0/MatMul"
        ),
        helper.make_node(
            "Add", ["blocks.0.mlp.0.bias", "m"], ["a"], name="/blocks.0/mlp/mlp.0/Add"
        ),
        helper.make_node(
            "Add", ["a", "onnx::Add_14"], ["r"], name="/blocks.0/Add"
        ),  # not a parameter
        helper.make_node(
            "LayerNormalization",
            ["r", "onnx::LayerNormalization_10", "onnx::LayerNormalization_11"],
            ["l0"],
            name="/blocks.0/ln/LayerNormalization",
        ),
        helper.make_node(
            "LayerNormalization",
            ["l0", "blocks.1.ln.weight", "onnx::LayerNormalization_11"],
            ["l1"],
            name="/blocks.1/ln/LayerNormalization",
        ),
        helper.make_node(
            "BatchNormalization",
            [
                "l1",
                "/bn/Constant_output_0",
                "/bn/Constant_1_output_0",
                "bn.running_mean",
                "bn.running_var",
            ],
            ["b"],
            name="/bn/BatchNormalization",
        ),
        helper.make_node(
            "Gemm", ["b", "onnx::Gemm_12", "fc.bias"], ["g"], name="/fc/Gemm", transB=1
        ),
        helper.make_node("Reshape", ["g", "onnx::Reshape_13"], ["y"], name="/Reshape"),
        helper.make_node("Slice", ["encoders.positional_embedding"], ["p"], name="/Slice"),
    ]
    graph = helper.make_graph(
        nodes,
        "handmade",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    a = {t.name: numpy_helper.to_array(t) for t in inits}
    expected = {
        "head.layer1.0.conv1.weight": a["onnx::Conv_7"],
        "head.layer1.0.conv1.bias": a["onnx::Conv_8"],
        "blocks.0.mlp.0.weight": a["onnx::MatMul_9"].T,
        "blocks.0.mlp.0.bias": a["blocks.0.mlp.0.bias"],
        "blocks.0.ln.weight": a["onnx::LayerNormalization_10"],
        "blocks.0.ln.bias": a["onnx::LayerNormalization_11"],
        "blocks.1.ln.weight": a["onnx::LayerNormalization_10"],
        "blocks.1.ln.bias": a["onnx::LayerNormalization_11"],
        "bn.weight": np.ones(6, np.float32),
        "bn.bias": np.zeros(6, np.float32),
        "bn.running_mean": a["bn.running_mean"],
        "bn.running_var": a["bn.running_var"],
        "fc.weight": a["onnx::Gemm_12"],
        "fc.bias": a["fc.bias"],
        "encoders.positional_embedding": a["encoders.positional_embedding"],
    }
    return graph, expected


def test_handmade_graph(tmp_path: Path):
    graph, expected = _handmade_graph()
    path = tmp_path / "handmade.onnx"
    onnx.save(helper.make_model(graph), str(path))
    got = read_onnx_weights(path)
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].shape == v.shape and np.array_equal(got[k], v), k
        assert got[k].flags.writeable


def test_conflicting_parameters_are_refused():
    graph, _ = _handmade_graph()
    rng = np.random.default_rng(1)
    graph.initializer.append(_init(rng, "onnx::Conv_99", 4, 2, 3))
    graph.node.append(
        helper.make_node(
            "Conv", ["x", "onnx::Conv_99"], ["c2"], name="/head/layer1/layer1.0/conv1/Conv_1"
        )
    )
    with pytest.raises(ValueError, match="head.layer1.0.conv1.weight is given twice"):
        weights_from_graph(graph)


def test_bad_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        read_onnx_weights(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe not a protobuf \x00\x01")
    with pytest.raises(ValueError, match="cannot read ONNX file"):
        read_onnx_weights(bad)


# ---------------------------------------------------------------------------
# Synthetic exports (need torch, s3tokenizer and speakerlab to make them)


@pytest.fixture(scope="module")
def onnx_dir() -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("speakerlab.models.campplus.DTDNN")
    from cosyvoice2_testing.shims import install_shims

    install_shims()  # s3tokenizer imports torchaudio
    pytest.importorskip("s3tokenizer")
    from cosyvoice2_testing.onnx_exports import cached_onnx_files

    return cached_onnx_files("tiny", seed=0)


def _matmul_untransposed(original):
    def put(out, origin, key, value, node):
        if node.endswith("/MatMul"):
            value = np.ascontiguousarray(value.T)  # back to the file's (in, out) layout
        return original(out, origin, key, value, node)

    return put


def matmul_layout_bug():
    """`MatMul` weights returned as stored, (in, out), not as `nn.Linear.weight` (out, in)."""
    return wrapped(onnx_weights, "_put", _matmul_untransposed)


def _scope_kept(original):
    def path(node_name: str) -> str:
        return ".".join([p for p in node_name.strip("/").split("/") if p][:-1])

    return path


def sequential_scope_bug():
    """`/head/layer1/layer1.0/conv1/Conv` read as `head.layer1.layer1.0.conv1` (scope not collapsed)."""
    return wrapped(onnx_weights, "module_path", _scope_kept)


def _differences(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> int:
    """Parameters missing, extra, or of another shape or value."""
    count = len(set(got) ^ set(expected))
    for k in set(got) & set(expected):
        count += not (got[k].shape == expected[k].shape and np.array_equal(got[k], expected[k]))
    return count


def _initializer_names(path: Path) -> set[str]:
    return {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def test_tokenizer_export_names_and_weights(onnx_dir: Path):
    """The export has the real file's naming scheme, and every tensor comes back under its PyTorch name."""
    from cosyvoice2_testing.onnx_exports import cached_torch_state

    path = onnx_dir / "speech_tokenizer_v2.onnx"
    names = _initializer_names(path)
    # As in the released file (see s3tokenizer's onnx2torch): conv and matmul weights have generated
    # names, the FSMN kernels and the quantizer's bias keep module names.
    assert any(n.startswith("onnx::Conv_") for n in names)
    assert any(n.startswith("onnx::MatMul_") for n in names)
    assert "blocks.0.attn.fsmn_block.weight" in names and "quantizer.project_in.bias" in names
    assert "conv1.weight" not in names

    state = cached_torch_state("speech_tokenizer", "tiny", seed=0)
    expected = {}
    for k, v in state.items():
        k = k.removeprefix("encoder.").replace(
            "quantizer._codebook.project_down", "quantizer.project_in"
        )
        expected[k] = v
    assert_power(
        "ONNX reader vs state dict, S3 tokenizer (parameters wrong)",
        lambda: _differences(read_onnx_weights(path), expected),
        0,
        matmul_layout_bug(),
        "MatMul weights left (in, out)",
    )


def test_campplus_export_names_and_weights(onnx_dir: Path):
    """Unfolded tensors come back exactly under their PyTorch names; folded convs carry their batch norm."""
    from cosyvoice2_testing.onnx_exports import cached_torch_state

    path = onnx_dir / "campplus.onnx"
    names = _initializer_names(path)
    assert any(n.startswith("onnx::Conv_") for n in names)
    assert "xvector.block1.tdnnd1.nonlinear1.batchnorm.running_var" in names
    assert "xvector.transit1.linear.weight" in names and "head.conv1.weight" not in names

    state = cached_torch_state("campplus", "tiny", seed=0)

    def problems(got: dict[str, np.ndarray]) -> int:
        """Tensors under their PyTorch names that differ, and names that PyTorch does not have
        (other than the biases of PyTorch's convs and the affine-free batch norm's constants)."""
        count = 0
        for k in got:
            if k not in state:
                folded_bias = k.endswith(".bias") and f"{k[:-5]}.weight" in state
                affine_free = k.startswith("xvector.dense.nonlinear.batchnorm.")
                count += not (folded_bias or affine_free)
            elif not (
                k.endswith(".weight")
                and got[k].ndim > 1
                and f"{k[:-7]}.bias" in got
                and f"{k[:-7]}.bias" not in state
            ):  # (a conv with a batch norm folded in is checked below)
                count += not np.array_equal(got[k], state[k])
        return count

    got = read_onnx_weights(path)
    assert len([k for k in got if k in state]) > 300
    # head.conv1 + head.bn1 folded by the exporter
    scale = state["head.bn1.weight"] / np.sqrt(state["head.bn1.running_var"] + 1e-5)
    folded_w = state["head.conv1.weight"] * scale[:, None, None, None]
    folded_b = state["head.bn1.bias"] - state["head.bn1.running_mean"] * scale
    assert np.abs(got["head.conv1.weight"] - folded_w).max() <= 1e-6 * np.abs(folded_w).max()
    assert np.abs(got["head.conv1.bias"] - folded_b).max() <= 1e-6 * np.abs(folded_b).max()
    assert_power(
        "ONNX reader vs state dict, CAM++ (parameters wrong)",
        lambda: problems(read_onnx_weights(path)),
        0,
        sequential_scope_bug(),
        "Sequential scope not collapsed",
    )
