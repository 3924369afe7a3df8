"""The MLX model dir (`cosyvoice2.model_dir`): what the converter writes is what the
loader reads, every broken dir gives one clear line, and loading never needs the converter.

Only the first test converts (and so needs the official code); the rest use the MLX-only
tiny dir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import cosyvoice2
from cosyvoice2 import model_dir
from cosyvoice2.errors import CosyVoiceError
from cosyvoice2.model import CosyVoice2
from cosyvoice2.model_dir import ModelDirError

REPO = Path(__file__).resolve().parents[1]
# Modules only the converter needs: loading a converted dir must not import them.
CONVERTER_ONLY = (
    "cosyvoice2.convert",
    "cosyvoice2.checkpoint",
    "cosyvoice2.torch_pickle",
    "cosyvoice2.onnx_weights",
    "cosyvoice2.official_yaml",
)


def _broken_copy(src: Path, dst: Path, drop: str | None = None) -> Path:
    """`src` with its files linked (cheap), `config.json` copied, and the entry `drop` left out."""
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name == drop:
            continue
        if entry.name == model_dir.CONFIG_FILE:
            (dst / entry.name).write_bytes(entry.read_bytes())
        else:
            (dst / entry.name).symlink_to(entry.resolve())
    return dst


def _edit_config(d: Path, **changes: object) -> None:
    cfg = d / model_dir.CONFIG_FILE
    meta = json.loads(cfg.read_text(encoding="utf-8"))
    meta.update(changes)
    cfg.write_text(json.dumps(meta), encoding="utf-8")


def _load_error(d: Path) -> str:
    with pytest.raises(ModelDirError) as info:
        cosyvoice2.load(d)
    message = str(info.value)
    assert isinstance(info.value, CosyVoiceError)
    assert "\n" not in message, message
    return message


def test_the_converter_writes_the_format_the_loader_reads(tiny_mlx_dir: Path) -> None:
    names = {p.name for p in tiny_mlx_dir.iterdir()}
    assert names >= {model_dir.CONFIG_FILE, model_dir.TOKENIZER_DIR, *model_dir.WEIGHT_FILES}
    assert model_dir.WEIGHT_FILES == tuple(model_dir.weights_file(c) for c in model_dir.COMPONENTS)
    meta = json.loads((tiny_mlx_dir / model_dir.CONFIG_FILE).read_text(encoding="utf-8"))
    assert meta["model_type"] == model_dir.MODEL_TYPE
    assert meta["format_version"] == model_dir.FORMAT_VERSION
    assert all(isinstance(meta[s], dict) for s in model_dir.CONFIG_SECTIONS)
    assert model_dir.llm_precision_name(meta["llm_precision"]) == "fp32"


@pytest.mark.parametrize("component", model_dir.COMPONENTS)
def test_missing_component_file(component: str, mlx_tiny_dir: Path, tmp_path: Path) -> None:
    name = model_dir.weights_file(component)
    d = _broken_copy(mlx_tiny_dir, tmp_path / "m", drop=name)
    assert _load_error(d) == f"{d}: missing {name}"


def test_missing_tokenizer(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    d = _broken_copy(mlx_tiny_dir, tmp_path / "m", drop=model_dir.TOKENIZER_DIR)
    message = _load_error(d)
    assert message.startswith(f"{d / model_dir.TOKENIZER_DIR}: cannot load the tokenizer ("), (
        message
    )


def test_missing_dir_and_missing_config(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    assert _load_error(tmp_path / "nope") == f"model dir not found: {tmp_path / 'nope'}"
    d = _broken_copy(mlx_tiny_dir, tmp_path / "m", drop=model_dir.CONFIG_FILE)
    assert _load_error(d) == f"{d}: no config.json (not an MLX model dir; convert it first)"


@pytest.mark.parametrize("version", [0, 2, None, "1"])
def test_wrong_format_version(version: object, mlx_tiny_dir: Path, tmp_path: Path) -> None:
    d = _broken_copy(mlx_tiny_dir, tmp_path / "m")
    _edit_config(d, format_version=version)
    assert _load_error(d) == (
        f"{d / 'config.json'}: format version {version!r}, this package reads {model_dir.FORMAT_VERSION}"
    )


def test_other_model_type(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    d = _broken_copy(mlx_tiny_dir, tmp_path / "m")
    _edit_config(d, model_type="whisper")
    assert _load_error(d) == f"{d / 'config.json'}: model_type is 'whisper', not 'cosyvoice2'"


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"model_type": "cosyvoice2", ', "not valid JSON (Expecting property name"),
        (b"\xff\xfe{}", "not valid JSON ("),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_corrupt_config(
    text: str | bytes, expected: str, mlx_tiny_dir: Path, tmp_path: Path
) -> None:
    d = _broken_copy(mlx_tiny_dir, tmp_path / "m")
    cfg = d / model_dir.CONFIG_FILE
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert _load_error(d).startswith(f"{cfg}: {expected}")


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"flow": 5}, "flow missing or not an object"),
        ({"campplus": None}, "campplus missing or not an object"),
        ({"llm_precision": "fp32"}, "llm_precision missing or not an object"),
        ({"flow": {"encoder": [1, 2]}}, "`flow.encoder` is list, not an object"),
    ],
)
def test_bad_config_sections(
    changes: dict, expected: str, mlx_tiny_dir: Path, tmp_path: Path
) -> None:
    d = _broken_copy(mlx_tiny_dir, tmp_path / "m")
    _edit_config(d, **changes)
    assert _load_error(d) == f"{d / 'config.json'}: {expected}"


@pytest.mark.parametrize("component", ["llm", "campplus", "precision"])
def test_bad_settings(component: str, mlx_tiny_dir: Path, tmp_path: Path) -> None:
    d = _broken_copy(mlx_tiny_dir, tmp_path / "m")
    meta = json.loads((d / model_dir.CONFIG_FILE).read_text(encoding="utf-8"))
    if component == "llm":
        _edit_config(d, llm={**meta["llm"], "qwen": {**meta["llm"]["qwen"], "hidden_size": "x"}})
    elif component == "campplus":
        _edit_config(d, campplus={**meta["campplus"], "num_layers": "x"})
    else:
        _edit_config(d, llm_precision={"dtype": "float32", "quantization": {"bits": 8}})
    name = "campplus" if component == "campplus" else "llm"
    message = _load_error(d)
    assert message.startswith(f"{d / 'config.json'}: bad {name} settings ("), message


def test_weights_that_do_not_match_the_config(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    d = _broken_copy(mlx_tiny_dir, tmp_path / "m")
    meta = json.loads((d / model_dir.CONFIG_FILE).read_text(encoding="utf-8"))
    _edit_config(d, hift={**meta["hift"], "base_channels": meta["hift"]["base_channels"] * 2})
    message = _load_error(d)
    assert message.startswith(f"{d / 'hift.safetensors'}: does not match config.json ("), message


def test_truncated_weights(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    d = _broken_copy(mlx_tiny_dir, tmp_path / "m", drop="flow.safetensors")
    data = (mlx_tiny_dir / "flow.safetensors").read_bytes()
    (d / "flow.safetensors").write_bytes(data[: len(data) // 3])
    assert _load_error(d).startswith(f"{d / 'flow.safetensors'}: cannot read (")


def test_load_keeps_its_options(mlx_tiny_dir: Path) -> None:
    """The keyword options of `cosyvoice2.load` reach `CosyVoice2.load`."""
    m = cosyvoice2.load(mlx_tiny_dir, llm_dtype="bfloat16", llm_bits=8, llm_kernels="off")
    assert isinstance(m, CosyVoice2)
    assert m.meta["llm_precision"] == {
        "dtype": "bfloat16",
        "quantization": {"group_size": 64, "bits": 8},
    }
    assert m.meta["llm_kernels"] == "off"
    assert model_dir.llm_precision_name(m.meta["llm_precision"]) == "8bit"
    with pytest.raises(ValueError, match="llm_kernels must be"):
        cosyvoice2.load(mlx_tiny_dir, llm_kernels="on")


def test_loading_does_not_import_the_converter(mlx_tiny_dir: Path) -> None:
    """`import cosyvoice2; cosyvoice2.load(dir)` in a fresh interpreter imports none of the
    converter's modules."""
    code = (
        "import sys\n"
        "import cosyvoice2\n"
        "m = cosyvoice2.load(sys.argv[1])\n"
        "assert 'cosyvoice2.model_dir' in sys.modules and m.llm is not None\n"
        f"print(sorted(set({CONVERTER_ONLY!r}) & set(sys.modules)))\n"
    )
    args = [sys.executable, "-c", code, str(mlx_tiny_dir)]
    out = subprocess.check_output(args, cwd=REPO, text=True, timeout=600)  # stderr is pytest's
    assert out.strip().splitlines()[-1] == "[]", out
