"""Scoring of a synthesised set: ASR round trip (WER/CER) and speaker similarity per utterance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from eval.asr import Transcriber
from eval.audio import ASR_SAMPLE_RATE, load_audio, resample
from eval.datasets import TestSet, Utterance
from eval.metrics import ErrorCounts, error_counts, metric_name
from eval.similarity import SpeakerEncoder, cosine


@dataclass
class UtteranceResult:
    """One row of the eval results (rates as fractions; `error` set when the row failed)."""

    id: str
    lang: str
    metric: str  # WER or CER
    target_text: str
    hypothesis: str | None
    error_rate: float | None
    hits: int | None
    substitutions: int | None
    deletions: int | None
    insertions: int | None
    ref_tokens: int | None
    sim: float | None
    duration_s: float | None
    error: str | None = None  # why the error rate is missing (synthesis, ASR, reference)
    sim_error: str | None = None

    @property
    def counts(self) -> ErrorCounts | None:
        if self.error_rate is None:
            return None
        return ErrorCounts(self.hits, self.substitutions, self.deletions, self.insertions)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


AudioSource = Callable[[str], tuple[Path | None, str | None]]


def score_set(
    test_set: TestSet,
    audio_for: AudioSource,
    transcriber: Transcriber | None,
    encoder: SpeakerEncoder | None,
    progress: bool = True,
    done: dict[str, UtteranceResult] | None = None,
    on_row: Callable[[UtteranceResult], None] | None = None,
) -> list[UtteranceResult]:
    """Score every utterance of the set; none is dropped.

    `audio_for(id)` gives the synthesised wav of an utterance, or (None, reason) when its
    synthesis failed. Without a transcriber (or encoder) that column stays empty.
    Prompt embeddings are computed once per prompt file. `done`: rows scored before (a
    resumed run), taken as they are; `on_row(row)` is called after each newly scored row.
    """
    from tqdm import tqdm

    done = done or {}
    prompt_emb: dict[Path, np.ndarray] = {}
    rows: list[UtteranceResult] = []
    for u in tqdm(test_set, desc=f"scoring {test_set.name}", unit="utt", disable=not progress):
        if u.id in done:
            rows.append(done[u.id])
            continue
        row = UtteranceResult(
            id=u.id,
            lang=u.lang,
            metric=metric_name(u.lang),
            target_text=u.target_text,
            hypothesis=None,
            error_rate=None,
            hits=None,
            substitutions=None,
            deletions=None,
            insertions=None,
            ref_tokens=None,
            sim=None,
            duration_s=None,
        )
        rows.append(row)
        _score_one(u, row, audio_for, transcriber, encoder, prompt_emb)
        if on_row is not None:
            on_row(row)
    return rows


def _score_one(
    u: Utterance,
    row: UtteranceResult,
    audio_for: AudioSource,
    transcriber: Transcriber | None,
    encoder: SpeakerEncoder | None,
    prompt_emb: dict[Path, np.ndarray],
) -> None:
    """Fill `row` for utterance `u` (errors recorded in it, never raised)."""
    wav_path, why = audio_for(u.id)
    if wav_path is None:
        row.error = f"synthesis: {why}"
        row.sim_error = row.error
        return
    try:
        wav, sr = load_audio(wav_path)
    except Exception as e:
        row.error = row.sim_error = f"audio: {type(e).__name__}: {e}"
        return
    row.duration_s = len(wav) / float(sr)
    if transcriber is not None:
        try:
            row.hypothesis = transcriber(resample(wav, sr, ASR_SAMPLE_RATE), u.lang)
        except Exception as e:
            row.error = f"asr: {type(e).__name__}: {e}"
        if row.hypothesis is not None:
            try:
                c = error_counts(u.target_text, row.hypothesis, u.lang)
            except ValueError as e:
                row.error = f"reference: {e}"
            else:
                row.error_rate = c.rate
                row.hits, row.substitutions = c.hits, c.substitutions
                row.deletions, row.insertions = c.deletions, c.insertions
                row.ref_tokens = c.ref_len
    else:
        row.error = "asr: no transcriber"
    if encoder is not None:
        try:
            if u.prompt_wav not in prompt_emb:
                prompt_emb[u.prompt_wav] = encoder.embed(*load_audio(u.prompt_wav))
            row.sim = cosine(prompt_emb[u.prompt_wav], encoder.embed(wav, sr))
        except Exception as e:
            row.sim_error = f"{type(e).__name__}: {e}"
    else:
        row.sim_error = "no speaker encoder"
