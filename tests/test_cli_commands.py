"""The `cosyvoice2` commands beyond `synth`'s basics, end to end on the tiny model: `sft`,
`vc`, stream settings, precision at load, `--out -`, `--stt-model`, the cross-lingual
notice and mlx-audio's flag names."""

from __future__ import annotations

import io
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cosyvoice2.cli import main
from tests.test_cli import PROMPT_TEXT, run, synth_args


@pytest.fixture(scope="module")
def model_with_speaker(
    mlx_tiny_dir: Path, prompt_wav: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    model = tmp_path_factory.mktemp("cli") / "model"
    shutil.copytree(mlx_tiny_dir, model)
    code = main(["speakers", "add", "--model", str(model), "--id", "amy", "--prompt-wav",
                 str(prompt_wav), "--prompt-text", PROMPT_TEXT])  # fmt: skip
    assert code == 0
    return model


def _audio(path: Path) -> np.ndarray:
    data, sr = sf.read(path, dtype="float32")
    assert sr == 24000
    return data


def test_sft_speaks_in_a_saved_voice(model_with_speaker: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sft.wav"
    code, err = run(["sft", "--model", model_with_speaker, "--text", "Hello there.", "--speaker",
                     "amy", "--out", out, "--steps", 2, "--quiet"], capsys)  # fmt: skip
    assert code == 0, err
    assert _audio(out).shape[0] > 0
    code, err = run(["sft", "--model", model_with_speaker, "--text", "Hi.", "--speaker", "bob",
                     "--out", tmp_path / "x.wav"], capsys)  # fmt: skip
    assert code == 2 and "bob" in err and not (tmp_path / "x.wav").exists()


def test_vc_converts_a_source_wav(
    mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsys
) -> None:
    source = tmp_path / "source.wav"
    t = np.arange(16000 * 2) / 16000
    sf.write(source, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    out = tmp_path / "vc.wav"
    code, err = run(["vc", "--model", mlx_tiny_dir, "--source-wav", source, "--prompt-wav",
                     prompt_wav, "--out", out, "--steps", 2, "--quiet"], capsys)  # fmt: skip
    assert code == 0, err
    # 2 s of source speech tokens (25 Hz) become about 2 s of audio
    assert abs(_audio(out).shape[0] / 24000 - 2.0) < 0.2


def test_first_hop_sets_the_first_chunk(
    mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """`--first-hop` reaches the stream schedule: the first chunk it writes is shorter."""
    from cosyvoice2.cli import AudioWriter

    chunks: list[int] = []
    write = AudioWriter.write
    monkeypatch.setattr(
        AudioWriter, "write", lambda self, a: (chunks.append(a.size), write(self, a))[1]
    )
    text = "Hello there, this is a longer sentence so that the stream has several chunks."
    base = [*synth_args(mlx_tiny_dir, tmp_path / "a.wav", prompt_wav, text), "--stream"]
    assert run(base, capsys)[0] == 0
    official = list(chunks)
    chunks.clear()
    base[base.index(tmp_path / "a.wav")] = tmp_path / "b.wav"
    assert run([*base, "--first-hop", 5], capsys)[0] == 0
    assert len(official) > 1 and chunks[0] < official[0]
    code, err = run(
        [*synth_args(mlx_tiny_dir, tmp_path / "c.wav", prompt_wav), "--first-hop", 5], capsys
    )
    assert code == 2 and "--stream" in err and not (tmp_path / "c.wav").exists()
    code, err = run([*base, "--first-hop", 0], capsys)
    assert code == 2 and "--first-hop" in err


def test_precision_at_load(
    mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import cosyvoice2

    seen = {}
    load = cosyvoice2.load
    monkeypatch.setattr(cosyvoice2, "load", lambda p, **kw: (seen.update(kw), load(p, **kw))[1])
    out = tmp_path / "q.wav"
    code, err = run([*synth_args(mlx_tiny_dir, out, prompt_wav), "--llm-bits", 8], capsys)
    assert code == 0, err
    assert seen == {"llm_bits": 8} and _audio(out).shape[0] > 0


def _wav_header(data: bytes) -> tuple[int, int, int]:
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and data[36:40] == b"data"
    riff, rate, data_len = (
        struct.unpack("<I", data[4:8])[0],
        struct.unpack("<I", data[24:28])[0],
        struct.unpack("<I", data[40:44])[0],
    )
    return riff, rate, data_len


def test_out_dash_writes_a_wav_to_stdout(
    mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsysbinary
) -> None:
    file_out = tmp_path / "f.wav"
    assert main([str(a) for a in synth_args(mlx_tiny_dir, file_out, prompt_wav)]) == 0
    capsysbinary.readouterr()
    assert main([str(a) for a in synth_args(mlx_tiny_dir, "-", prompt_wav)]) == 0
    captured = capsysbinary.readouterr()
    riff, rate, n = _wav_header(captured.out)
    assert rate == 24000 and n == len(captured.out) - 44 and riff == n + 36
    assert np.array_equal(sf.read(io.BytesIO(captured.out), dtype="int16")[0],
                          sf.read(file_out, dtype="int16")[0])  # fmt: skip
    assert b"wrote standard output" in captured.err

    assert main([str(a) for a in synth_args(mlx_tiny_dir, "-", prompt_wav)] + ["--stream"]) == 0
    streamed = capsysbinary.readouterr().out
    riff, rate, n = _wav_header(streamed)
    assert riff == n == 0xFFFFFFFF and rate == 24000  # a stream of unknown length
    assert (len(streamed) - 44) % 2 == 0 and len(streamed) > 44


def test_no_prompt_text_says_cross_lingual(
    mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "x.wav"
    code, err = run(["synth", "--model", mlx_tiny_dir, "--text", "Hi.", "--prompt-wav", prompt_wav,
                     "--out", out, "--steps", 2], capsys)  # fmt: skip
    assert code == 0 and "notice: no --prompt-text: cross-lingual mode" in err
    code, err = run(synth_args(mlx_tiny_dir, tmp_path / "y.wav", prompt_wav), capsys)
    assert code == 0 and "cross-lingual" not in err


def test_mlx_audio_flag_names(mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsys) -> None:
    ours = tmp_path / "ours.wav"
    assert run(synth_args(mlx_tiny_dir, ours, prompt_wav), capsys)[0] == 0
    theirs = tmp_path / "theirs.wav"
    code, err = run(["synth", "--model", mlx_tiny_dir, "--text", "Hello there.", "--ref_audio",
                     prompt_wav, "--ref_text", PROMPT_TEXT, "--out", theirs, "--steps", 2,
                     "--quiet"], capsys)  # fmt: skip
    assert code == 0, err
    assert np.array_equal(_audio(ours), _audio(theirs))


def test_stt_model_transcribes_the_prompt(mlx_tiny_dir: Path, tmp_path: Path, capsys) -> None:
    """A real recorded prompt, transcribed by the eval's offline Whisper, gives zero-shot mode
    with the words Whisper heard, the same audio as passing them as --prompt-text."""
    pytest.importorskip("mlx_whisper")
    from eval.realspeech import english_transcripts, voice_dir

    try:
        wav = voice_dir("en_US_f_Allison") / "agent-alreadyon.wav"
        words = english_transcripts()["agent-alreadyon"]
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "stt.wav"
    code, err = run(["synth", "--model", mlx_tiny_dir, "--text", "Hi.", "--prompt-wav", wav,
                     "--stt-model", "offline:tiny.en", "--out", out, "--steps", 2], capsys)  # fmt: skip
    assert code == 0, err
    assert "cross-lingual" not in err
    heard = err.split("prompt transcript (offline:tiny.en): ")[1].splitlines()[0]
    first = words.lower().split()[0].strip(".,")
    assert first in heard.lower()  # Whisper tiny.en hears this clip's words
    again = tmp_path / "given.wav"
    code, err = run(["synth", "--model", mlx_tiny_dir, "--text", "Hi.", "--prompt-wav", wav,
                     "--prompt-text", heard, "--out", again, "--steps", 2], capsys)  # fmt: skip
    assert code == 0 and np.array_equal(_audio(out), _audio(again))
    code, err = run(["synth", "--model", mlx_tiny_dir, "--text", "Hi.", "--prompt-wav", wav,
                     "--prompt-text", "x", "--stt-model", "offline:tiny.en", "--out", again], capsys)  # fmt: skip
    assert code == 2 and "not both" in err
