"""The public API on the tiny MLX model: every official name imported and called, the keyword
options checked (an unknown one is an error, every valid one is accepted), and the timing hook.

No comparison with the official code here (the parity tests do that): these tests pin
the names, the argument order and the shape of what each call returns.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

import cosyvoice2
from cosyvoice2.errors import InputError
from cosyvoice2.model import CosyVoice2
from cosyvoice2.options import OptionError, SynthesisOptions
from cosyvoice2.streaming import StreamSchedule, Timings

TEXT = "Hello there."
PROMPT_TEXT = "A short prompt."
FAST = dict(n_timesteps=1, max_tokens=30)  # the tiny random LLM would run to its length limit

# The official generator names and their arguments, in order (ours take `**options` after them).
SIGNATURES = {
    "inference_zero_shot": ["tts_text", "prompt_text", "prompt_wav", "zero_shot_spk_id",
                            "stream", "speed", "text_frontend"],
    "inference_cross_lingual": ["tts_text", "prompt_wav", "zero_shot_spk_id", "stream", "speed",
                                "text_frontend"],
    "inference_instruct2": ["tts_text", "instruct_text", "prompt_wav", "zero_shot_spk_id",
                            "stream", "speed", "text_frontend"],
    "inference_sft": ["tts_text", "spk_id", "stream", "speed", "text_frontend"],
    "inference_vc": ["source_wav", "prompt_wav", "stream", "speed"],
    "inference_bistream": ["text", "prompt_text", "prompt_wav", "zero_shot_spk_id", "stream",
                           "text_frontend"],
    "generate": ["text", "ref_audio", "ref_text", "speaker", "instruct"],
    "add_zero_shot_spk": ["prompt_text", "prompt_wav", "zero_shot_spk_id"],
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(mlx_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("api") / "model"
    shutil.copytree(mlx_tiny_dir, d)
    return d


@pytest.fixture(scope="module")
def model(model_dir: Path) -> CosyVoice2:
    return cosyvoice2.load(model_dir)


@pytest.fixture(scope="module")
def wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wav") / "prompt.wav"
    t = np.arange(int(2.0 * 16000)) / 16000
    x = 0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(path, x.astype(np.float32), 16000)
    return path


def audio(items) -> list[np.ndarray]:
    out = []
    for item in items:
        speech = item["tts_speech"]
        assert isinstance(speech, mx.array) and speech.ndim == 2 and speech.shape[0] == 1
        assert speech.shape[1] > 0
        out.append(np.array(speech).reshape(-1))
    assert out
    return out


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_signatures(name: str) -> None:
    params = list(inspect.signature(getattr(CosyVoice2, name)).parameters.values())[1:]
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == SIGNATURES[name]


def test_every_official_name(model: CosyVoice2, wav: Path) -> None:
    assert cosyvoice2.load is not None and callable(cosyvoice2.model.load)
    assert model.add_zero_shot_spk(PROMPT_TEXT, wav, "spk") is True
    assert model.list_available_spks() == ["spk"]
    audio(model.inference_zero_shot(TEXT, PROMPT_TEXT, wav, **FAST))
    audio(model.inference_zero_shot(TEXT, "", None, "spk", stream=True, **FAST))
    audio(model.inference_cross_lingual(TEXT, wav, **FAST))
    audio(model.inference_instruct2(TEXT, "Speak slowly.", wav, **FAST))
    audio(model.inference_sft(TEXT, "spk", **FAST))
    audio(model.inference_vc(wav, wav, n_timesteps=1))
    audio(model.inference_bistream(iter(["Hello ", "there."]), PROMPT_TEXT, wav, **FAST))
    model.prepare_speaker("spk", n_timesteps=1)
    y = model.generate(TEXT, ref_audio=wav, ref_text=PROMPT_TEXT, **FAST)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.ndim == 1 and y.size > 0


CALLS = {
    "generate": lambda m, w, **o: m.generate(TEXT, ref_audio=w, ref_text=PROMPT_TEXT, **o),
    "inference_zero_shot": lambda m, w, **o: list(m.inference_zero_shot(TEXT, PROMPT_TEXT, w, **o)),
    "inference_cross_lingual": lambda m, w, **o: list(m.inference_cross_lingual(TEXT, w, **o)),
    "inference_instruct2": lambda m, w, **o: list(m.inference_instruct2(TEXT, "Be calm.", w, **o)),
    "inference_sft": lambda m, w, **o: list(m.inference_sft(TEXT, "spk", **o)),
    "inference_vc": lambda m, w, **o: list(m.inference_vc(w, w, **o)),
    "inference_bistream": lambda m, w, **o: list(m.inference_bistream([TEXT], PROMPT_TEXT, w, **o)),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_unknown_option_is_an_error(model: CosyVoice2, wav: Path, name: str) -> None:
    """A misspelt option fails before any work, naming it, the close valid one and the others."""
    with pytest.raises(OptionError) as err:
        CALLS[name](model, wav, n_timestep=5)
    msg = str(err.value)
    assert "'n_timestep'" in msg and "did you mean 'n_timesteps'" in msg
    assert all(f.name in msg for f in dataclasses.fields(SynthesisOptions))
    assert isinstance(err.value, TypeError) and isinstance(err.value, InputError)


def test_generate_n_timestep_typo_raises(model: CosyVoice2, wav: Path) -> None:
    with pytest.raises(TypeError, match="unknown option 'n_timestep'"):
        model.generate(TEXT, ref_audio=wav, ref_text=PROMPT_TEXT, n_timestep=5)


def test_bad_option_values() -> None:
    with pytest.raises(OptionError, match="n_timesteps"):
        SynthesisOptions.of(n_timesteps=0)
    with pytest.raises(InputError, match="speed must be between"):
        SynthesisOptions.of(speed=5.0)
    with pytest.raises(OptionError, match="schedule"):
        SynthesisOptions.of(schedule={"token_hop_len": 10})
    with pytest.raises(dataclasses.FrozenInstanceError):
        SynthesisOptions().seed = 3  # type: ignore[misc]


def test_every_valid_option_is_accepted(model: CosyVoice2, wav: Path) -> None:
    """Every `SynthesisOptions` field given at once, whole and streamed; each takes effect."""
    from cosyvoice2.llm import default_sampler

    progress: list[tuple[int, int]] = []
    every = dict(
        seed=3,
        n_timesteps=1,
        speed=1.25,
        sampling=default_sampler(model.config.llm),
        max_token_text_ratio=20,
        min_token_text_ratio=1,
        max_tokens=40,
        schedule=StreamSchedule(first_hop_len=10),
        timings=Timings(),
        progress=lambda i, n, segment: progress.append((i, n)),
    )
    assert set(every) == {f.name for f in dataclasses.fields(SynthesisOptions)}
    whole = model.generate(TEXT, ref_audio=wav, ref_text=PROMPT_TEXT, **every)
    assert progress == [(0, 1)]
    assert set(every["timings"].stages) == {"flow", "hift"}
    # max_tokens caps the speech tokens (2 mel frames of 480 samples each), speed shortens
    assert 0 < whole.size <= int(40 * 2 / 1.25) * 480
    streamed = {**every, "speed": 1.0, "timings": Timings()}
    chunks = audio(model.inference_zero_shot(TEXT, PROMPT_TEXT, wav, stream=True, **streamed))
    assert sum(c.size for c in chunks) <= 40 * 960
    assert set(streamed["timings"].stages) == {"flow", "hift"}


class Recorder:
    """A timing hook recording its stages; checks that the stage's work is evaluated inside it."""

    def __init__(self):
        self.stages: list[str] = []
        self.events: list[str] = []
        self.open: str | None = None

    def mark(self, event: str, **info) -> None:
        assert self.open is None
        self.events.append(event)

    def stage(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.open = name
            try:
                yield
            finally:
                self.open = None
                self.stages.append(name)

        return ctx()


@pytest.mark.parametrize("stream", [False, True])
def test_engine_reports_its_stages_to_the_timing_hook(model: CosyVoice2, stream: bool) -> None:
    from cosyvoice2.model import Prompt

    rng = np.random.default_rng(0)
    tok = mx.array(rng.integers(0, 6561, (1, 20)), dtype=mx.int32)
    prompt = Prompt(
        mx.array(rng.standard_normal((1, 192)).astype(np.float32)),
        mx.zeros((1, 0), dtype=mx.int32),
        tok,
        tok,
        mx.array(rng.standard_normal((1, 40, 80)).astype(np.float32)),
    )
    tokens = [int(t) for t in rng.integers(0, 6561, 60)]
    hook = Recorder()
    sched = StreamSchedule(first_hop_len=10, overlap_llm=False)
    out = list(
        model.token2wav_stream(
            iter(tokens), prompt, stream, 1.0, n_timesteps=1, timings=hook, schedule=sched
        )
    )
    assert len(out) == (4 if stream else 1)
    assert hook.stages == ["flow", "hift"] * len(out)
    assert hook.events[0] == "first_token" and hook.events.count("audio") == len(out)
