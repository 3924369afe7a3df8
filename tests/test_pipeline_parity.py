"""End to end per mode: ours against the official code from the same wav and text.

Official side: the wheel's `CosyVoice2.inference_*` (cli/cosyvoice.py) with the
official `CosyVoiceFrontEnd` (`official_frontend`, see tests/test_frontend_parity.py
for its shims) and the official `CosyVoice2Model.tts` over the official LLM, flow
and HiFT built from the tiny synthetic dir; the prompt read by the wheel's
`load_wav(path, 16000)`. Ours: `CosyVoice2.inference_*` from the wav path.

Pinned on both sides: greedy decoding over the 6561 speech tokens (it never picks
the stop token, so both run to `max_token_text_ratio` times the text length), 2
flow steps with the official fixed CFM noise, and the same HiFT source noise
(ours from the request seed, injected into the official `SineGen2` through
`torch.randn_like`). Each text is one segment.

The speech LM's backbone is rescaled identically on both sides (the same float32
arrays): its linear weights become N(0, (0.7 / sqrt(fan_in))^2), as in
tests/test_llm.py. With the official initialisation (std 0.02) the backbone barely
moves the logits, so greedy decoding ignores the prompt: dropping the prompt
transcript or shifting the prompt speech tokens left the speech tokens, and so the
waveform, unchanged, and no LLM-side bug could fail this test.

Measure: max abs waveform difference <= 1e-3 (a length difference fails). Before
comparing, the reference must look like speech audio: RMS in [0.01, 0.5], peak in
[0.05, 0.99] and under 1% of samples at |x| >= 0.99 (HiFT clamps at 0.99, so a
saturated random-weight waveform would hide errors). Each mode has a power check:
one small bug in our pipeline, the same comparison then fails by >= 10x.
"""

from __future__ import annotations

import functools
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tests.official import need_official_frontend

torch = need_official_frontend()

import cosyvoice2.engine as engine_mod  # noqa: E402
from cosyvoice2.model import ENDOFPROMPT, CosyVoice2, source_noise_key  # noqa: E402
from cosyvoice2_testing.official import (  # noqa: E402
    install_shims,
    load_official,
    official_cosyvoice2,
    official_frontend,
)
from tests.power import assert_power, patched, wrapped  # noqa: E402
from tests.test_frontend_parity import speechlike_wav  # noqa: E402

S = 6561
TOL = 1e-3
RATIO = 3  # max_token_text_ratio: keeps greedy decoding (which never stops) short
STEPS = 2
SEED = 7
RMS_BAND = (0.01, 0.5)
PEAK_BAND = (0.05, 0.99)
MAX_CLIPPED = 0.01
TEXT = "Good morning, how are you today?"
PROMPT_TEXT = "A short prompt, recorded on May 3rd."
INSTRUCT = "Please speak slowly and softly, like a storyteller at night."


class SpeechGreedy:
    """Ours: arg-max over the 6561 speech tokens (never a stop token, so both sides run to max_len)."""

    window = 0

    def __call__(self, logp: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return mx.argmax(logp[:S]).astype(mx.int32)


def official_speech_greedy(scores, decoded_tokens, sampling):
    return torch.tensor(int(scores[:S].argmax()))


OPTIONS = dict(sampling=SpeechGreedy(), max_token_text_ratio=RATIO, n_timesteps=STEPS, seed=SEED)
BACKBONE_SCALE = 0.7


def backbone_factor(fan_in: int) -> np.float32:
    """From the official initialisation (std 0.02) to std BACKBONE_SCALE / sqrt(fan_in)."""
    return np.float32(BACKBONE_SCALE / 0.02 / np.sqrt(fan_in))


@pytest.fixture(scope="module")
def scaled_backbone(tiny_mlx_dir: Path, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Our model dir with the LLM backbone rescaled (see the module docstring), and the
    rescaled arrays by MLX name (`llm.layers.N.<linear>.weight`)."""
    out = tmp_path_factory.mktemp("scaled") / "tiny"
    out.mkdir()
    for f in tiny_mlx_dir.iterdir():
        if f.name != "llm.safetensors":
            (out / f.name).symlink_to(f)
    weights = mx.load(str(tiny_mlx_dir / "llm.safetensors"))
    scaled = {}
    for name, w in weights.items():
        if name.startswith("llm.layers.") and name.endswith(".weight") and "norm" not in name:
            a = np.array(w)
            scaled[name] = a * backbone_factor(a.shape[-1])
    assert len(scaled) == 7 * len({n.split(".")[2] for n in scaled})  # q k v o gate up down
    mx.save_safetensors(
        str(out / "llm.safetensors"), {**weights, **{k: mx.array(v) for k, v in scaled.items()}}
    )
    return out, scaled


@pytest.fixture(scope="module")
def ours(scaled_backbone) -> CosyVoice2:
    return CosyVoice2.load(scaled_backbone[0], text_backend="wetext")


@pytest.fixture(scope="module")
def official(tiny_official_dir: Path, scaled_backbone):
    """The official `CosyVoice2` object: official frontend, official `CosyVoice2Model`."""
    install_shims()
    from cosyvoice.cli.model import CosyVoice2Model

    torch.set_num_threads(1)
    llm = load_official("llm", tiny_official_dir)
    state = llm.state_dict()
    with torch.no_grad():
        for name, a in scaled_backbone[1].items():
            w = state["llm.model.model." + name.removeprefix("llm.")]
            assert np.array_equal(w.numpy() * backbone_factor(w.shape[-1]), a), name
            w.copy_(torch.from_numpy(a))
    llm.sampling = official_speech_greedy
    llm.inference = functools.partial(llm.inference, max_token_text_ratio=RATIO)
    model = CosyVoice2Model(
        llm, load_official("flow", tiny_official_dir), load_official("hift", tiny_official_dir)
    )
    model.llm = llm  # the wheel leaves the LLM out (MiniCPM-o edit); the official class sets it
    # the official flow hard-codes 10 steps in `inference`: give its decoder our step count
    decoder = model.flow.decoder
    forward = type(decoder).forward
    decoder.forward = lambda *a, **k: forward(decoder, *a, **{**k, "n_timesteps": STEPS})
    return official_cosyvoice2(official_frontend(tiny_official_dir), model)


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory) -> Path:
    return speechlike_wav(tmp_path_factory.mktemp("p") / "prompt.wav", 1.7, 16000, 140.0, 0)


@pytest.fixture(scope="module")
def source_wav(tmp_path_factory) -> Path:
    return speechlike_wav(tmp_path_factory.mktemp("s") / "source.wav", 1.3, 22050, 210.0, 1)


def load_16k(path: Path) -> torch.Tensor:
    from cosyvoice.utils.file_utils import load_wav

    return load_wav(str(path), 16000)


def run_official(official, ours: CosyVoice2, method: str, *args, **kwargs) -> np.ndarray:
    """`official.method(*args, **kwargs)` (one text segment) with our HiFT source noise injected."""
    harmonics = ours.config.hift.nb_harmonics + 1
    real_randn_like = torch.randn_like

    def randn_like(x, *a, **k):
        if x.dim() == 3 and x.shape[-1] == harmonics:
            noise = mx.random.normal(tuple(x.shape), key=source_noise_key(SEED))
            return torch.from_numpy(np.array(noise)).to(x.dtype)
        return real_randn_like(x, *a, **k)

    torch.randn_like = randn_like
    try:
        with torch.inference_mode():
            out = [o["tts_speech"] for o in getattr(official, method)(*args, **kwargs)]
    finally:
        torch.randn_like = real_randn_like
    assert len(out) == 1, f"{len(out)} segments: the noise injection assumes one"
    return torch.cat(out, dim=1).numpy()


def ours_wave(model: CosyVoice2, method: str, *args, **kwargs) -> np.ndarray:
    it = getattr(model, method)(*args, **OPTIONS, **kwargs)
    return np.concatenate([np.array(o["tts_speech"]) for o in it], axis=1)


def check_realistic(wav: np.ndarray) -> None:
    """The reference looks like speech audio (see the module docstring)."""
    x = wav.reshape(-1).astype(np.float64)
    rms, peak = float(np.sqrt(np.mean(x**2))), float(np.abs(x).max())
    clipped = float(np.mean(np.abs(x) >= 0.99))
    print(
        f"[reference] {x.size / 24000:.2f} s, RMS {rms:.3g}, peak {peak:.3g}, clipped {clipped:.2%}"
    )
    assert x.size >= 0.5 * 24000, f"reference of {x.size} samples: too short to judge"
    assert RMS_BAND[0] <= rms <= RMS_BAND[1], f"reference RMS {rms:.3g} outside {RMS_BAND}"
    assert PEAK_BAND[0] <= peak <= PEAK_BAND[1], f"reference peak {peak:.3g} outside {PEAK_BAND}"
    assert clipped < MAX_CLIPPED, f"{clipped:.2%} of the reference at |x| >= 0.99"


def wave_error(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return float("inf")
    return float(np.max(np.abs(got - want)))


def power(name: str, ours_fn, want: np.ndarray, bug, bug_name: str) -> None:
    assert_power(
        f"{name} waveform vs official", lambda: wave_error(ours_fn(), want), TOL, bug, bug_name
    )


# ----------------------------------------------------------------------------- the modes


@pytest.fixture(scope="module")
def zero_shot_ref(official, ours, prompt_wav) -> np.ndarray:
    want = run_official(
        official, ours, "inference_zero_shot", TEXT, PROMPT_TEXT, load_16k(prompt_wav)
    )
    check_realistic(want)
    return want


def test_zero_shot(route, scaled_backbone, zero_shot_ref, prompt_wav) -> None:
    """On every route (our model loaded inside it, so the LLM gets that route's layers)."""
    model = CosyVoice2.load(scaled_backbone[0], text_backend="wetext")
    prompt_from_wav = CosyVoice2.prompt_from_wav

    def llm_prompt_offset(self, *a, **k):
        p = prompt_from_wav(self, *a, **k)
        p.llm_speech_token = p.llm_speech_token[:, 1:]
        return p

    power(
        f"zero-shot ({route} route)",
        lambda: ours_wave(model, "inference_zero_shot", TEXT, PROMPT_TEXT, prompt_wav),
        zero_shot_ref,
        patched(model, "prompt_from_wav", llm_prompt_offset.__get__(model)),
        "LLM prompt speech tokens offset by one",
    )


def test_cross_lingual_and_speed(ours, official, prompt_wav) -> None:
    """Speed 1.3: the official linear interpolation of the mel (`align_corners=False`)."""
    want = run_official(official, ours, "inference_cross_lingual", TEXT, load_16k(prompt_wav))
    check_realistic(want)
    assert wave_error(ours_wave(ours, "inference_cross_lingual", TEXT, prompt_wav), want) <= TOL
    want = run_official(
        official, ours, "inference_cross_lingual", TEXT, load_16k(prompt_wav), speed=1.3
    )
    check_realistic(want)

    def nearest(x: mx.array, size: int) -> mx.array:
        t = x.shape[-1]
        return x[..., mx.floor(mx.arange(size, dtype=mx.float32) * (t / size)).astype(mx.int32)]

    power(
        "cross-lingual, speed 1.3",
        lambda: ours_wave(ours, "inference_cross_lingual", TEXT, prompt_wav, speed=1.3),
        want,
        patched(engine_mod, "interpolate_linear", nearest),
        "speed change by nearest-neighbour interpolation (F.interpolate's default mode)",
    )


def test_instruct2(ours, official, prompt_wav) -> None:
    """The wheel appends `<|endofprompt|>` to the instruction; so does ours when it is missing."""
    want = run_official(official, ours, "inference_instruct2", TEXT, INSTRUCT, load_16k(prompt_wav))
    check_realistic(want)

    def instruction_dropped(orig):
        return lambda self, text: orig(self, ENDOFPROMPT if text.endswith(ENDOFPROMPT) else text)

    power(
        "instruct2",
        lambda: ours_wave(ours, "inference_instruct2", TEXT, INSTRUCT, prompt_wav),
        want,
        wrapped(CosyVoice2, "_text_tokens", instruction_dropped),
        "instruction dropped (only <|endofprompt|>)",
    )


def test_saved_speaker_zero_shot_and_sft(ours, official, prompt_wav, tmp_path) -> None:
    """A speaker saved from the same wav and transcript on both sides (official:
    `add_zero_shot_spk`, its entry's x-vector also under `embedding`, which `frontend_sft`
    reads); the transcript is one normalisation leaves unchanged (the wheel stores it as
    given, ours normalised)."""
    import copy
    import shutil

    fe = copy.copy(official.frontend)
    fe.spk2info = {}
    saved_official = official_cosyvoice2(fe, official.model)
    assert saved_official.add_zero_shot_spk("A short prompt.", load_16k(prompt_wav), "spk1")
    fe.spk2info["spk1"]["embedding"] = fe.spk2info["spk1"]["flow_embedding"]
    model_dir = tmp_path / "m"
    shutil.copytree(ours.path, model_dir)
    CosyVoice2.load(model_dir).add_zero_shot_spk("A short prompt.", prompt_wav, "spk1")
    m = CosyVoice2.load(model_dir, text_backend="wetext")  # saved and reloaded
    assert m.list_available_spks() == ["spk1"]

    want = run_official(saved_official, ours, "inference_zero_shot", TEXT, "", "", "spk1")
    check_realistic(want)
    direct = ours_wave(m, "inference_zero_shot", TEXT, "A short prompt.", prompt_wav)
    saved = ours_wave(m, "inference_zero_shot", TEXT, "", None, zero_shot_spk_id="spk1")
    np.testing.assert_array_equal(saved, direct)  # the prefix cache changes nothing
    assert wave_error(saved, want) <= TOL

    want = run_official(saved_official, ours, "inference_sft", TEXT, "spk1")
    check_realistic(want)
    power(
        "SFT (saved speaker)",
        lambda: ours_wave(m, "inference_sft", TEXT, "spk1"),
        want,
        patched(m.flow, "speaker", lambda emb: m.flow.spk_embed_affine_layer(emb)),
        "x-vector not L2-normalised before the flow's projection",
    )


def test_voice_conversion(ours, official, prompt_wav, source_wav) -> None:
    """The official `frontend_vc` keeps the prompt mel and tokens as extracted (not cut to 2
    frames per token as in the other modes): here 85 frames for 43 tokens, so the flow
    yields one frame more than 2 per source token. The second power check cuts them as
    the other modes do."""
    from cosyvoice2.frontend import audio

    want = run_official(official, ours, "inference_vc", load_16k(source_wav), load_16k(prompt_wav))
    check_realistic(want)
    load_wav = audio.load_wav

    def peak_normalised(path, sr):
        x = load_wav(path, sr)
        return x / np.abs(x).max() * 0.95

    power(
        "VC",
        lambda: ours_wave(ours, "inference_vc", source_wav, prompt_wav),
        want,
        patched(audio, "load_wav", peak_normalised),
        "source peak-normalised before its speech tokens",
    )
    power(
        "VC",
        lambda: ours_wave(ours, "inference_vc", source_wav, prompt_wav),
        want,
        wrapped(
            CosyVoice2,
            "prompt_from_wav",
            lambda o: lambda self, *a, **k: o(self, *a, **{**k, "align": True}),
        ),
        "prompt cut to 2 mel frames per token (waveform one mel frame short: inf)",
    )


def test_same_seed_same_audio_and_seed_matters(ours: CosyVoice2, prompt_wav: Path) -> None:
    kw = dict(ref_audio=prompt_wav, ref_text="A short prompt.", n_timesteps=1)
    a = ours.generate("Good morning.", seed=3, max_token_text_ratio=RATIO, **kw)
    b = ours.generate("Good morning.", seed=3, max_token_text_ratio=RATIO, **kw)
    c = ours.generate("Good morning.", seed=4, max_token_text_ratio=RATIO, **kw)
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
