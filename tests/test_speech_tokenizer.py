"""S3 tokenizer v2 in MLX against onnxruntime and the `s3tokenizer` PyTorch model, same synthetic weights.

Tokens must be identical, position by position, on real speech: Debian's
Asterisk prompts (8 kHz, resampled to 16 kHz as a prompt is) and espeak-ng
output. Random weights make tokens sensitive (a token changes when one of its
8 projected values crosses the rounding boundary of tanh(.) * 0.999 = +-0.5),
so the test also reports the continuous values before rounding against
onnxruntime's (within 1e-4) and, on a mismatch, how close the disagreeing
values were to a boundary.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.frontend import audio, features
from cosyvoice2.frontend.speech_tokenizer import (
    SpeechTokenizerConfig,
    SpeechTokenizerV2,
    speech_tokens,
)

ASTERISK = Path("/usr/share/asterisk/sounds/en")
CLIPS = [
    "vm-forward-multiple.wav",
    "auth-incorrect.wav",
    "confbridge-invalid.wav",
    "vm-login.wav",
    "agent-newlocation.wav",
]
ESPEAK_TEXT = "Speech tokens at twenty five hertz, from a tokenizer with six thousand five hundred and sixty one codes."


def _need_exports() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("speakerlab.models.campplus.DTDNN")
    from cosyvoice2.testing.shims import install_shims

    install_shims()  # s3tokenizer imports torchaudio
    pytest.importorskip("s3tokenizer")


class Reference:
    """onnxruntime on the export (tokens and the projected values before rounding) and the PyTorch model."""

    def __init__(self, size: str):
        import onnx
        import onnxruntime as ort
        import torch
        from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2

        from cosyvoice2.testing.onnx_exports import cached_onnx_files, cached_torch_state

        self.path = cached_onnx_files(size, seed=0) / "speech_tokenizer_v2.onnx"
        model = onnx.load(str(self.path))
        node = next(n for n in model.graph.node if n.name == "/quantizer/project_in/Add")
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        state = cached_torch_state("speech_tokenizer", size, seed=0)
        n_state = state["encoder.conv1.weight"].shape[0]
        n_layer = len({k.split(".")[2] for k in state if k.startswith("encoder.blocks.")})
        config = ModelConfig(
            n_mels=128, n_audio_state=n_state, n_audio_head=n_state // 64, n_audio_layer=n_layer
        )
        self.torch_model = S3TokenizerV2("speech_tokenizer_v2_25hz", config).eval()
        self.torch_model.load_state_dict(
            {k: torch.from_numpy(v) for k, v in state.items()}, strict=True
        )
        self.torch = torch

    def onnx(self, mel: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens, projected = self.session.run(
            None, {"feats": mel, "feats_length": lengths.astype(np.int32)}
        )
        return tokens, projected

    def pytorch(self, mel: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            codes, _ = self.torch_model.quantize(
                self.torch.from_numpy(mel), self.torch.from_numpy(lengths.astype(np.int64))
            )
        return codes.numpy()


@pytest.fixture(scope="module")
def tiny() -> tuple[SpeechTokenizerV2, Reference]:
    _need_exports()
    ref = Reference("tiny")
    return SpeechTokenizerV2.from_onnx(str(ref.path)), ref


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict[str, np.ndarray]:
    out = {
        name: audio.load_prompt_wav(ASTERISK / name, 16000)
        for name in CLIPS
        if (ASTERISK / name).exists()
    }
    exe = shutil.which("espeak-ng")
    if exe:
        path = tmp_path_factory.mktemp("espeak") / "espeak.wav"
        subprocess.run(
            [exe, "-v", "en-us", "-w", str(path), ESPEAK_TEXT], check=True, capture_output=True
        )
        out["espeak"] = audio.load_prompt_wav(path, 16000)
    if not out:
        pytest.skip("no real speech: install asterisk-core-sounds-en-wav or espeak-ng")
    return out


def _boundary_margin(projected: np.ndarray) -> np.ndarray:
    """Distance of tanh(p) * 0.999 from the nearest rounding boundary (+-0.5), per token (min over 8 values)."""
    h = np.tanh(projected.astype(np.float64)) * 0.999
    return np.abs(np.abs(h) - 0.5).min(axis=-1)


def _compare(
    model: SpeechTokenizerV2, ref: Reference, mel: np.ndarray, lengths: np.ndarray, what: str
) -> int:
    tokens_onnx, projected_onnx = ref.onnx(mel, lengths)
    tokens_torch = ref.pytorch(mel, lengths)
    hidden, out_len = model.encode(mx.array(mel), mx.array(lengths))
    projected = np.array(model.quantizer.project_in(hidden))
    tokens = np.array(model.quantizer(hidden))
    n_total = 0
    for b, n in enumerate(np.array(out_len)):
        n_total += int(n)
        err = float(np.abs(projected[b, :n] - projected_onnx[b, :n]).max())
        assert err <= 1e-4, f"{what}[{b}]: projected values differ from onnxruntime by {err:.3g}"
        ours, onnx_t, torch_t = tokens[b, :n], tokens_onnx[b, :n], tokens_torch[b, :n]
        bad = np.flatnonzero((ours != onnx_t) | (ours != torch_t))
        if bad.size:
            margins = _boundary_margin(projected_onnx[b, bad])
            pytest.fail(
                f"{what}[{b}]: {n - bad.size}/{n} tokens identical; mismatches at {bad.tolist()} "
                f"(mlx {ours[bad].tolist()}, onnx {onnx_t[bad].tolist()}, torch {torch_t[bad].tolist()}; "
                f"distance to a rounding boundary {margins.tolist()})"
            )
    return n_total


def test_config_from_onnx(tiny):
    model, _ = tiny
    assert model.config == SpeechTokenizerConfig(n_state=128, n_head=2, n_layer=2)
    assert model.config.codebook_size == 6561


def test_tokens_identical_on_real_speech(tiny, prompts):
    model, ref = tiny
    for name, speech in prompts.items():
        mel = np.array(features.whisper_log_mel(speech))[None]
        n = _compare(model, ref, mel, np.array([mel.shape[-1]]), name)
        assert n == (mel.shape[-1] + 3) // 4 and n > 20
        tokens = np.array(speech_tokens(model, speech))
        assert tokens.shape == (1, n) and tokens.min() >= 0 and tokens.max() < 6561


def test_tokens_identical_with_padding(tiny, prompts):
    """A batch of two prompts of different lengths, zero-padded: the masks must hide the padding."""
    model, ref = tiny
    mels = [np.array(features.whisper_log_mel(s)) for s in list(prompts.values())[:2]]
    if len(mels) < 2:
        mels.append(mels[0][:, : mels[0].shape[1] // 2])
    t = max(m.shape[1] for m in mels)
    batch = np.stack([np.pad(m, ((0, 0), (0, t - m.shape[1]))) for m in mels])
    lengths = np.array([m.shape[1] for m in mels])
    _compare(model, ref, batch, lengths, "padded batch")
    # and the padded result equals each prompt alone
    codes, _ = model(mx.array(batch), mx.array(lengths))
    for b, m in enumerate(mels):
        alone, n = model(mx.array(m[None]))
        assert np.array_equal(np.array(codes)[b, : int(n[0])], np.array(alone)[0])


def test_sanitize_accepts_s3tokenizer_state_dict(tiny, prompts):
    from cosyvoice2.testing.onnx_exports import cached_torch_state

    model, _ = tiny
    other = SpeechTokenizerV2.from_weights(cached_torch_state("speech_tokenizer", "tiny", seed=0))
    mel = mx.array(np.array(features.whisper_log_mel(next(iter(prompts.values()))))[None])
    assert np.array_equal(np.array(other(mel)[0]), np.array(model(mel)[0]))


@pytest.mark.full
def test_full_size_tokens_identical_on_real_speech(prompts):
    """The real tokenizer's shapes (1280 wide, 20 heads, 6 blocks): about 0.5 GB export, minutes."""
    _need_exports()
    ref = Reference("full")
    model = SpeechTokenizerV2.from_onnx(str(ref.path))
    assert model.config == SpeechTokenizerConfig()
    for name, speech in prompts.items():
        mel = np.array(features.whisper_log_mel(speech))[None]
        _compare(model, ref, mel, np.array([mel.shape[-1]]), name)
