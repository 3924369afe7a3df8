"""HiFT: parity with the official `HiFTGenerator` on synthetic weights, and its own behaviour.

Parity tests load the same `hift.pt` into the official module and into ours
(through `HiFTGenerator.sanitize`) and inject the same Gaussian noise into the
official `SineGen2` (by patching `torch.randn_like`). The official random initial
phase (`torch.rand`) is left random on purpose: it must not change the output.

Realistic references. The input is the log-mel of a speech-like signal (voiced
stretches with a moving F0 and formants, fricative noise, a pause: values from
log(1e-5) = -11.5 up to about 1, as real log-mels), not Gaussian noise. Random
weights alone give a noise-like waveform of constant level: conv_post's
log-magnitude rows spread by only 0.1-0.3 nats around 0, so a bug upstream of
conv_post barely moves the output (the final-slope bug moved it by 7e-3 at full
size, less than 10x the tolerance). Both sides therefore get the same rescaled
weights: the log-magnitude rows of conv_post (weight-norm gain and bias) are
multiplied and shifted by `MAG_GAIN_SHIFT` (per model size), which spreads the
log-magnitudes by about 1.7 nats around -3 (tiny) or -2 (full size), as a
vocoder's spectra spread. Every reference waveform is checked before comparing:
RMS in `RMS_BAND`, peak in `PEAK_BAND`, fewer than `MAX_CLIPPED` of its samples
at the +-0.99 clamp (measured: RMS 0.17-0.18 and peak 0.49-0.62 tiny, RMS 0.08
and peak 0.37 full size, nothing clipped). The "voiced" pair also shifts and
scales the F0 head (in both modules) so that F0 lies around 40-130 Hz: random
weights give F0 near 0 Hz, all unvoiced, which would leave the sine path
untested.

Tolerances: waveform <= 1e-3, F0 <= 1e-4 (Hz, on values of about 100; 2e-4 at full
size, see `F0_TOL_FULL`). The
source signal from the same F0, reproduced to the bit of the official float32
phase, <= 1e-5; from the same mel it inherits the F0's rounding differences (the
phase integrates F0 over the utterance), so end to end it is held to the
waveform's 1e-3. STFT and iSTFT (float32 matrix products against torch's FFT)
<= 1e-5, relative to max(1, peak) for the iSTFT.

Every comparison is a power check (`tests.power.assert_power`): the same
measure, with one small bug put into our module, must fail its tolerance by at
least 10x. The waveform parity runs on each compute route (`tests.routes`); on
the composed route HiFT also uses MLX's native convolutions and no resblock
threads, as on Metal (where `cosyvoice2.ops.fast_paths_enabled()` and
`cosyvoice2.branches.enabled()` are False).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2 import branches, hift_source, ops
from cosyvoice2 import hift as hift_module
from cosyvoice2 import stft as stft_module
from cosyvoice2.config import HiFTConfig
from cosyvoice2.frontend import features
from cosyvoice2.hift import HiFTGenerator
from tests.power import assert_power, patched, wrapped

WAV_TOL = 1e-3
F0_TOL = 1e-4
# At full size (512 channels) the official float32 F0 is itself 0.7-1.2e-4 Hz away from the
# same module run in float64 on these speech-like mels (ours: 5e-5), so there the bound is
# 2e-4 Hz (2e-6 relative to F0 of about 100 Hz); measured between the two: 0.8-1.1e-4.
F0_TOL_FULL = 2e-4
SOURCE_TOL = 1e-5
STFT_TOL = 1e-5

TINY = HiFTConfig(base_channels=32, f0_cond_channels=32)

# conv_post's log-magnitude rows: (gain, shift) per base_channels (see the module docstring).
MAG_GAIN_SHIFT = {32: (6.0, -3.0), 512: (16.0, -2.0)}
VOICED = {"f0_bias": 100.0, "f0_scale": 300.0}
V1_GAIN_SHIFT = (6.0, -2.0)  # the tiny 22.05 kHz HiFT (two upsampling stages): a little louder
# A realistic reference waveform (speech at a normal level).
RMS_BAND = (0.01, 0.3)
PEAK_BAND = (0.1, 0.99)
MAX_CLIPPED = 0.01


def _max_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def assert_realistic_waveform(wav: np.ndarray, what: str) -> None:
    """RMS and peak of a speech recording, at most `MAX_CLIPPED` of the samples at the clamp."""
    wav = np.asarray(wav, np.float64)
    rms = float(np.sqrt(np.mean(wav**2)))
    peak = float(np.abs(wav).max())
    clipped = float(np.mean(np.abs(wav) >= 0.99))
    print(f"[reference] {what}: RMS {rms:.3g}, peak {peak:.3g}, clipped {clipped:.2%}")
    assert RMS_BAND[0] <= rms <= RMS_BAND[1], f"{what}: reference RMS {rms:.3g} not in {RMS_BAND}"
    assert PEAK_BAND[0] <= peak <= PEAK_BAND[1], (
        f"{what}: reference peak {peak:.3g} not in {PEAK_BAND}"
    )
    assert clipped < MAX_CLIPPED, f"{what}: {clipped:.1%} of the reference samples clipped"


# -- inputs ----------------------------------------------------------------------------------


def speechlike_wave(seconds: float, seed: int, sr: int = 24000) -> np.ndarray:
    """A deterministic speech-like signal: harmonics of a moving F0 shaped by three formants,
    syllable-rate amplitude, fricative noise stretches and a near-silent pause; peak 0.5."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    f0 = rng.uniform(100, 180) * (
        1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 3) * t + rng.uniform(0, 2 * np.pi))
    )
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = [rng.uniform(400, 800), rng.uniform(1000, 2000), rng.uniform(2300, 3200)]
    drift = 1 + 0.2 * np.sin(2 * np.pi * 2.0 * t + rng.uniform(0, 2 * np.pi))
    voiced = np.zeros(n)
    for h in range(1, 40):
        fh = h * f0
        envelope = sum(
            0.8**i * np.exp(-0.5 * ((fh - f * drift) / 150.0) ** 2) for i, f in enumerate(formants)
        )
        voiced += (envelope + 0.02) / np.sqrt(h) * (fh < 0.45 * sr) * np.sin(h * phase)
    noise = rng.standard_normal(n)
    frication = 0.3 * np.convolve(noise, [1.0, -1.0], mode="same")
    fricative = np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 2 * np.pi)) > 0.6
    syllables = np.abs(np.sin(2 * np.pi * rng.uniform(2.5, 4.0) * t + rng.uniform(0, 2 * np.pi)))
    x = np.where(fricative, frication, voiced) * syllables**0.7
    pause = (t > 0.45 * seconds) & (t < 0.55 * seconds)
    x = np.where(pause, 1e-4 * noise, x)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def speechlike_mel(seed: int, batch: int, frames: int) -> np.ndarray:
    """(batch, 80, frames) log-mels of `speechlike_wave`, as the flow would give HiFT."""
    mels = [
        np.array(features.mel_spectrogram(speechlike_wave(frames * 480 / 24000, seed + b)))[0]
        for b in range(batch)
    ]
    mel = np.stack(mels).astype(np.float32)
    assert mel.shape == (batch, 80, frames)
    # the range of real log-mels (floor log(1e-5) = -11.5, speech peaks of about 0-2)
    assert mel.min() >= -11.6 and -1.0 <= mel.max() <= 3.0 and -7.0 <= mel.mean() <= -2.0
    return mel


def _inputs(seed: int, batch: int, frames: int, scale: int = 480):
    mel = speechlike_mel(seed, batch, frames)
    noise = np.random.default_rng(seed).standard_normal((batch, frames * scale, 9))
    return mel, noise.astype(np.float32)


# -- the official side ---------------------------------------------------------------------


@contextlib.contextmanager
def official_sine_noise(noise: np.ndarray):
    """Make the official `SineGen2` draw `noise` (B, L, 9); other `randn_like` calls get zeros.

    The other call is `SourceModuleHnNSF2`'s noise branch, whose output `HiFTGenerator` discards.
    """
    import torch

    original = torch.randn_like
    used = []

    def fake(x, *args, **kwargs):
        if tuple(x.shape) == noise.shape:
            used.append(True)
            return torch.from_numpy(noise).to(x.dtype)
        return torch.zeros_like(x)

    torch.randn_like = fake
    try:
        yield used
    finally:
        torch.randn_like = original


def _pt_state(model_dir: Path) -> dict:
    import torch

    return torch.load(model_dir / "hift.pt", map_location="cpu", weights_only=True)


def _rescale(state: dict, ref, voiced: bool, gain_shift: tuple[float, float] | None = None) -> None:
    """Apply the realistic-output rescaling (and the voiced F0 head) to the official module
    and copy the changed tensors into `state` (legacy weight-norm keys), so both sides agree."""
    import torch

    gain, shift = gain_shift or MAG_GAIN_SHIFT[ref.conv_post.in_channels * 2 ** len(ref.ups)]
    bins = ref.istft_params["n_fft"] // 2 + 1
    g = ref.conv_post.parametrizations.weight.original0
    with torch.no_grad():
        g[:bins] *= gain
        ref.conv_post.bias[:bins] += shift
        if voiced:
            ref.f0_predictor.classifier.weight.mul_(VOICED["f0_scale"])
            ref.f0_predictor.classifier.bias.add_(VOICED["f0_bias"])
    state["conv_post.weight_g"] = g.detach().clone()
    state["conv_post.bias"] = ref.conv_post.bias.detach().clone()
    state["f0_predictor.classifier.weight"] = ref.f0_predictor.classifier.weight.detach().clone()
    state["f0_predictor.classifier.bias"] = ref.f0_predictor.classifier.bias.detach().clone()


def _pair(model_dir: Path, voiced: bool):
    """(official module, our module) with the same (rescaled) weights from `model_dir/hift.pt`."""
    from cosyvoice2.config import config_from_official_dir
    from cosyvoice2_testing.official import load_official

    ref = load_official("hift", model_dir)
    state = _pt_state(model_dir)
    _rescale(state, ref, voiced)
    ours = HiFTGenerator(config_from_official_dir(model_dir).hift)
    weights = HiFTGenerator.sanitize({k: v.numpy() for k, v in state.items()})
    ours.load_weights(list(weights.items()), strict=True)
    mx.eval(ours.parameters())
    return ref, ours


def _official_inference(ref, mel: np.ndarray, noise: np.ndarray, cache_source=None):
    import torch

    kwargs = {} if cache_source is None else {"cache_source": torch.from_numpy(cache_source)}
    with official_sine_noise(noise) as used, torch.no_grad():
        wav, source = ref.inference(torch.from_numpy(mel), **kwargs)
    assert used, "the official SineGen2 did not draw the injected noise"
    return wav.numpy(), source.numpy()


def _official_f0(ref, mel: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref.f0_predictor(torch.from_numpy(mel)).numpy()


# -- the bugs of the power checks (each in our module only) ----------------------------------


def final_slope_bug():
    """The last leaky ReLU with `lrelu_slope` 0.1 instead of torch's default 0.01."""
    return patched(hift_module, "FINAL_LRELU_SLOPE", 0.1)


def _taps_one_sample_off(original):
    def taps(length: int, scale: int):
        shifted = [mx.concatenate([a[1:], a[-1:]]) for a in original(length, scale)]
        return tuple(shifted)

    return taps


def f0_upsampling_bug():
    """The sample-rate phase interpolated one sample off (the taps of sample j + 1 at sample j)."""
    return wrapped(hift_source, "_linear_upsample_taps", _taps_one_sample_off)


def _harmonics_from_zero(original):
    def phase(self, f0):
        p = original(self, f0)  # harmonics 1..9
        return mx.concatenate([mx.zeros_like(p[..., :1]), p[..., :-1]], axis=-1)  # 0..8

    return phase


def harmonic_bug():
    """SineGen2's harmonics numbered 0..8 instead of 1..9 (`arange(0, dim)`)."""
    return wrapped(hift_source.SineGen2, "phase", _harmonics_from_zero)


def f0_padding_bug(ours):
    """The F0 predictor's first conv padded causally (2, 0) instead of (1, 1)."""
    return patched(ours.f0_predictor.condnet[0], "padding", (2, 0))


# -- routes --------------------------------------------------------------------------------


@pytest.fixture
def hift_route(route):
    """`route`; on the composed route the formulation Metal runs (native convs, no threads)."""
    if route == "composed":
        assert not ops.fast_paths_enabled() and not branches.enabled()
    yield route


# -- parity on the tiny synthetic model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_official(tiny_pt_dir, torch_threads):
    from cosyvoice2_testing.official import load_official

    return load_official("hift", tiny_pt_dir)


@pytest.fixture(scope="module")
def tiny_pair(tiny_pt_dir, torch_threads):
    return _pair(tiny_pt_dir, voiced=False)


@pytest.fixture(scope="module")
def tiny_voiced_pair(tiny_pt_dir, torch_threads):
    return _pair(tiny_pt_dir, voiced=True)


def test_sanitize_folds_both_weight_norm_styles(tiny_pt_dir, tiny_official):
    """Legacy `weight_g/_v` (hift.pt) and `parametrizations.weight.original0/1` (torch's
    current `state_dict`) fold to the same weights, equal to the official effective weights."""
    ref = tiny_official
    legacy = {k: v.numpy() for k, v in _pt_state(tiny_pt_dir).items()}
    current = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert any(k.endswith(".weight_g") for k in legacy)
    assert any("parametrizations.weight.original0" in k for k in current)
    a = HiFTGenerator.sanitize(legacy)
    b = HiFTGenerator.sanitize(current)
    c = HiFTGenerator.sanitize({f"generator.{k}": v for k, v in current.items()})
    assert sorted(a) == sorted(b) == sorted(c)
    for k in a:
        assert _max_err(a[k], b[k]) <= 1e-6, k
        assert _max_err(a[k], c[k]) == 0.0, k
    # The folded weights are what the official parametrized modules compute.
    checks = {
        "conv_pre.weight": ref.conv_pre.weight.detach().numpy().transpose(0, 2, 1),
        "ups.0.weight": ref.ups[0].weight.detach().numpy().transpose(1, 2, 0),
        "resblocks.4.convs1.2.weight": ref.resblocks[4]
        .convs1[2]
        .weight.detach()
        .numpy()
        .transpose(0, 2, 1),
        "f0_predictor.condnet.6.weight": ref.f0_predictor.condnet[6]
        .weight.detach()
        .numpy()
        .transpose(0, 2, 1),
        "source_downs.0.weight": ref.source_downs[0].weight.detach().numpy().transpose(0, 2, 1),
    }
    for k, want in checks.items():
        assert _max_err(a[k], want) <= 1e-6, k
    # Strict loading of either style works (the fixture loaded the legacy one).
    HiFTGenerator(TINY).load_weights(list(b.items()), strict=True)


def test_sanitize_rejects_half_a_weight_norm_pair():
    w = {
        "conv_pre.weight_g": np.ones((4, 1, 1), np.float32),
        "conv_pre.bias": np.zeros(4, np.float32),
    }
    with pytest.raises(ValueError, match="need both g and v"):
        HiFTGenerator.sanitize(w)


def test_f0_predictor_parity(tiny_voiced_pair):
    ref, ours = tiny_voiced_pair
    mel, _ = _inputs(1, batch=2, frames=37)
    want = _official_f0(ref, mel)
    assert want.min() > 10.0, "voiced setup broken: F0 should be above the 10 Hz threshold"
    assert 50.0 <= want.mean() <= 200.0, f"F0 {want.min():.1f}-{want.max():.1f} Hz: not a voice"
    assert_power(
        "HiFT F0 (Hz)",
        lambda: _max_err(ours.f0(mx.array(mel)), want),
        F0_TOL,
        f0_padding_bug(ours),
        "F0 predictor conv padded (2, 0)",
    )


def test_source_parity_long_utterance(tiny_voiced_pair):
    """`SourceModuleHnNSF2` on 12 s of F0 with voiced and unvoiced stretches: the sine phase
    reaches ~1e6 rad, where float32 steps are ~0.06 rad, so only a bit-faithful phase passes."""
    import torch

    ref, ours = tiny_voiced_pair
    rng = np.random.default_rng(5)
    frames = 600
    f0 = rng.uniform(60.0, 400.0, (1, frames)).astype(np.float32)
    f0[:, 100:160] = 0.0  # unvoiced stretch
    f0[:, 300:310] = 5.0  # below the voiced threshold
    noise = rng.standard_normal((1, frames * 480, 9)).astype(np.float32)
    with official_sine_noise(noise), torch.no_grad():
        s = ref.f0_upsamp(torch.from_numpy(f0)[:, None]).transpose(1, 2)
        want = ref.m_source(s)[0].transpose(1, 2).numpy()
    assert_power(
        "HiFT source from F0 (12 s)",
        lambda: _max_err(ours.source(mx.array(f0), mx.array(noise)), want),
        SOURCE_TOL,
        f0_upsampling_bug(),
        "F0 upsampling off by one sample",
    )


@pytest.mark.parametrize("voiced", [False, True], ids=["unvoiced", "voiced"])
@pytest.mark.parametrize("batch,frames", [(1, 37), (2, 23)])
def test_waveform_parity(tiny_pair, tiny_voiced_pair, hift_route, voiced, batch, frames):
    ref, ours = tiny_voiced_pair if voiced else tiny_pair
    mel, noise = _inputs(10 + frames, batch, frames)
    want_wav, want_src = _official_inference(ref, mel, noise)
    assert_realistic_waveform(want_wav, "official HiFT")
    if voiced:
        f0 = _official_f0(ref, mel)
        assert f0.min() > 10.0 and 50.0 <= f0.mean() <= 200.0, f"F0 {f0.min():.3g}-{f0.max():.3g}"
    outputs = {}

    def run():
        wav, src = ours.inference(mx.array(mel), noise=mx.array(noise))
        assert wav.shape == (batch, frames * 480)
        assert src.shape == (batch, 1, frames * 480)
        outputs["wav"], outputs["src"] = np.array(wav), np.array(src)

    def wav_err():
        run()
        return _max_err(outputs["wav"], want_wav)

    where = f"{hift_route}, {'voiced' if voiced else 'unvoiced'}, {batch}x{frames}"
    assert_power(f"HiFT waveform ({where})", wav_err, WAV_TOL, final_slope_bug(), "final slope 0.1")
    if voiced:
        assert_power(
            f"HiFT waveform ({where})",
            wav_err,
            WAV_TOL,
            f0_upsampling_bug(),
            "F0 upsampling off by one sample",
        )

        def src_err():
            run()
            return _max_err(outputs["src"], want_src)

        assert_power(f"HiFT source ({where})", src_err, WAV_TOL, harmonic_bug(), "harmonics 0..8")
    else:  # no sine: the source is the noise branch alone
        run()
        err_src = _max_err(outputs["src"], want_src)
        assert err_src <= WAV_TOL, f"source max abs diff {err_src:.3g}"


def test_inference_with_cache_source_parity(tiny_voiced_pair):
    """Streaming form: a previous chunk's source tail replaces the head of this chunk's source."""
    ref, ours = tiny_voiced_pair
    mel, noise = _inputs(7, 1, 34)
    _, prev_source = _inputs(8, 1, 8)  # any signal of 8 frames' length works as a cache
    cache = (np.tanh(prev_source[:, :, :1]).transpose(0, 2, 1) * 0.1).astype(np.float32)
    want_wav, want_src = _official_inference(ref, mel, noise, cache_source=cache)
    assert_realistic_waveform(want_wav, "official HiFT with cache_source")
    wav, src = ours.inference(mx.array(mel), cache_source=mx.array(cache), noise=mx.array(noise))
    np.testing.assert_array_equal(np.array(src)[:, :, : cache.shape[2]], cache)
    assert _max_err(src, want_src) <= WAV_TOL

    def ignore_cache(original):
        def inference(self, speech_feat, cache_source=None, noise=None, key=None):
            return original(self, speech_feat, None, noise, key)

        return inference

    assert_power(
        "HiFT waveform with cache_source",
        lambda: _max_err(
            ours.inference(mx.array(mel), cache_source=mx.array(cache), noise=mx.array(noise))[0],
            want_wav,
        ),
        WAV_TOL,
        wrapped(HiFTGenerator, "inference", ignore_cache),
        "cache_source ignored",
    )


def _symmetric_analysis_window(original):
    def mats(n_fft: int):
        analysis, synthesis, window = original(n_fft)
        n = np.arange(n_fft)
        symmetric = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / (n_fft - 1))
        ratio = np.divide(symmetric, window, out=np.zeros(n_fft), where=window > 0)
        return mx.array(np.array(analysis) * ratio[:, None].astype(np.float32)), synthesis, window

    return mats


def test_stft_matches_torch(tiny_official, tiny_random_model):
    import torch

    ref, ours = tiny_official, tiny_random_model
    s = np.random.default_rng(2).standard_normal((2, 480 * 5)).astype(np.float32)
    real, imag = ref._stft(torch.from_numpy(s))
    want = np.concatenate([real.numpy(), imag.numpy()], axis=1).transpose(0, 2, 1)
    assert_power(
        "HiFT STFT",
        lambda: _max_err(ours._stft(mx.array(s)), want),
        STFT_TOL,
        wrapped(stft_module, "_stft_mats", _symmetric_analysis_window),
        "symmetric Hann analysis window",
    )


def test_istft_matches_torch(tiny_official, tiny_random_model):
    import torch

    ref, ours = tiny_official, tiny_random_model
    rng = np.random.default_rng(3)
    frames = 601
    log_mag = rng.normal(0.0, 2.0, (2, 9, frames)).astype(np.float32)  # exp reaches the 1e2 clip
    phase = rng.uniform(-1.0, 1.0, (2, 9, frames)).astype(np.float32)
    mag = np.exp(log_mag)
    want = ref._istft(torch.from_numpy(mag), torch.from_numpy(phase)).numpy()
    assert want.shape == (2, 4 * (frames - 1))
    scale = max(1.0, float(np.abs(want).max()))

    def err():
        got = ours._istft(mx.array(mag.transpose(0, 2, 1)), mx.array(phase.transpose(0, 2, 1)))
        return _max_err(got, want) / scale

    assert_power(
        "HiFT iSTFT (relative to max(1, peak))",
        err,
        STFT_TOL,
        patched(hift_module, "ISTFT_MAX_MAGNITUDE", float("inf")),
        "magnitude clip at 1e2 dropped",
    )


def test_window_is_scipy_periodic_hann():
    signal = pytest.importorskip("scipy.signal")
    from cosyvoice2.stft import _stft_mats

    window = _stft_mats(16)[2]
    np.testing.assert_array_equal(
        window, signal.get_window("hann", 16, fftbins=True).astype(np.float32)
    )


# -- behaviour without the reference ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_random_model():
    mx.random.seed(0)
    model = HiFTGenerator(TINY)
    mx.eval(model.parameters())
    return model


def test_inference_shapes_and_explicit_randomness(tiny_random_model):
    model = tiny_random_model
    mel = mx.random.normal((1, 80, 11), key=mx.random.key(1))
    assert model.noise_shape(mel) == (1, 11 * 480, 9)
    a, sa = model.inference(mel, key=mx.random.key(7))
    b, _ = model.inference(mel, key=mx.random.key(7))
    c, _ = model.inference(mel, key=mx.random.key(8))
    noise = mx.random.normal(model.noise_shape(mel), key=mx.random.key(7))
    d, _ = model.inference(mel, noise=noise)
    assert a.shape == (1, 11 * 480) and sa.shape == (1, 1, 11 * 480)
    assert mx.array_equal(a, b) and mx.array_equal(a, d)
    assert not mx.array_equal(a, c)
    assert float(mx.max(mx.abs(a))) <= TINY.audio_limit
    assert mx.array_equal(model(mel, key=mx.random.key(7)), a)


def test_inference_rejects_bad_noise_and_cache(tiny_random_model):
    model = tiny_random_model
    mel = mx.zeros((1, 80, 4))
    with pytest.raises(ValueError, match="noise shape"):
        model.inference(mel, noise=mx.zeros((1, 4 * 480, 8)))
    with pytest.raises(ValueError, match="longer than the source"):
        model.inference(mel, cache_source=mx.zeros((1, 1, 5 * 480)), key=mx.random.key(0))


def test_cache_source_sets_the_source_head(tiny_random_model):
    model = tiny_random_model
    mel = mx.random.normal((1, 80, 9), key=mx.random.key(3))
    cache = mx.random.normal((1, 1, 3840), key=mx.random.key(4)) * 0.1
    _, src = model.inference(mel, cache_source=cache, key=mx.random.key(5))
    _, src0 = model.inference(mel, key=mx.random.key(5))
    assert mx.array_equal(src[:, :, :3840], cache)
    assert mx.array_equal(src[:, :, 3840:], src0[:, :, 3840:])
    empty, _ = model.inference(mel, cache_source=mx.zeros((1, 1, 0)), key=mx.random.key(5))
    assert mx.array_equal(empty, model.inference(mel, key=mx.random.key(5))[0])


def test_sine_source_is_voiced_only_above_threshold(tiny_random_model):
    """Unvoiced frames carry only noise of std sine_amp / 3; voiced ones a sine plus small noise."""
    gen = tiny_random_model.m_source.l_sin_gen
    f0 = mx.array([[0.0] * 20 + [200.0] * 20])
    noise = mx.zeros((1, 40 * 480, 9))
    waves = np.array(gen(f0, noise))
    assert np.all(waves[0, : 20 * 480] == 0.0)
    voiced = waves[0, 20 * 480 + 480 :, 0]  # past the interpolation ramp at the join
    assert np.abs(voiced).max() == pytest.approx(TINY.nsf_alpha, rel=1e-3)
    # 200 Hz at 24 kHz: the fundamental's zero crossings are 60 samples apart.
    crossings = np.flatnonzero(np.diff(np.signbit(voiced)))
    assert np.allclose(np.diff(crossings), 60, atol=1)


def test_snake_polynomial_matches_sine():
    from cosyvoice2.hift import _sin_squared

    rng = np.random.default_rng(0)
    y = np.concatenate([np.linspace(-20, 20, 100001), rng.uniform(-1e4, 1e4, 100000)])
    y = y.astype(np.float32)
    got = np.array(_sin_squared(mx.array(y)))
    want = np.sin(y.astype(np.float64)) ** 2
    assert np.abs(got - want).max() <= 5e-7
    y = rng.uniform(-2e5, 2e5, 100000).astype(np.float32)
    got = np.array(_sin_squared(mx.array(y)))
    assert np.abs(got - np.sin(y.astype(np.float64)) ** 2).max() <= 3e-6


# -- the first generation's 22.05 kHz HiFT --------------------------------------------------


@contextlib.contextmanager
def official_sine_gen_draws(noise: np.ndarray, phase: np.ndarray):
    """Make the official `SineGen` draw `noise` (B, L, 9) and initial phases `phase` (B, 9)
    (its harmonic 0 is then set to 0 by the official code); other `randn_like` calls (the
    discarded noise branch) get zeros."""
    import torch
    from torch.distributions import Uniform

    want = (noise.shape[0], noise.shape[2], noise.shape[1])  # the official (B, dim, L)
    used = []

    def fake_randn(x, *args, **kwargs):
        if tuple(x.shape) == want:
            used.append("noise")
            return torch.from_numpy(noise.transpose(0, 2, 1).copy()).to(x.dtype)
        return torch.zeros_like(x)

    def fake_sample(self, sample_shape=()):
        used.append("phase")
        return torch.from_numpy(phase[:, :, None].copy())

    with patched(torch, "randn_like", fake_randn), patched(Uniform, "sample", fake_sample):
        yield used


@pytest.fixture(scope="module")
def v1_pair(torch_threads):
    """The official 22.05 kHz HiFTGenerator (tiny, the released structure) and ours, with the
    same realistic (voiced) rescaling as the 24 kHz pairs."""
    import tempfile

    import torch

    from cosyvoice2.config import hift_config_from_official
    from cosyvoice2.official_yaml import load_official_yaml
    from cosyvoice2_testing.official import instantiate
    from cosyvoice2_testing.shims import install_shims
    from cosyvoice2_testing.synthetic_v1 import hift_yaml_text

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cosyvoice.yaml"
        path.write_text(hift_yaml_text("tiny"), encoding="utf-8")
        hp = load_official_yaml(path)
    install_shims()
    torch.manual_seed(4)
    ref = instantiate(hp["hift"]).eval()
    _rescale({}, ref, voiced=True, gain_shift=V1_GAIN_SHIFT)
    ours = HiFTGenerator(hift_config_from_official(hp["hift"]))
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ours.load_weights(list(HiFTGenerator.sanitize(state).items()), strict=True)
    mx.eval(ours.parameters())
    return ref, ours


def _sine_phase_bug():
    """The 22.05 kHz phase not wrapped to one turn before the initial phase is added."""

    def phase(self, f0):
        up = mx.repeat(f0, self.upsample_scale, axis=1)
        rad = up[:, :, None] * mx.arange(1, self.dim + 1, dtype=mx.float32) / self.sampling_rate
        return np.float32(2 * np.pi) * mx.cumsum(rad, axis=1)

    return patched(hift_source.SineGen, "phase", phase)


def _initial_phase_ignored():
    return wrapped(
        hift_source.SineGen,
        "__call__",
        lambda f: lambda self, f0, noise, initial: f(self, f0, noise, mx.zeros_like(initial)),
    )


def test_22khz_waveform_parity(v1_pair):
    """The first generation's HiFT (upsampling x8 x8, `SourceModuleHnNSF`/`SineGen`) against
    the official module: source and waveform, with the same noise and initial phases."""
    ref, ours = v1_pair
    assert ours.upsample_scale == 256 and ours.draws_phase
    frames = 43
    mel = speechlike_mel(7, 1, frames)
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((1, frames * 256, 9)).astype(np.float32)
    phase = rng.uniform(-np.pi, np.pi, (1, 9)).astype(np.float32)
    import torch

    with official_sine_gen_draws(noise, phase) as used, torch.no_grad():
        want_wav, want_src = (t.numpy() for t in ref.inference(torch.from_numpy(mel)))
    assert {"noise", "phase"} <= set(used)
    assert_realistic_waveform(want_wav, "official 22.05 kHz HiFT")
    f0 = _official_f0(ref, mel)
    assert f0.min() > 10.0, "voiced setup broken: F0 should be above the 10 Hz threshold"
    ours_phase = mx.array(np.concatenate([np.zeros((1, 1)), phase[:, 1:]], axis=1))
    # the source from one F0 (the official one), so that F0 rounding does not enter it
    with official_sine_gen_draws(noise, phase), torch.no_grad():
        up = ref.f0_upsamp(torch.from_numpy(f0)[:, None]).transpose(1, 2)
        want_source = ref.m_source(up)[0].transpose(1, 2).numpy()
    for bug, name in (
        (_initial_phase_ignored(), "harmonics' initial phases ignored"),
        (_sine_phase_bug(), "phase not wrapped to one turn"),
    ):
        assert_power(
            "22.05 kHz HiFT source from F0",
            lambda: _max_err(ours.source(mx.array(f0), mx.array(noise), ours_phase), want_source),
            SOURCE_TOL,
            bug,
            name,
        )

    def run():
        return ours.inference(mx.array(mel), noise=mx.array(noise), phase=ours_phase)

    assert _max_err(run()[1], want_src) <= WAV_TOL
    assert_power(
        "22.05 kHz HiFT waveform",
        lambda: _max_err(run()[0], want_wav),
        WAV_TOL,
        final_slope_bug(),
        "final slope 0.1",
    )
    wav, _ = ours.inference(mx.array(mel), key=mx.random.key(1))  # noise and phases drawn
    assert wav.shape == (1, frames * 256) and np.isfinite(np.array(wav)).all()


# -- full size -------------------------------------------------------------------------------


def test_full_size_parity(full_pt_dir, torch_threads):
    """One second of HiFT at the released sizes (512 channels) against the official module: F0,
    source and waveform, each a power check."""
    ref, ours = _pair(full_pt_dir, voiced=True)
    mel, noise = _inputs(21, 1, 50)

    want_f0 = _official_f0(ref, mel)
    assert want_f0.min() > 10.0 and 50.0 <= want_f0.mean() <= 200.0
    assert_power(
        "HiFT F0 (full size)",
        lambda: _max_err(ours.f0(mx.array(mel)), want_f0),
        F0_TOL_FULL,
        f0_padding_bug(ours),
        "F0 predictor conv padded (2, 0)",
    )
    want_wav, want_src = _official_inference(ref, mel, noise)
    assert_realistic_waveform(want_wav, "official HiFT (full size)")
    outputs = {}

    def run():
        outputs["wav"], outputs["src"] = ours.inference(mx.array(mel), noise=mx.array(noise))

    def wav_err():
        run()
        return _max_err(outputs["wav"], want_wav)

    def src_err():
        run()
        return _max_err(outputs["src"], want_src)

    assert_power(
        "HiFT waveform (full size)", wav_err, WAV_TOL, final_slope_bug(), "final slope 0.1"
    )
    assert_power(
        "HiFT waveform (full size)",
        wav_err,
        WAV_TOL,
        f0_upsampling_bug(),
        "F0 upsampling off by one sample",
    )
    assert_power("HiFT source (full size)", src_err, WAV_TOL, harmonic_bug(), "harmonics 0..8")


def test_resblocks_on_two_threads_equal_serial(tiny_random_model, monkeypatch):
    """The resblocks of a stage split over two threads (`cosyvoice2.branches`) give the serial result."""
    from cosyvoice2 import branches

    model = tiny_random_model
    mel = mx.random.normal((1, 80, 23), key=mx.random.key(3))
    noise = mx.random.normal(model.noise_shape(mel), key=mx.random.key(4))
    calls = []
    real_map = branches.map_branches
    monkeypatch.setattr(branches, "map_branches", lambda *a: calls.append(1) or real_map(*a))
    monkeypatch.setattr(branches, "enabled", lambda: False)
    serial, _ = model.inference(mel, noise=noise)
    assert not calls
    monkeypatch.setattr(branches, "enabled", lambda: True)
    split, _ = model.inference(mel, noise=noise)
    assert len(calls) == model.num_upsamples
    assert _max_err(split, serial) <= 1e-6
