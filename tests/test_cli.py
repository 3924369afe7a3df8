"""The `cosyvoice2` command: synthesis, speakers, and one clear error (exit 2, no partial file) per bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cosyvoice2.cli import main

PROMPT_TEXT = "This is a short prompt for the voice test."


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def synth_args(model: Path, out: Path, prompt: Path, text: str = "Hello there.") -> list:
    return ["synth", "--model", model, "--text", text, "--prompt-wav", prompt,
            "--prompt-text", PROMPT_TEXT, "--out", out, "--steps", 2, "--quiet"]  # fmt: skip


def test_synth_writes_a_wav(mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.wav"
    code, err = run(synth_args(mlx_tiny_dir, out, prompt_wav), capsys)
    assert code == 0, err
    data, sr = sf.read(out)
    assert sr == 24000 and data.ndim == 1 and data.shape[0] > 0 and data.shape[0] % 480 == 0
    assert "synthetic" in err
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]  # no temp file left


def test_stream_writes_the_same_length_class(
    mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "s.wav"
    code, err = run([*synth_args(mlx_tiny_dir, out, prompt_wav), "--stream"], capsys)
    assert code == 0, err
    assert sf.info(out).frames > 0


def test_speakers_add_list_synth_remove(
    mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsys
) -> None:
    model = tmp_path / "model"
    shutil.copytree(mlx_tiny_dir, model)
    assert run(["speakers", "add", "--model", model, "--id", "alice/../x", "--prompt-wav", prompt_wav,
                "--prompt-text", PROMPT_TEXT], capsys)[0] == 0  # fmt: skip
    assert main(["speakers", "list", "--model", str(model)]) == 0
    assert capsys.readouterr().out.split() == ["alice/../x"]
    out = tmp_path / "spk.wav"
    code, err = run(["synth", "--model", model, "--text", "Hi.", "--speaker", "alice/../x", "--out", out,
                     "--steps", 1, "--quiet"], capsys)  # fmt: skip
    assert code == 0, err and out.is_file()
    assert run(["speakers", "remove", "--model", model, "--id", "alice/../x"], capsys)[0] == 0
    code, err = run(["synth", "--model", model, "--text", "Hi.", "--speaker", "alice/../x", "--out",
                     tmp_path / "gone.wav"], capsys)  # fmt: skip
    assert code == 2 and "unknown speaker 'alice/../x'" in err
    assert not (tmp_path / "gone.wav").exists()


def _write(path: Path, x: np.ndarray, sr: int) -> Path:
    sf.write(path, x.astype(np.float32), sr)
    return path


def tone(seconds: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return 0.3 * np.sin(2 * np.pi * 150 * t)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty", "text is empty"),
        ("whitespace", "text is only whitespace"),
        ("punctuation", "nothing to speak"),
        ("huge", "text is too long"),
    ],
)
def test_bad_text(
    case: str, expected: str, mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsys
) -> None:
    text = {
        "empty": "",
        "whitespace": "  \n\t ",
        "punctuation": "?!... ,,",
        "huge": "word " * 10_000,
    }[case]
    out = tmp_path / "out.wav"
    code, err = run(synth_args(mlx_tiny_dir, out, prompt_wav, text=text), capsys)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "prompt audio not found"),
        ("unreadable", "cannot read prompt audio"),
        ("silent", "is silent"),
        ("short", "too short"),
        ("long", "too long"),
        ("empty_file", "cannot read prompt audio"),
    ],
)
def test_bad_prompt(case: str, expected: str, mlx_tiny_dir: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    src.mkdir()
    prompt = src / "p.wav"
    if case == "unreadable":
        prompt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really a wav file")
    elif case == "silent":
        _write(prompt, np.zeros(16000 * 2), 16000)
    elif case == "short":
        _write(prompt, tone(0.3), 16000)
    elif case == "long":
        _write(prompt, tone(31.0, 8000), 8000)
    elif case == "empty_file":
        prompt.write_bytes(b"")
    out = tmp_path / "out.wav"
    code, err = run(synth_args(mlx_tiny_dir, out, prompt), capsys)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_odd_rate_and_channels_are_mixed_and_resampled(
    mlx_tiny_dir: Path, tmp_path: Path, capsys
) -> None:
    stereo = np.stack([tone(1.5, 44100), 0.5 * tone(1.5, 44100), tone(1.5, 44100)], axis=1)
    prompt = tmp_path / "three_channels_44k.wav"
    sf.write(prompt, stereo.astype(np.float32), 44100)
    out = tmp_path / "out.wav"
    code, err = run(synth_args(mlx_tiny_dir, out, prompt), capsys)
    assert code == 0, err and sf.info(out).samplerate == 24000


def test_unwritable_output(mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsys) -> None:
    code, err = run(
        synth_args(mlx_tiny_dir, tmp_path / "no" / "such" / "dir.wav", prompt_wav), capsys
    )
    assert code == 2 and "output folder does not exist" in err
    code, err = run(synth_args(mlx_tiny_dir, tmp_path, prompt_wav), capsys)
    assert code == 2 and "is a directory" in err
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, err = run(synth_args(mlx_tiny_dir, ro / "x.wav", prompt_wav), capsys)
        assert code == 2 and "not writable" in err


@pytest.mark.parametrize(
    "case", ["no_dir", "no_config", "other_model", "old_version", "truncated", "missing_weights"]
)
def test_bad_model_dir(
    case: str, mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsys
) -> None:
    model = tmp_path / "model"
    if case != "no_dir":
        shutil.copytree(mlx_tiny_dir, model)
    expected = {
        "no_dir": "model dir not found",
        "no_config": "no config.json",
        "other_model": "model_type is 'whisper'",
        "old_version": "format version 0",
        "truncated": "flow.safetensors: cannot read",
        "missing_weights": "missing hift.safetensors",
    }[case]
    cfg = model / "config.json"
    if case == "no_config":
        cfg.unlink()
    elif case in ("other_model", "old_version"):
        meta = json.loads(cfg.read_text())
        meta.update({"model_type": "whisper"} if case == "other_model" else {"format_version": 0})
        cfg.write_text(json.dumps(meta))
    elif case == "truncated":
        data = (model / "flow.safetensors").read_bytes()
        (model / "flow.safetensors").write_bytes(data[: len(data) // 3])
    elif case == "missing_weights":
        (model / "hift.safetensors").unlink()
    out = tmp_path / "out.wav"
    code, err = run(synth_args(model, out, prompt_wav), capsys)
    assert code == 2 and expected in err, err
    assert not out.exists()


def test_errors_print_no_traceback_in_a_real_process(tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cosyvoice2.cli",
            "synth",
            "--model",
            str(tmp_path / "nope"),
            "--text",
            "Hi.",
            "--prompt-wav",
            str(tmp_path / "p.wav"),
            "--out",
            str(out),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"cosyvoice2: error: model dir not found: {tmp_path / 'nope'}"
    ]
    assert not out.exists()
