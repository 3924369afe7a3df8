"""End to end per mode: our modes against the official modules composed by the official `CosyVoice2Model.tts`.

Both sides get the same prompt features (ours; the features themselves are
tested against the official functions elsewhere), greedy decoding over the
speech tokens, the official fixed CFM noise, and the same HiFT source noise
(injected into the official `SineGen2` through `torch.randn_like`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

torch = pytest.importorskip("torch")
pytest.importorskip("cosyvoice")

from cosyvoice2.model import CosyVoice2, source_noise_key  # noqa: E402
from cosyvoice2.testing.official import install_shims, load_official  # noqa: E402

S = 6561
TOL = 1e-3
RATIO = 3  # max_token_text_ratio: keeps greedy decoding (which never stops) short
STEPS = 2
SEED = 7


class SpeechGreedy:
    """Ours: arg-max over the 6561 speech tokens (never a stop token, so both sides run to max_len)."""

    window = 0

    def __call__(self, logp: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return mx.argmax(logp[:S]).astype(mx.int32)


def official_speech_greedy(scores, decoded_tokens, sampling):
    return torch.tensor(int(scores[:S].argmax()))


@pytest.fixture(scope="module")
def ours(tiny_mlx_dir: Path) -> CosyVoice2:
    return CosyVoice2.load(tiny_mlx_dir)


@pytest.fixture(scope="module")
def official(tiny_official_dir: Path):
    install_shims()
    from cosyvoice.cli.model import CosyVoice2Model

    torch.set_num_threads(1)
    llm = load_official("llm", tiny_official_dir)
    llm.sampling = official_speech_greedy
    llm.inference = functools.partial(llm.inference, max_token_text_ratio=RATIO)
    model = CosyVoice2Model(
        llm, load_official("flow", tiny_official_dir), load_official("hift", tiny_official_dir)
    )
    model.llm = llm  # the wheel leaves the LLM out (MiniCPM-o edit); the official class sets it
    return model


def _wav(path: Path, seconds: float, f0: float, sr: int) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * f0 * t) * (1 + 0.4 * np.sin(2 * np.pi * 2.5 * t))
    sf.write(path, x.astype(np.float32), sr)
    return path


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory) -> Path:
    return _wav(tmp_path_factory.mktemp("p") / "prompt.wav", 1.7, 160.0, 16000)


@pytest.fixture(scope="module")
def source_wav(tmp_path_factory) -> Path:
    return _wav(tmp_path_factory.mktemp("s") / "source.wav", 1.3, 220.0, 22050)


def t(x: mx.array, dtype=None) -> torch.Tensor:
    out = torch.from_numpy(np.array(x))
    return out.to(dtype) if dtype is not None else out


def run_official(
    official, ours: CosyVoice2, seed: int, speed: float = 1.0, **model_input
) -> np.ndarray:
    """The official `tts` with our HiFT source noise injected."""
    real_randn_like = torch.randn_like

    def randn_like(x, *args, **kwargs):
        if x.dim() == 3 and x.shape[-1] == ours.config.hift.nb_harmonics + 1:
            b, n, h = x.shape
            noise = mx.random.normal((b, n, h), key=source_noise_key(seed))
            return t(noise).to(x.dtype)
        return real_randn_like(x, *args, **kwargs)

    torch.randn_like = randn_like
    try:
        with torch.inference_mode():
            out = [o["tts_speech"] for o in official.tts(**model_input, stream=False, speed=speed)]
    finally:
        torch.randn_like = real_randn_like
    return torch.cat(out, dim=1).numpy()


def compare(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.max(np.abs(a - b)))
    assert err <= TOL, f"max abs waveform difference {err:.3g} > {TOL}"


def ours_wave(it) -> np.ndarray:
    return np.concatenate([np.array(o["tts_speech"]) for o in it], axis=1)


OPTIONS = dict(sampling=SpeechGreedy(), max_token_text_ratio=RATIO, n_timesteps=STEPS, seed=SEED)
TEXT = "Good morning."


@pytest.fixture(autouse=True)
def official_steps(official, monkeypatch):
    """The official flow hard-codes 10 steps in `inference`; give its decoder our step count."""
    decoder = official.flow.decoder
    forward = type(decoder).forward
    monkeypatch.setattr(
        decoder, "forward", lambda *a, **k: forward(decoder, *a, **{**k, "n_timesteps": STEPS})
    )


def test_zero_shot(ours: CosyVoice2, official, prompt_wav: Path) -> None:
    prompt_text = "A short prompt."
    got = ours_wave(ours.inference_zero_shot(TEXT, prompt_text, prompt_wav, **OPTIONS))
    p = ours.prompt_from_wav(prompt_wav, ours.frontend.normalize_prompt_text(prompt_text))
    text = ours._text_tokens(ours.frontend.normalize_tts_text(TEXT)[0])
    want = run_official(
        official, ours, SEED,
        text=t(text, torch.int32), prompt_text=t(p.prompt_text, torch.int32),
        llm_prompt_speech_token=t(p.llm_speech_token, torch.int32),
        flow_prompt_speech_token=t(p.flow_speech_token, torch.int32),
        prompt_speech_feat=t(p.speech_feat), flow_embedding=t(p.embedding), llm_embedding=t(p.embedding),
    )  # fmt: skip
    compare(got, want)


def test_cross_lingual_and_speed(ours: CosyVoice2, official, prompt_wav: Path) -> None:
    p = ours.prompt_from_wav(prompt_wav)
    text = ours._text_tokens(ours.frontend.normalize_tts_text(TEXT)[0])
    inputs = dict(
        text=t(text, torch.int32),
        flow_prompt_speech_token=t(p.flow_speech_token, torch.int32),
        prompt_speech_feat=t(p.speech_feat), flow_embedding=t(p.embedding), llm_embedding=t(p.embedding),
    )  # fmt: skip
    compare(
        ours_wave(ours.inference_cross_lingual(TEXT, prompt_wav, **OPTIONS)),
        run_official(official, ours, SEED, **inputs),
    )
    got = ours_wave(ours.inference_cross_lingual(TEXT, prompt_wav, speed=1.3, **OPTIONS))
    compare(got, run_official(official, ours, SEED, speed=1.3, **inputs))


def test_instruct2(ours: CosyVoice2, official, prompt_wav: Path) -> None:
    instruct = "Speak slowly.<|endofprompt|>"
    got = ours_wave(ours.inference_instruct2(TEXT, instruct, prompt_wav, **OPTIONS))
    p = ours.prompt_from_wav(prompt_wav)
    text = ours._text_tokens(ours.frontend.normalize_tts_text(TEXT)[0])
    want = run_official(
        official, ours, SEED,
        text=t(text, torch.int32), prompt_text=t(ours._text_tokens(instruct), torch.int32),
        flow_prompt_speech_token=t(p.flow_speech_token, torch.int32),
        prompt_speech_feat=t(p.speech_feat), flow_embedding=t(p.embedding), llm_embedding=t(p.embedding),
    )  # fmt: skip
    compare(got, want)


def test_saved_speaker_zero_shot_and_sft(
    ours: CosyVoice2, official, prompt_wav: Path, tmp_path: Path
) -> None:
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(ours.path, model_dir)
    m = CosyVoice2.load(model_dir)
    m.add_zero_shot_spk("A short prompt.", prompt_wav, "spk1")
    m2 = CosyVoice2.load(model_dir)  # saved and reloaded
    assert m2.list_available_spks() == ["spk1"]
    direct = ours_wave(m.inference_zero_shot(TEXT, "A short prompt.", prompt_wav, **OPTIONS))
    saved = ours_wave(m2.inference_zero_shot(TEXT, "", None, zero_shot_spk_id="spk1", **OPTIONS))
    np.testing.assert_array_equal(saved, direct)  # the prefix cache changes nothing
    p = m2.prompt_from_wav(prompt_wav)
    text = m2._text_tokens(TEXT)
    want = run_official(
        official,
        ours,
        SEED,
        text=t(text, torch.int32),
        flow_embedding=t(p.embedding),
        llm_embedding=t(p.embedding),
    )
    compare(ours_wave(m2.inference_sft(TEXT, "spk1", **OPTIONS)), want)


def test_voice_conversion(ours: CosyVoice2, official, prompt_wav: Path, source_wav: Path) -> None:
    from cosyvoice2.frontend.audio import load_wav

    got = ours_wave(ours.inference_vc(source_wav, prompt_wav, **OPTIONS))
    p = ours.prompt_from_wav(prompt_wav)
    src = ours.speech_tokens(load_wav(source_wav, 16000))
    want = run_official(
        official, ours, SEED,
        source_speech_token=t(src, torch.int32), flow_prompt_speech_token=t(p.flow_speech_token, torch.int32),
        prompt_speech_feat=t(p.speech_feat), flow_embedding=t(p.embedding),
    )  # fmt: skip
    compare(got, want)


def test_same_seed_same_audio_and_seed_matters(ours: CosyVoice2, prompt_wav: Path) -> None:
    a = ours.generate(
        TEXT,
        ref_audio=prompt_wav,
        ref_text="A short prompt.",
        n_timesteps=1,
        seed=3,
        max_token_text_ratio=RATIO,
    )
    b = ours.generate(
        TEXT,
        ref_audio=prompt_wav,
        ref_text="A short prompt.",
        n_timesteps=1,
        seed=3,
        max_token_text_ratio=RATIO,
    )
    c = ours.generate(
        TEXT,
        ref_audio=prompt_wav,
        ref_text="A short prompt.",
        n_timesteps=1,
        seed=4,
        max_token_text_ratio=RATIO,
    )
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
