"""S3 tokenizer v1 in MLX (`SpeechTokenizerV1`) against the `s3tokenizer` package's PyTorch
`S3Tokenizer` (the twin of the first generation's `speech_tokenizer_v1.onnx`), same random weights.

On real speech (Debian's Asterisk prompts and espeak-ng, `tests.speech`), as 128-bin Whisper
log-mels: the encoder's hidden states within `HIDDEN_TOL` of the reference's spread, and the
tokens identical position by position, for the 50 Hz tokenizer (`stride` 1) and the 25 Hz
one (`stride` 2), and with padding in a batch. The codebook (zeros in the package) gets random
rows near the unit sphere (norms 0.9-1.1, so that both the angle and the norm decide).

Power (`tests/power.py`): positions one frame off (the table from row 1) on the hidden states,
and the state not normalised before the codebook on the tokens.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.frontend import speech_tokenizer as st
from cosyvoice2.frontend.speech_tokenizer import SpeechTokenizerV1, SpeechTokenizerV1Config
from tests.power import assert_power, patched, wrapped
from tests.speech import speech_clips
from tests.test_speech_tokenizer import CLIPS, ESPEAK_TEXT

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.parity

HIDDEN_TOL = 1e-4
TINY = dict(n_state=128, n_head=2, n_layer=2)


class Pair:
    def __init__(self, stride: int, seed: int = 0):
        from cosyvoice2_testing.shims import install_shims

        install_shims()  # s3tokenizer imports torchaudio at import time
        from s3tokenizer.model import ModelConfig, S3Tokenizer

        torch.manual_seed(seed)
        name = "speech_tokenizer_v1_25hz" if stride == 2 else "speech_tokenizer_v1"
        cfg = ModelConfig(
            n_mels=128,
            n_audio_state=TINY["n_state"],
            n_audio_head=TINY["n_head"],
            n_audio_layer=TINY["n_layer"],
        )
        self.ref = S3Tokenizer(name, cfg).eval()
        with torch.no_grad():  # rows near the unit sphere, their norms spread by +-10%
            embed = self.ref.quantizer._codebook.embed
            rows = torch.nn.functional.normalize(torch.randn(embed.shape), dim=-1)
            embed.copy_(rows * (0.9 + 0.2 * torch.rand(embed.shape[0], 1)))
        self.ours = SpeechTokenizerV1(SpeechTokenizerV1Config(stride=stride, **TINY))
        state = {k: v.numpy() for k, v in self.ref.state_dict().items()}
        self.ours.load_weights(list(SpeechTokenizerV1.sanitize(state).items()), strict=True)
        mx.eval(self.ours.parameters())

    @torch.inference_mode()
    def reference(self, mel: np.ndarray, lengths: np.ndarray):
        m, n = torch.from_numpy(mel), torch.from_numpy(lengths)
        hidden, hidden_len = self.ref.encoder(m, n)
        codes = self.ref.quantizer.encode(hidden)
        return hidden.numpy(), codes.numpy(), hidden_len.numpy()


@pytest.fixture(scope="module")
def mels(tmp_path_factory) -> dict[str, np.ndarray]:
    from cosyvoice2.frontend import features

    clips = speech_clips(CLIPS, ESPEAK_TEXT, 16000, tmp_path_factory.mktemp("espeak"))
    return {name: np.array(features.whisper_log_mel(s))[None] for name, s in clips.items()}


@pytest.fixture(scope="module", params=[1, 2], ids=["50hz", "25hz"])
def pair(request) -> Pair:
    return Pair(request.param)


def _hidden_err(pair: Pair, mel: np.ndarray, want: np.ndarray) -> float:
    hidden, _ = pair.ours.encode(mx.array(mel))
    got = np.array(hidden)
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / want.std())


def _positions_one_off():
    return wrapped(st, "_sinusoids", lambda f: lambda n, c: f(n + 1, c)[1:])


def _not_normalised():
    def call(self, x):
        e = self.embed
        dist = -(mx.sum(x * x, -1, keepdims=True) - 2 * (x @ e.T) + mx.sum(e * e, -1))
        return mx.argmax(dist, axis=-1).astype(mx.int32)

    return patched(st.VectorQuantizer, "__call__", call)


def test_hidden_states_and_tokens_equal_the_reference(pair: Pair, mels) -> None:
    codes_seen = set()
    for name, mel in mels.items():
        lengths = np.array([mel.shape[-1]], dtype=np.int32)
        want_hidden, want_codes, want_len = pair.reference(mel, lengths)
        assert_power(
            f"v1 tokenizer hidden states ({name}, stride {pair.ours.config.stride})",
            lambda mel=mel, want=want_hidden: _hidden_err(pair, mel, want),
            HIDDEN_TOL,
            _positions_one_off(),
            "positions one frame off",
        )
        codes, n = pair.ours(mx.array(mel))
        assert int(n[0]) == int(want_len[0])
        assert np.array_equal(np.array(codes), want_codes), name
        codes_seen |= set(want_codes.ravel().tolist())
    print(f"[v1 tokenizer] stride {pair.ours.config.stride}: {len(codes_seen)} distinct codes")
    assert len(codes_seen) >= 20, "tokens of random weights should spread over many codes"

    mel = next(iter(mels.values()))
    _, want_codes, _ = pair.reference(mel, np.array([mel.shape[-1]], dtype=np.int32))

    def mismatches() -> float:
        return float((np.array(pair.ours(mx.array(mel))[0]) != want_codes).sum())

    assert_power("v1 tokens", mismatches, 0, _not_normalised(), "state not L2-normalised")


def test_tokens_with_padding_in_a_batch(pair: Pair, mels) -> None:
    a, b = list(mels.values())[:2]
    t = max(a.shape[-1], b.shape[-1])
    batch = np.zeros((2, 128, t), dtype=np.float32)
    batch[0, :, : a.shape[-1]], batch[1, :, : b.shape[-1]] = a[0], b[0]
    lengths = np.array([a.shape[-1], b.shape[-1]], dtype=np.int32)
    _, want_codes, want_len = pair.reference(batch, lengths)
    codes, n = pair.ours(mx.array(batch), mx.array(lengths))
    assert np.array(n).tolist() == want_len.tolist()
    for i in range(2):
        k = int(want_len[i])
        assert np.array_equal(np.array(codes)[i, :k], want_codes[i, :k])
