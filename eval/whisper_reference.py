"""Transcripts from the CTranslate2 original (faster-whisper), to check a converted Whisper.

The decoding matches `eval.asr.MLXWhisper`: language forced, greedy at temperature 0,
no conditioning on previous text, timestamps on, the same 16 kHz resampling
(`eval.audio.load_audio`). `transcribe_in_subprocess` runs it in a child process with
`LD_PRELOAD` removed: OpenBLAS preloaded for MLX slows CTranslate2 down,
and the child can run while the parent transcribes with MLX.

    python -m eval.whisper_reference MODEL_DIR LANG WAV... > transcripts.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def transcribe_ct2(
    model_dir: str | Path, wavs: Sequence[str | Path], lang: str = "en", threads: int = 1
) -> list[str]:
    """Transcribe each wav with faster-whisper (float32 on CPU)."""
    from faster_whisper import WhisperModel

    from eval.audio import ASR_SAMPLE_RATE, load_audio

    model = WhisperModel(str(model_dir), device="cpu", compute_type="float32", cpu_threads=threads)
    out = []
    for wav in wavs:
        audio, _ = load_audio(wav, ASR_SAMPLE_RATE)
        segments, _ = model.transcribe(
            audio, language=lang, beam_size=1, temperature=0.0, condition_on_previous_text=False
        )
        out.append("".join(s.text for s in segments).strip())
    return out


def transcribe_in_subprocess(
    model_dir: str | Path, wavs: Sequence[str | Path], lang: str = "en"
) -> subprocess.Popen:
    """Start `transcribe_ct2` in a child process without an OpenBLAS (neither `LD_PRELOAD` nor
    `cosyvoice2.blas`'s); read JSON from its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["COSYVOICE2_BLAS"] = "off"
    env.setdefault("OMP_NUM_THREADS", "1")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "eval.whisper_reference", str(model_dir), lang, *map(str, wavs)]
    return subprocess.Popen(
        cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    model_dir, lang, wavs = args[0], args[1], args[2:]
    json.dump(transcribe_ct2(model_dir, wavs, lang), sys.stdout, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
