"""S3 tokenizer v2 in MLX against onnxruntime and the `s3tokenizer` PyTorch model, same synthetic weights.

Tokens must be identical, position by position, on real speech: Debian's
Asterisk prompts (8 kHz, resampled to 16 kHz as a prompt is) and espeak-ng
output (from `tests.speech`: all clips, or a skip naming the package). Random
weights make tokens sensitive (a token changes when one of its 8 projected
values crosses the rounding boundary of tanh(.) * 0.999 = +-0.5), so the test
also compares the continuous values before rounding against onnxruntime's
(within 1e-4) and, on a mismatch, reports how close the disagreeing values were
to a boundary. From audio, our Whisper log-mel and tokenizer must give the
tokens of the official path (`s3tokenizer.log_mel_spectrogram`, as
`whisper.log_mel_spectrogram`, then onnxruntime).

Power checks (`tests.power`), one bug in our side each: the FSMN memory's
padding off by one (15, 15) -> (16, 14) must change at least 10 tokens; the
RoPE base 10% high must move the projected values 10x past 1e-4 (a 1% error
moves them by only 5e-4 with these 2-layer random weights, and flips 1 token in
607); the Whisper mel filters' upper edge 40 Hz low must change at least 10
tokens of the audio path. References are checked first: Whisper log-mels in the
range of real ones, and tokens spread over many codes. The tokenizer uses MLX's
ops directly (no compiled kernels), so it runs on the default and the composed
route.
"""

from __future__ import annotations

import contextlib
import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.frontend import features
from cosyvoice2.frontend.speech_tokenizer import (
    SpeechTokenizerConfig,
    SpeechTokenizerV2,
    speech_tokens,
)
from tests.power import assert_power, patched
from tests.speech import speech_clips
from tests.test_features import mel_filter_edge_bug

PROJECTED_TOL = 1e-4
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
    from cosyvoice2_testing.shims import install_shims

    install_shims()  # s3tokenizer imports torchaudio
    pytest.importorskip("s3tokenizer")


class Reference:
    """onnxruntime on the export (tokens and the projected values before rounding) and the PyTorch model."""

    def __init__(self, size: str):
        import onnx
        import onnxruntime as ort
        import torch
        from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2

        from cosyvoice2_testing.onnx_exports import cached_onnx_files, cached_torch_state

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
    return speech_clips(CLIPS, ESPEAK_TEXT, 16000, tmp_path_factory.mktemp("espeak"))


@pytest.fixture(scope="module")
def mels(prompts) -> dict[str, np.ndarray]:
    """Our Whisper log-mels of the prompts (1, 128, T), checked to look like real ones."""
    out = {}
    for name, speech in prompts.items():
        mel = np.array(features.whisper_log_mel(speech))[None]
        # (log10(power) + 4) / 4 floored 8 decades below the maximum: speech at a normal
        # level peaks at about 1-2 and spans the full 2 units (measured 1.36-1.47, span 2.0)
        assert 0.5 <= mel.max() <= 2.5 and mel.max() - mel.min() >= 1.5, (
            f"{name}: log-mel {mel.min():.3g}..{mel.max():.3g}"
        )
        out[name] = mel
    return out


def fsmn_padding_bug(model: SpeechTokenizerV2):
    """Every FSMN memory padded (16, 14) instead of (15, 15): its taps one frame off."""

    @contextlib.contextmanager
    def bug():
        with contextlib.ExitStack() as stack:
            for block in model.blocks:
                stack.enter_context(patched(block.attn, "left", block.attn.left + 1))
                stack.enter_context(patched(block.attn, "right", block.attn.right - 1))
            yield

    return bug()


def rope_base_bug(model: SpeechTokenizerV2, factor: float = 1.1):
    return patched(
        model,
        "config",
        dataclasses.replace(model.config, rope_theta=model.config.rope_theta * factor),
    )


def assert_realistic_tokens(tokens: np.ndarray, what: str) -> None:
    """Random weights could map everything to a few codes; speech must use many."""
    n, distinct = tokens.size, len(np.unique(tokens))
    assert distinct >= 0.3 * n, f"{what}: only {distinct} distinct codes in {n} tokens"


def _boundary_margin(projected: np.ndarray) -> np.ndarray:
    """Distance of tanh(p) * 0.999 from the nearest rounding boundary (+-0.5), per token (min over 8 values)."""
    h = np.tanh(projected.astype(np.float64)) * 0.999
    return np.abs(np.abs(h) - 0.5).min(axis=-1)


def _mismatches(
    model: SpeechTokenizerV2, ref: Reference, mel: np.ndarray, lengths: np.ndarray, what: str
) -> int:
    """Token positions where ours differs from onnxruntime's or the PyTorch model's (these two
    must agree); the projected values are checked against onnxruntime's (within 1e-4)."""
    tokens_onnx, projected_onnx = ref.onnx(mel, lengths)
    tokens_torch = ref.pytorch(mel, lengths)
    hidden, out_len = model.encode(mx.array(mel), mx.array(lengths))
    tokens = np.array(model.quantizer(hidden))
    count = 0
    for b, n in enumerate(np.array(out_len)):
        ours, onnx_t, torch_t = tokens[b, :n], tokens_onnx[b, :n], tokens_torch[b, :n]
        assert np.array_equal(onnx_t, torch_t), f"{what}[{b}]: the two references disagree"
        assert_realistic_tokens(onnx_t, f"{what}[{b}]")
        bad = np.flatnonzero(ours != onnx_t)
        if bad.size:
            margins = _boundary_margin(projected_onnx[b, bad])
            print(
                f"{what}[{b}]: {n - bad.size}/{n} tokens identical; mismatches at {bad.tolist()} "
                f"(mlx {ours[bad].tolist()}, onnx {onnx_t[bad].tolist()}; "
                f"distance to a rounding boundary {margins.tolist()})"
            )
        count += int(bad.size)
    return count


def _projected_err(
    model: SpeechTokenizerV2, ref: Reference, mel: np.ndarray, lengths: np.ndarray
) -> float:
    _, projected_onnx = ref.onnx(mel, lengths)
    hidden, out_len = model.encode(mx.array(mel), mx.array(lengths))
    projected = np.array(model.quantizer.project_in(hidden))
    return max(
        float(np.abs(projected[b, :n] - projected_onnx[b, :n]).max())
        for b, n in enumerate(np.array(out_len))
    )


def _compare(
    model: SpeechTokenizerV2, ref: Reference, mel: np.ndarray, lengths: np.ndarray, what: str
) -> int:
    """Assert identical tokens and projected values within 1e-4; the number of tokens compared."""
    err = _projected_err(model, ref, mel, lengths)
    assert err <= PROJECTED_TOL, f"{what}: projected values differ from onnxruntime by {err:.3g}"
    count = _mismatches(model, ref, mel, lengths, what)
    assert count == 0, f"{what}: {count} tokens differ (see the output above)"
    _, out_len = model.encode(mx.array(mel), mx.array(lengths))
    return int(np.array(out_len).sum())


def test_config_from_onnx(tiny):
    model, _ = tiny
    assert model.config == SpeechTokenizerConfig(n_state=128, n_head=2, n_layer=2)
    assert model.config.codebook_size == 6561


@pytest.mark.parametrize("route", ["extension", "composed"], indirect=True)
def test_tokens_identical_on_real_speech(tiny, mels, prompts, route):
    model, ref = tiny
    for name, mel in mels.items():
        n = _compare(model, ref, mel, np.array([mel.shape[-1]]), name)
        assert n == (mel.shape[-1] + 3) // 4 and n > 20
        tokens = np.array(speech_tokens(model, prompts[name]))
        assert tokens.shape == (1, n) and tokens.min() >= 0 and tokens.max() < 6561

    def mismatches() -> int:
        return sum(_mismatches(model, ref, m, np.array([m.shape[-1]]), n) for n, m in mels.items())

    def projected_err() -> float:
        return max(_projected_err(model, ref, m, np.array([m.shape[-1]])) for m in mels.values())

    assert_power(
        f"S3 tokens, real speech ({route})",
        mismatches,
        0,
        fsmn_padding_bug(model),
        "FSMN padding (16, 14)",
    )
    assert_power(
        f"S3 projected values, real speech ({route})",
        projected_err,
        PROJECTED_TOL,
        rope_base_bug(model),
        "RoPE base 10% high",
    )


def test_tokens_identical_with_padding(tiny, mels):
    """A batch of two prompts of different lengths, zero-padded: the masks must hide the padding."""
    model, ref = tiny
    pair = [m[0] for m in list(mels.values())[:2]]
    assert pair[0].shape[1] != pair[1].shape[1]
    t = max(m.shape[1] for m in pair)
    batch = np.stack([np.pad(m, ((0, 0), (0, t - m.shape[1]))) for m in pair])
    lengths = np.array([m.shape[1] for m in pair])
    _compare(model, ref, batch, lengths, "padded batch")
    # and the padded result equals each prompt alone
    codes, _ = model(mx.array(batch), mx.array(lengths))
    for b, m in enumerate(pair):
        alone, n = model(mx.array(m[None]))
        assert np.array_equal(np.array(codes)[b, : int(n[0])], np.array(alone)[0])
    assert_power(
        "S3 tokens, padded batch",
        lambda: _mismatches(model, ref, batch, lengths, "padded batch"),
        0,
        fsmn_padding_bug(model),
        "FSMN padding (16, 14)",
    )


def test_tokens_from_audio_match_the_official_path(tiny, prompts):
    """The official `_extract_speech_token` path (Whisper log-mel from `s3tokenizer`, then the
    ONNX tokenizer) against ours (`speech_tokens`: our log-mel, our tokenizer), from the same audio."""
    pytest.importorskip("torch")
    import s3tokenizer
    import torch

    model, ref = tiny
    want = {}
    for name, speech in prompts.items():
        mel = s3tokenizer.log_mel_spectrogram(torch.from_numpy(speech), n_mels=128).numpy()[None]
        want[name] = ref.onnx(mel, np.array([mel.shape[-1]]))[0]
        assert_realistic_tokens(want[name], name)

    def mismatches() -> int:
        count = 0
        for name, speech in prompts.items():
            ours = np.array(speech_tokens(model, speech))
            assert ours.shape == want[name].shape
            count += int((ours != want[name]).sum())
        return count

    assert_power(
        "S3 tokens from audio (log-mel + tokenizer)",
        mismatches,
        0,
        mel_filter_edge_bug(),
        "Whisper mel filters' upper edge 7960 Hz",
    )


def test_sanitize_accepts_s3tokenizer_state_dict(tiny, mels):
    from cosyvoice2_testing.onnx_exports import cached_torch_state

    model, _ = tiny
    other = SpeechTokenizerV2.from_weights(cached_torch_state("speech_tokenizer", "tiny", seed=0))
    mel = mx.array(next(iter(mels.values())))
    assert np.array_equal(np.array(other(mel)[0]), np.array(model(mel)[0]))


@pytest.mark.full
def test_full_size_tokens_identical_on_real_speech(mels):
    """The real tokenizer's shapes (1280 wide, 20 heads, 6 blocks): about 0.5 GB export, minutes."""
    _need_exports()
    ref = Reference("full")
    model = SpeechTokenizerV2.from_onnx(str(ref.path))
    assert model.config == SpeechTokenizerConfig()
    for name, mel in mels.items():
        _compare(model, ref, mel, np.array([mel.shape[-1]]), name)
    name, mel = next(iter(mels.items()))
    assert_power(
        "S3 tokens, real speech (full size)",
        lambda: _mismatches(model, ref, mel, np.array([mel.shape[-1]]), name),
        0,
        fsmn_padding_bug(model),
        "FSMN padding (16, 14)",
    )
