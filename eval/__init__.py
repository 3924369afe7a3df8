"""Evaluation harness: Seed-TTS-eval style ASR round trip (WER/CER) and speaker similarity.

Modules: `datasets` (test-set readers), `synth` (cached, resumable synthesis of a set),
`asr` (mlx-whisper), `whisper_convert` (CTranslate2 -> mlx-whisper, numpy only),
`similarity` (speaker encoders), `metrics` (normalisation, WER/CER, summary),
`score` (per-utterance rows), `results_io` (JSON/CSV files), `realspeech` (Debian's
recorded prompts), `whisper_reference` (faster-whisper transcripts), `cli` (`python -m eval`).
The heavy dependencies (mlx-whisper, jiwer, Resemblyzer, torch) are imported lazily.
"""

import cosyvoice2 as _cosyvoice2  # noqa: F401, E402 - binds MLX to a fast BLAS before mlx-whisper loads MLX (cosyvoice2.blas)
