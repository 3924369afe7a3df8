"""Where the model's memory goes: one copy of each weight, nothing a call does not read.

- the prompt side (CAM++, the speech tokenizer) is read on first use, and what it computes
  then equals an eagerly loaded one's;
- the text embedding is read from its file row by row (`MappedEmbedding`), the same rows as
  the table itself, in float and quantised dirs;
- the flow's and HiFT's weights, once their packed forms hold them (`pack_weights`), give
  back exactly the stored weights, and the model's output does not change;
- importing the package imports neither transformers nor numba, and glibc's mmap threshold
  is fixed (`cosyvoice2.malloc`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import cosyvoice2
from cosyvoice2 import model_dir
from cosyvoice2.errors import InputError
from cosyvoice2.mapped_embedding import MappedEmbedding

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> str:
    import os

    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# ------------------------------------------------------------------ the prompt side


def test_prompt_side_is_read_on_first_use(mlx_tiny_dir: Path, prompt_wav: Path) -> None:
    m = cosyvoice2.load(mlx_tiny_dir)
    assert isinstance(m._campplus, model_dir.Deferred) and not m._campplus.loaded
    assert isinstance(m._speech_tokenizer, model_dir.Deferred)
    assert not m._speech_tokenizer.loaded
    prompt = m.prompt_from_wav(prompt_wav, "hello")
    assert m._campplus.loaded and m._speech_tokenizer.loaded
    # the same weights as an eager load of the files
    for part in ("campplus", "speech_tokenizer"):
        stored = mx.load(str(mlx_tiny_dir / f"{part}.safetensors"))
        got = dict(tree_flatten(getattr(m, part).parameters()))
        assert set(got) == set(stored)
        assert all(mx.array_equal(got[k], stored[k]).item() for k in stored), part
    again = cosyvoice2.load(mlx_tiny_dir).prompt_from_wav(prompt_wav, "hello")
    assert mx.array_equal(prompt.embedding, again.embedding).item()
    assert mx.array_equal(prompt.llm_speech_token, again.llm_speech_token).item()


def test_prompt_side_that_does_not_match_fails_at_load(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(mlx_tiny_dir, d)
    weights = mx.load(str(d / "campplus.safetensors"))
    name = sorted(weights)[0]
    weights[name] = mx.zeros((3, *weights[name].shape))
    mx.save_safetensors(str(d / "campplus.safetensors"), weights)
    with pytest.raises(model_dir.ModelDirError, match="campplus.safetensors: does not match"):
        cosyvoice2.load(d)


# ------------------------------------------------------------------ the text embedding


def _table_file(tmp_path: Path, weights: dict[str, mx.array]) -> tuple[Path, dict]:
    f = tmp_path / "table.safetensors"
    mx.save_safetensors(str(f), weights)
    return f, model_dir.check_safetensors(f)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_mapped_rows_are_the_table_rows(tmp_path: Path, dtype: mx.Dtype) -> None:
    table = nn.Embedding(300, 64)
    table.set_dtype(dtype)
    f, header = _table_file(tmp_path, {"e.weight": table.weight})
    mapped = MappedEmbedding(f, header, "e")
    ids = mx.array([[0, 5, 299, 5, 17]])
    got = mapped(ids)
    assert got.dtype == dtype and got.shape == (1, 5, 64)
    assert mx.array_equal(got, table(ids)).item()
    assert mapped.parameters() == {}


@pytest.mark.parametrize("bits", [8, 4])
def test_mapped_quantised_rows_are_the_quantised_table_rows(tmp_path: Path, bits: int) -> None:
    table = nn.Embedding(256, 128)
    q = nn.QuantizedEmbedding.from_embedding(table, group_size=64, bits=bits)
    f, header = _table_file(
        tmp_path, {"e.weight": q.weight, "e.scales": q.scales, "e.biases": q.biases}
    )
    mapped = MappedEmbedding(f, header, "e", group_size=64, bits=bits)
    assert (mapped.num_embeddings, mapped.dims) == (256, 128)
    ids = mx.array([[3, 255, 0, 3]])
    assert mx.array_equal(mapped(ids), q(ids)).item()


def test_mapped_rows_out_of_range(tmp_path: Path) -> None:
    f, header = _table_file(tmp_path, {"e.weight": mx.zeros((10, 4))})
    mapped = MappedEmbedding(f, header, "e")
    for bad in ([[10]], [[-1]]):
        with pytest.raises(InputError, match=r"token ids must lie in \[0, 10\)"):
            mapped(mx.array(bad))


def test_loaded_model_maps_its_text_embedding(mlx_tiny_dir: Path) -> None:
    m = cosyvoice2.load(mlx_tiny_dir)
    assert isinstance(m.llm.llm.embed_tokens, MappedEmbedding)
    assert not any(k.startswith("llm.embed_tokens") for k, _ in tree_flatten(m.llm.parameters()))
    stored = mx.load(str(mlx_tiny_dir / "llm.safetensors"))["llm.embed_tokens.weight"]
    ids = mx.array([[1, 2, stored.shape[0] - 1]])
    assert mx.array_equal(m.llm.embed_text(ids), stored[ids]).item()
    # a precision chosen at load converts the table with the rest: it is not mapped
    m8 = cosyvoice2.load(mlx_tiny_dir, llm_bits=8)
    assert not isinstance(m8.llm.llm.embed_tokens, MappedEmbedding)


def test_text_embedding_that_does_not_match_fails_at_load(
    mlx_tiny_dir: Path, tmp_path: Path
) -> None:
    d = tmp_path / "m"
    shutil.copytree(mlx_tiny_dir, d)
    weights = mx.load(str(d / "llm.safetensors"))
    w = weights["llm.embed_tokens.weight"]
    weights["llm.embed_tokens.weight"] = w[:, : w.shape[1] // 2]
    mx.save_safetensors(str(d / "llm.safetensors"), weights)
    with pytest.raises(model_dir.ModelDirError, match="llm.safetensors: does not match"):
        cosyvoice2.load(d)


# ------------------------------------------------------------------ packed weights


def _synth(m: cosyvoice2.model.CosyVoice2) -> np.ndarray:
    rng = np.random.default_rng(0)
    from cosyvoice2.model import Prompt

    flow = m.config.flow
    speech = mx.array(rng.integers(0, flow.vocab_size, (1, 12)), dtype=mx.int32)
    prompt = Prompt(
        embedding=mx.array(rng.standard_normal((1, flow.spk_embed_dim)).astype(np.float32)),
        prompt_text=mx.zeros((1, 0), dtype=mx.int32),
        llm_speech_token=speech,
        flow_speech_token=speech,
        speech_feat=mx.array(rng.standard_normal((1, 24, 80)).astype(np.float32)),
    )
    tokens = iter(rng.integers(0, flow.vocab_size, 20).tolist())
    outs = list(m.token2wav_stream(tokens, prompt, False, 1.0, seed=0, n_timesteps=3))
    return np.concatenate([np.array(o["tts_speech"]).reshape(-1) for o in outs])


@pytest.mark.parametrize("route", ["extension", "plain", "composed"])
def test_packed_forms_hold_the_weights_exactly(mlx_tiny_dir: Path, route: str) -> None:
    from cosyvoice2 import backend

    if route == "extension" and backend.load_extension() is None:
        pytest.skip("cosyvoice2_kernels is not built")
    if route == "plain" and backend.load_row_kernels() is None:
        pytest.skip("numba is missing")
    m = cosyvoice2.load(mlx_tiny_dir, route=route)
    with backend.active(m.backend):
        packed = m.flow.pack_weights() + m.hift.pack_weights()  # again: nothing changes
    assert packed > 0
    out = _synth(m)
    for part, module in (("flow", m.flow), ("hift", m.hift)):
        stored = mx.load(str(mlx_tiny_dir / f"{part}.safetensors"))
        got = dict(tree_flatten(module.parameters()))
        bad = [k for k in stored if not mx.array_equal(got[k], stored[k]).item()]
        assert bad == [], f"{part}: {bad[:5]}"
    # the weights evaluated (and so copied) again: the output does not change
    assert np.array_equal(_synth(m), out)


def test_flow_cast_drops_the_packed_forms(mlx_tiny_dir: Path) -> None:
    from cosyvoice2 import backend

    if backend.load_extension() is None:
        pytest.skip("cosyvoice2_kernels is not built")
    m = cosyvoice2.load(mlx_tiny_dir, route="extension")
    held = [x for _, x in m.flow.named_modules() if getattr(x, "_panel_cache", None) is not None]
    assert held
    m.flow.set_dtype(mx.bfloat16)
    assert all(x._panel_cache is None for x in held)
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(m.flow.parameters()))


# ------------------------------------------------------------------ the process


def test_package_imports_neither_transformers_nor_numba(mlx_tiny_dir: Path) -> None:
    code = (
        "import sys, cosyvoice2, cosyvoice2.model, cosyvoice2.llm\n"
        f"m = cosyvoice2.load({str(mlx_tiny_dir)!r}, route='composed')\n"
        "print(sorted(n for n in ('transformers', 'torch', 'numba', 'mlx_lm.utils')"
        " if n in sys.modules))\n"
        "import mlx_lm\n"  # the whole package still works when asked for
        "print(callable(mlx_lm.load), 'mlx_lm.utils' in sys.modules)\n"
    )
    assert _python(code).splitlines() == ["[]", "True True"]


def test_malloc_threshold_is_fixed_unless_switched_off() -> None:
    code = "import cosyvoice2.malloc as m; print(m.tune())"
    assert _python(code) == ("True" if sys.platform.startswith("linux") else "False")
    assert _python(code, COSYVOICE2_MALLOC_TUNE="0") == "False"


# ------------------------------------------------------------------ the flow's dtype at load


def test_flow_dtype_at_load_is_the_cast_model(mlx_tiny_dir: Path) -> None:
    """`flow_dtype` casts the flow and HiFT as they are read: the same parameters, and the same
    audio, as a float32 load cast afterwards."""
    m = cosyvoice2.load(mlx_tiny_dir, flow_dtype="bfloat16")
    for part in ("flow", "hift"):
        got = dict(tree_flatten(getattr(m, part).parameters()))
        stored = mx.load(str(mlx_tiny_dir / f"{part}.safetensors"))
        bad = [
            k
            for k, v in stored.items()
            if got[k].dtype != mx.bfloat16 or not mx.array_equal(got[k], v.astype(mx.bfloat16))
        ]
        assert bad == [], f"{part}: {bad[:5]}"
    late = cosyvoice2.load(mlx_tiny_dir)
    late.flow.set_dtype(mx.bfloat16)
    late.hift.set_dtype(mx.bfloat16)
    assert np.array_equal(_synth(m), _synth(late))


@pytest.mark.parametrize("bad", ["bf16", "int8", 16])
def test_flow_dtype_refused(mlx_tiny_dir: Path, bad: object) -> None:
    from cosyvoice2.options import OptionError

    with pytest.raises(OptionError, match="flow_dtype must be one of float32, bfloat16, float16"):
        cosyvoice2.load(mlx_tiny_dir, flow_dtype=bad)
