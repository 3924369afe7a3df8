"""The first generation's flow (`cosyvoice2.flow.flow.MaskedDiffWithXvec`) against the official
`MaskedDiffWithXvec` of the installed wheel, on the same random weights.

The official module is built from the released `cosyvoice.yaml` structure
(`cosyvoice2_testing.synthetic_v1.flow_yaml_text`, tiny dims) with its own initialisation;
its one-dimensional parameters and biases (constants there) get small noise, its encoder's
attention projections are scaled (under torch's default initialisation the attention is
nearly uniform, so positions would hardly matter), and its state dict is loaded into ours.
The official noise (`torch.randn_like`) is replaced by the same array on both sides.

- `mu` after the length regulator, for a short utterance (one interpolation) and a long one
  (more than 40 tokens: head, middle and tail stretched apart), and the mel of
  `inference`: max abs difference <= `TOL` x the reference's standard deviation.

Power (`tests/power.py`): the encoder causal (chunks of one position), the interpolation
reading `i * T / size` (torch's `align_corners=True`-like rule), and the long utterance
stretched in one piece.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.config import masked_diff_config_from_official
from cosyvoice2.flow import length_regulator
from cosyvoice2.flow.flow import MaskedDiffWithXvec
from cosyvoice2.official_yaml import load_official_yaml
from cosyvoice2_testing.synthetic_v1 import flow_yaml_text
from tests.power import assert_power, patched

torch = pytest.importorskip("torch")
pytest.importorskip("cosyvoice", reason="the official CosyVoice code is not installed")
pytestmark = pytest.mark.parity

TOL = 1e-4
ATTENTION_SCALE = 4.0


class Pair:
    def __init__(self, seed: int = 0):
        from cosyvoice2_testing.official import instantiate
        from cosyvoice2_testing.shims import install_shims

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cosyvoice.yaml"
            path.write_text(flow_yaml_text("tiny"), encoding="utf-8")
            hp = load_official_yaml(path)
        install_shims()
        torch.manual_seed(seed)
        self.ref = instantiate(hp["flow"]).eval()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in self.ref.named_parameters():
                if p.ndim == 1 or name.endswith("bias"):
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
                if name.startswith("encoder.encoders.") and name.endswith(
                    ("linear_q.weight", "linear_k.weight", "linear_pos.weight")
                ):
                    p.mul_(ATTENTION_SCALE)
        self.config = masked_diff_config_from_official(hp["flow"])
        self.ours = MaskedDiffWithXvec(self.config)
        state = {k: v.detach().numpy() for k, v in self.ref.state_dict().items()}
        self.ours.load_weights(list(self.ours.sanitize(state).items()), strict=True)
        mx.eval(self.ours.parameters())
        self.rng = np.random.default_rng(seed)

    def inputs(self, n_prompt: int, n_new: int):
        r = self.rng
        prompt = r.integers(0, 4096, (1, n_prompt)).astype(np.int32)
        token = r.integers(0, 4096, (1, n_new)).astype(np.int32)
        mel_len1 = int(n_prompt / 50 * 22050 / 256)
        feat = (r.standard_normal((1, mel_len1, 80)) * 0.5).astype(np.float32)
        emb = r.standard_normal((1, 192)).astype(np.float32)
        return token, prompt, feat, emb

    @torch.inference_mode()
    def ref_mu(self, token, prompt, feat) -> np.ndarray:
        m = self.ref
        tokens = torch.tensor(np.concatenate([prompt, token], axis=1), dtype=torch.long)
        h, _ = m.encoder(m.input_embedding(tokens), torch.tensor([tokens.shape[1]]))
        h = m.encoder_proj(h)
        n1, mel_len1 = prompt.shape[1], feat.shape[1]
        mel_len2 = int(token.shape[1] / m.input_frame_rate * 22050 / 256)
        mu, _ = m.length_regulator.inference(h[:, :n1], h[:, n1:], mel_len1, mel_len2, 50)
        return mu[0].numpy()

    def our_mu(self, token, prompt, feat) -> np.ndarray:
        mu = self.ours.encode(mx.array(token), mx.array(prompt), feat.shape[1])
        return np.array(mu[0])

    @torch.inference_mode()
    def ref_mel(self, token, prompt, feat, emb, noise: np.ndarray) -> np.ndarray:
        t = lambda a: torch.tensor(a)  # noqa: E731
        n = lambda a: torch.tensor([a.shape[1]], dtype=torch.int32)  # noqa: E731
        fixed = torch.tensor(noise.transpose(0, 2, 1).copy())  # official layout (1, 80, T)
        with patched(torch, "randn_like", lambda x, **kw: fixed.clone()):
            mel, _ = self.ref.inference(
                t(token), n(token), t(prompt), n(prompt), t(feat), n(feat), t(emb),
                torch.zeros(1, 80, 0, 2),
            )  # fmt: skip
        return mel[0].numpy().T

    def our_mel(self, token, prompt, feat, emb, noise: np.ndarray) -> np.ndarray:
        mel = self.ours.inference(
            mx.array(token), mx.array(prompt), mx.array(feat), mx.array(emb),
            n_timesteps=10, noise=mx.array(noise),
        )  # fmt: skip
        return np.array(mel[0])


@pytest.fixture(scope="module")
def pair() -> Pair:
    return Pair()


def _err(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / ref.std())


def _causal_encoder(pair: Pair):
    return patched(pair.ours.encoder, "static_chunk_size", 1)


def _align_corners_interpolation():
    def interp(x, size):
        t = x.shape[1]
        src = np.arange(size) * (t - 1) / max(size - 1, 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, t - 1)
        lam = mx.array((src - i0).astype(np.float32))[None, :, None]
        return x[:, mx.array(i0)] * (1 - lam) + x[:, mx.array(i1)] * lam

    return patched(length_regulator, "interpolate_linear", interp)


def _long_in_one_piece():
    return patched(length_regulator, "OVERLAP_TOKENS", 10**6)


@pytest.mark.parametrize("n_prompt, n_new", [(30, 25), (30, 70)])
def test_mu_equals_the_official_encoder_and_length_regulator(
    pair: Pair, n_prompt: int, n_new: int
) -> None:
    token, prompt, feat, _ = pair.inputs(n_prompt, n_new)
    ref = pair.ref_mu(token, prompt, feat)
    bugs = [
        (_causal_encoder(pair), "encoder causal"),
        (_align_corners_interpolation(), "interpolation with align_corners"),
    ]
    if n_new > 40:
        bugs.append((_long_in_one_piece(), "long utterance stretched in one piece"))
    for bug, name in bugs:
        assert_power(
            f"MaskedDiffWithXvec mu ({n_new} new tokens) vs official",
            lambda: _err(pair.our_mu(token, prompt, feat), ref),
            TOL,
            bug,
            name,
        )


def test_mel_equals_the_official_inference(pair: Pair) -> None:
    token, prompt, feat, emb = pair.inputs(30, 50)
    n = feat.shape[1] + int(50 / 50 * 22050 / 256)
    noise = pair.rng.standard_normal((1, n, 80)).astype(np.float32)
    ref = pair.ref_mel(token, prompt, feat, emb, noise)
    assert ref.shape == (n - feat.shape[1], 80)
    assert_power(
        "MaskedDiffWithXvec mel vs official inference",
        lambda: _err(pair.our_mel(token, prompt, feat, emb, noise), ref),
        TOL,
        _causal_encoder(pair),
        "encoder causal",
    )


def test_stream_with_the_overlap_cache_equals_the_official_flow_cache(pair: Pair) -> None:
    """Two windows of a first-generation stream (60 tokens, then 60 more starting 20 back):
    the second call starts from the first's noise and `mu` for the prompt and the 34
    overlap frames (the official `flow_cache`), on both sides with the same fresh noise."""
    from cosyvoice2.flow.flow_matching import OverlapCache

    tokens, prompt, feat, emb = pair.inputs(30, 100)
    windows = [tokens[:, :60], tokens[:, 40:100]]
    frames = [feat.shape[1] + int(60 / 50 * 22050 / 256)] * 2
    noises = [pair.rng.standard_normal((1, n, 80)).astype(np.float32) for n in frames]
    refs, cache = [], torch.zeros(1, 80, 0, 2)
    t = lambda a: torch.tensor(a)  # noqa: E731
    n = lambda a: torch.tensor([a.shape[1]], dtype=torch.int32)  # noqa: E731
    for window, noise in zip(windows, noises):
        fixed = torch.tensor(noise.transpose(0, 2, 1).copy())
        draw = lambda x, fixed=fixed, **kw: fixed.clone()  # noqa: E731
        with torch.inference_mode(), patched(torch, "randn_like", draw):
            mel, cache = pair.ref.inference(
                t(window), n(window), t(prompt), n(prompt), t(feat), n(feat), t(emb), cache
            )
        refs.append(mel[0].numpy().T)
    assert cache.shape[2] == feat.shape[1] + 34

    def ours(use_cache: bool = True) -> list[np.ndarray]:
        c = OverlapCache()
        return [
            np.array(
                pair.ours.inference(
                    mx.array(w), mx.array(prompt), mx.array(feat), mx.array(emb),
                    noise=mx.array(z), cache=c if use_cache else None,
                )[0]
            )
            for w, z in zip(windows, noises)
        ]  # fmt: skip

    def second_err() -> float:
        first, second = ours()
        assert _err(first, refs[0]) <= TOL
        return _err(second, refs[1])

    no_cache = _bug_without_cache()
    assert_power(
        "first-generation stream: second window vs official",
        second_err,
        TOL,
        no_cache,
        "no flow cache",
    )


def _bug_without_cache():
    from cosyvoice2.flow import flow_matching

    return patched(flow_matching.OverlapCache, "apply", lambda self, z, mu, prompt_len: (z, mu))


def test_config_reads_the_released_layout() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cosyvoice.yaml"
        path.write_text(flow_yaml_text("full"), encoding="utf-8")
        c = masked_diff_config_from_official(load_official_yaml(path)["flow"])
    assert c.decoder.estimator.channels == (256, 256) and c.decoder.estimator.num_mid_blocks == 12
    assert c.encoder.static_chunk_size == 0 and c.encoder.num_blocks == 6
    assert c.length_regulator.sampling_ratios == (1, 1, 1, 1) and c.input_frame_rate == 50
