"""Synthesis of a set: per-utterance cache, resume, failures kept, settings guarded."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eval.datasets import TestSet, Utterance
from eval.synth import (
    CopySynthesizer,
    CosyVoice2Synthesizer,
    SynthRun,
    synthesize_set,
    utterance_seed,
    weights_label,
)

sf = pytest.importorskip("soundfile")
pytest.importorskip("tqdm")


def _tone(path: Path, freq: float, seconds: float = 0.25, sr: int = 16000) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


@pytest.fixture
def small_set(tmp_path: Path) -> TestSet:
    utts = []
    for i, freq in enumerate((200.0, 300.0, 450.0)):
        wav = _tone(tmp_path / f"p{i}.wav", freq, seconds=0.2 + 0.1 * i)
        utts.append(Utterance(f"u{i}", wav.resolve(), f"prompt {i}", f"target {i}", "en"))
    return TestSet("small", tmp_path, "test", tuple(utts))


class Counting:
    """Copy synthesis that counts calls and can be told to fail on some ids' texts."""

    def __init__(self, fail_on: set[str] | None = None, tag: str = "a") -> None:
        self.calls: list[str] = []
        self.fail_on = fail_on or set()
        self.tag = tag

    def __call__(self, target_text: str, prompt_wav: Path, prompt_text: str):
        self.calls.append(target_text)
        if target_text in self.fail_on:
            raise RuntimeError(f"boom on {target_text}")
        return CopySynthesizer()(target_text, prompt_wav, prompt_text)

    def describe(self) -> dict[str, Any]:
        return {"tts": "counting", "tag": self.tag, "weights": "none"}


def test_cache_and_resume(small_set: TestSet, tmp_path: Path) -> None:
    out = tmp_path / "out"
    synth = Counting()
    run = synthesize_set(small_set, synth, out, progress=False)
    assert synth.calls == ["target 0", "target 1", "target 2"]
    assert not run.failed()
    # the cached audio is the prompt (copy synthesis), at its rate and length
    for u in small_set:
        wav, sr = sf.read(str(run.wav_path(u.id)), dtype="float32")
        ref, ref_sr = sf.read(str(u.prompt_wav), dtype="float32")
        assert sr == ref_sr and wav.shape == ref.shape
        assert np.max(np.abs(wav - ref)) < 1.0 / 32767 + 1e-7  # 16-bit PCM rounding
        assert run.entries[u.id].duration_s == pytest.approx(len(ref) / ref_sr)

    # a second run with the same settings synthesises nothing
    again = Counting()
    synthesize_set(small_set, again, out, progress=False)
    assert again.calls == []

    # a lost wav is made again, and only that one
    (out / "wavs" / "u1.wav").unlink()
    third = Counting()
    synthesize_set(small_set, third, out, progress=False)
    assert third.calls == ["target 1"]

    # a changed target text is a new request
    changed = list(small_set.utterances)
    changed[2] = Utterance("u2", changed[2].prompt_wav, "prompt 2", "new target", "en")
    fourth = Counting()
    synthesize_set(
        TestSet("small", small_set.source, "test", tuple(changed)), fourth, out, progress=False
    )
    assert fourth.calls == ["new target"]
    assert SynthRun.load(out).entries["u2"].target_text == "new target"


def test_failures_are_kept_and_retried(small_set: TestSet, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = synthesize_set(small_set, Counting(fail_on={"target 1"}), out, progress=False)
    failed = run.failed()
    assert [e.id for e in failed] == ["u1"]
    assert failed[0].error == "RuntimeError: boom on target 1"
    assert run.wav_path("u1") is None and run.wav_path("u0") is not None
    # the manifest on disk says the same, in set order
    data = json.loads((out / "manifest.json").read_text())
    assert [e["id"] for e in data["utterances"]] == ["u0", "u1", "u2"]
    assert data["utterances"][1]["error"] == "RuntimeError: boom on target 1"
    # the next run retries only the failed one
    fixed = Counting()
    run = synthesize_set(small_set, fixed, out, progress=False)
    assert fixed.calls == ["target 1"] and not run.failed()


def test_other_settings_are_refused(small_set: TestSet, tmp_path: Path) -> None:
    out = tmp_path / "out"
    synthesize_set(small_set, Counting(tag="a"), out, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        synthesize_set(small_set, Counting(tag="b"), out, progress=False)
    other = Counting(tag="b")
    run = synthesize_set(small_set, other, out, overwrite=True, progress=False)
    assert len(other.calls) == 3 and run.settings["tag"] == "b"


def test_bad_audio_is_a_failure(small_set: TestSet, tmp_path: Path) -> None:
    class Bad:
        def __call__(self, target_text, prompt_wav, prompt_text):
            if target_text == "target 0":
                return np.zeros((2, 10), np.float32), 16000
            return np.array([0.0, np.nan], np.float32), 16000

        def describe(self):
            return {"tts": "bad"}

    run = synthesize_set(small_set, Bad(), tmp_path / "out", progress=False)
    errors = {e.id: e.error for e in run.failed()}
    assert errors["u0"] == "ValueError: synthesizer returned audio of shape (2, 10)"
    assert errors["u1"] == "ValueError: synthesizer returned non-finite samples"


class FakeModel:
    """Stands in for a loaded cosyvoice2 model (`generate` as in `cosyvoice2.model`): records calls."""

    sample_rate = 24000

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def generate(self, text, ref_audio=None, ref_text=None, speaker=None, instruct=None, **options):
        self.calls.append(dict(text=text, ref_audio=ref_audio, ref_text=ref_text, **options))
        return np.full(2400, 0.1, np.float32)


def test_cosyvoice2_adapter_passes_settings(
    small_set: TestSet, tmp_path: Path, monkeypatch
) -> None:
    cosyvoice2 = pytest.importorskip("cosyvoice2")
    model = FakeModel()
    loads: list[tuple] = []

    def fake_load(path, **kwargs):
        loads.append((path, kwargs))
        return model

    monkeypatch.setattr(cosyvoice2, "load", fake_load, raising=False)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "synthetic.json").write_text(json.dumps({"weights": "synthetic"}))
    synth = CosyVoice2Synthesizer(model_dir, precision="8bit", n_timesteps=4, seed=7)
    run = synthesize_set(small_set, synth, tmp_path / "out", progress=False)
    assert not run.failed()
    assert loads == [(str(model_dir), {"llm_bits": 8})]  # loaded once
    assert [c["n_timesteps"] for c in model.calls] == [4, 4, 4]
    assert [c["seed"] for c in model.calls] == [utterance_seed(7, u.id) for u in small_set]
    assert model.calls[1]["ref_audio"] == str(small_set.utterances[1].prompt_wav)
    assert model.calls[1]["ref_text"] == "prompt 1" and model.calls[1]["text"] == "target 1"
    assert run.settings == {
        "tts": "cosyvoice2-mlx",
        "model_dir": str(model_dir.resolve()),
        "weights": "synthetic",
        "precision": "8bit",
        "n_timesteps": 4,
        "seed": 7,
    }
    assert run.entries["u0"].sample_rate == 24000 and run.entries["u0"].duration_s == 0.1


def test_cosyvoice2_adapter_without_model_api(
    small_set: TestSet, tmp_path: Path, monkeypatch
) -> None:
    # A package without `load` (or none at all): each utterance fails with a clear reason.
    import types

    monkeypatch.setitem(sys.modules, "cosyvoice2", types.ModuleType("cosyvoice2"))
    run = synthesize_set(
        small_set, CosyVoice2Synthesizer(tmp_path, n_timesteps=10), tmp_path / "out", progress=False
    )
    assert len(run.failed()) == 3
    assert "cosyvoice2.load is not available" in run.failed()[0].error


def test_precision_names() -> None:
    from eval.synth import precision_kwargs

    assert precision_kwargs(None) == {}
    assert precision_kwargs("fp32") == {"llm_dtype": "float32"}
    assert precision_kwargs("bf16") == {"llm_dtype": "bfloat16"}
    assert precision_kwargs("4bit") == {"llm_bits": 4}
    with pytest.raises(ValueError, match="unknown precision"):
        precision_kwargs("int3")


def test_weights_label_and_seed(tmp_path: Path) -> None:
    assert weights_label(tmp_path) == "unknown"
    (tmp_path / "config.json").write_text(json.dumps({"weights": "synthetic", "x": 1}))
    assert weights_label(tmp_path) == "synthetic"
    assert utterance_seed(0, "a") == utterance_seed(0, "a") != utterance_seed(1, "a")
    assert 0 <= utterance_seed(123, "x") < 2**31
