"""The figures a case reports: each registered with its unit, which direction is better,
its regression tolerance and a floor below which a comparison is noise.

Per repeated call the harness turns the target's raw `CallTimings` into derived
values (`call_figures`); a case's figure is the median of its warm repeats with
their min and max (`aggregate`). The first call after load is the cold call: its
values are kept as `cold_*` figures and it also serves as the first warm-up.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from bench.interface import CallTimings

FIRST_CHUNK_MIN_AUDIO_S = 0.2
"""Streaming latency counts to the moment this much audio is in hand: a first chunk of a few
milliseconds is not the start of playback."""


@dataclass(frozen=True)
class Figure:
    name: str
    unit: str
    better: str | None
    """`lower`, `higher`, or `None` for figures that describe the work (not compared)."""
    description: str
    tolerance: float | None = None
    """Regression tolerance for this figure (relative); `None`: the comparison's default."""
    floor: float = 0.0
    """When both run and baseline are below this (in `unit`), the comparison is skipped as noise."""


FIGURES: dict[str, Figure] = {
    f.name: f
    for f in [
        Figure("rtf", "x", "lower", "real-time factor: call wall time / audio seconds", floor=0.0),
        Figure("wall_s", "s", "lower", "call wall time: inputs in, all audio out", floor=0.02),
        Figure("audio_s", "s", None, "seconds of audio produced"),
        Figure("speech_tokens", "tokens", None, "speech tokens the LLM produced"),
        Figure("ttft_s", "s", "lower", "call start to first speech token", floor=0.02),
        Figure(
            "prefill_s",
            "s",
            "lower",
            "LLM prefill (prompt forward + first sample; = ttft when not separable)",
            floor=0.02,
        ),
        Figure(
            "decode_tok_s",
            "tok/s",
            "higher",
            "LLM decode speed: (tokens - 1) / (last token time - first token time)",
        ),
        Figure("llm_s", "s", "lower", "all LLM time (prefill + decode)", floor=0.02),
        Figure("flow_s", "s", "lower", "flow time (encoder + CFM solve)", floor=0.02),
        Figure(
            "flow_s_per_audio_s", "s/s", "lower", "flow seconds per second of audio", floor=0.004
        ),
        Figure("hift_s", "s", "lower", "HiFT vocoder time", floor=0.02),
        Figure(
            "hift_s_per_audio_s", "s/s", "lower", "HiFT seconds per second of audio", floor=0.004
        ),
        Figure(
            "first_chunk_s",
            "s",
            "lower",
            f"streaming: call start to the first {FIRST_CHUNK_MIN_AUDIO_S:g} s of audio in hand"
            " (warm calls)",
            floor=0.02,
        ),
        Figure(
            "first_audio_s",
            "s",
            "lower",
            "streaming: call start to the first audio chunk, however short",
            floor=0.02,
        ),
        Figure("first_chunk_audio_s", "s", None, "streaming: seconds of audio in the first chunk"),
        Figure("chunks", "chunks", None, "streaming: number of audio chunks"),
        Figure(
            "playback_gap_max_s",
            "s",
            "lower",
            "streaming: longest silence if chunks were played as they arrive (0 = no stall)",
            floor=0.05,
        ),
        Figure(
            "cpu_s",
            "s",
            "lower",
            "process CPU time of the call (user + system, all threads); less sensitive than"
            " wall time to other work on a shared machine",
            floor=0.02,
        ),
        Figure("cpu_util", "cores", None, "cpu_s / wall_s: cores kept busy on average"),
        Figure("mlx_peak_mb", "MB", "lower", "MLX peak memory during the call", floor=1.0),
        Figure(
            "rss_peak_mb",
            "MB",
            "lower",
            "process peak resident memory (load + every call of the case)",
            tolerance=0.15,
            floor=1.0,
        ),
        Figure(
            "load_s",
            "s",
            "lower",
            "model load time (fresh process)",
            tolerance=0.5,
            floor=0.05,
        ),
        Figure(
            "cold_wall_s",
            "s",
            "lower",
            "wall time of the first call after load",
            tolerance=0.5,
            floor=0.02,
        ),
        Figure(
            "cold_first_chunk_s",
            "s",
            "lower",
            "streaming: first-chunk latency of the first call after load (a new speaker: its"
            " prompt state computed in the call)",
            tolerance=0.5,
            floor=0.02,
        ),
        Figure(
            "prompt_s",
            "s",
            "lower",
            "streaming: processing a new prompt wav (speech tokens, mel, speaker embedding),"
            " before the cold call",
            tolerance=0.5,
            floor=0.02,
        ),
        Figure(
            "new_speaker_first_chunk_s",
            "s",
            "lower",
            "streaming, a new speaker: prompt processing plus the cold call's first"
            f" {FIRST_CHUNK_MIN_AUDIO_S:g} s of audio",
            tolerance=0.5,
            floor=0.02,
        ),
        # Fidelity: the case's output against the reference setting's on the same inputs and
        # seed (`bench.drift`); on synthetic weights numerical drift, not perceived quality.
        Figure(
            "token_agreement_greedy",
            "fraction",
            "higher",
            "LLM top-1 choice equal to the reference LLM's, teacher-forced on the reference tokens",
            tolerance=0.05,
        ),
        Figure(
            "token_agreement_sampled",
            "fraction",
            "higher",
            "speech tokens equal to the reference's, position by position (same sampling seed)",
            tolerance=0.1,
        ),
        Figure(
            "log_mel_distance",
            "nats",
            "lower",
            "mean |log-mel difference| from the reference audio (the flow's mel settings)",
            floor=0.01,
        ),
        Figure(
            "mrstft_distance",
            "",
            "lower",
            "multi-resolution STFT distance from the reference audio",
            floor=0.01,
        ),
        Figure(
            "f0_rmse_cents",
            "cents",
            "lower",
            "pitch error on frames voiced in both the output and the reference",
            floor=5.0,
        ),
        Figure(
            "voicing_disagreement",
            "fraction",
            "lower",
            "frames voiced in one of output and reference only",
            floor=0.01,
        ),
        Figure(
            "click_max",
            "x",
            "lower",
            "largest click score (step / local variation) at the start, the chunk joins and the end",
            floor=3.0,
        ),
        # Quality on real weights (`--quality`): the eval harness on a small fixed set.
        Figure("wer", "%", "lower", "Whisper word error rate, mean over utterances", floor=0.5),
        Figure(
            "cer", "%", "lower", "Whisper character error rate, mean over utterances", floor=0.5
        ),
        Figure("sim", "cos", "higher", "speaker similarity to the prompt", tolerance=0.05),
    ]
}

FIDELITY = (
    "token_agreement_greedy",
    "token_agreement_sampled",
    "log_mel_distance",
    "mrstft_distance",
    "f0_rmse_cents",
    "voicing_disagreement",
    "click_max",
)
"""The fidelity figures, one value per case (not medians of calls)."""

DEFAULT_TOLERANCE = 0.25

# Figures that summarise a case in the terminal table, in order.
SUMMARY = [
    "rtf",
    "wall_s",
    "first_chunk_s",
    "cold_first_chunk_s",
    "new_speaker_first_chunk_s",
    "ttft_s",
    "decode_tok_s",
    "flow_s_per_audio_s",
    "hift_s_per_audio_s",
    "cpu_s",
    "mlx_peak_mb",
    "rss_peak_mb",
    "load_s",
]


def playback_gaps(chunk_times_s: list[float], chunk_audio_s: list[float]) -> list[float]:
    """Silences a listener would hear if each chunk were played as soon as it arrived.

    Playback starts when the first chunk arrives; chunk i plays when it has arrived and
    chunk i-1 has finished playing. Returns the gap before each later chunk (>= 0).
    """
    if not chunk_times_s:
        return []
    play_end = chunk_times_s[0] + chunk_audio_s[0]
    gaps = []
    for t, a in zip(chunk_times_s[1:], chunk_audio_s[1:]):
        gap = max(0.0, t - play_end)
        gaps.append(gap)
        play_end = max(play_end, t) + a
    return gaps


def first_playable_s(chunk_times_s: list[float], chunk_audio_s: list[float]) -> float:
    """When the chunks in hand first hold `FIRST_CHUNK_MIN_AUDIO_S` of audio (the last chunk's
    time when the whole output is shorter)."""
    total = 0.0
    for t, a in zip(chunk_times_s, chunk_audio_s):
        total += a
        if total >= FIRST_CHUNK_MIN_AUDIO_S - 1e-9:
            return float(t)
    return float(chunk_times_s[-1])


def call_figures(t: CallTimings) -> dict[str, float]:
    """Derived figures of one call (only those the call's timings allow)."""
    out: dict[str, float] = {
        "wall_s": t.wall_s,
        "audio_s": t.audio_s,
        "speech_tokens": float(t.speech_tokens),
    }
    if t.audio_s > 0:
        out["rtf"] = t.wall_s / t.audio_s
    for name in ("ttft_s", "prefill_s", "llm_s", "flow_s", "hift_s"):
        value = getattr(t, name)
        if value is not None:
            out[name] = float(value)
    if t.first_chunk_s is not None:
        out["first_audio_s"] = float(t.first_chunk_s)
        # the first 0.2 s of audio where the chunks are known, else the first chunk
        out["first_chunk_s"] = (
            first_playable_s(t.chunk_times_s, t.chunk_audio_s)
            if t.chunk_times_s and t.chunk_audio_s
            else float(t.first_chunk_s)
        )
    if t.decode_s is not None and t.decode_s > 0 and t.speech_tokens > 1:
        out["decode_tok_s"] = (t.speech_tokens - 1) / t.decode_s
    if t.audio_s > 0:
        if t.flow_s is not None:
            out["flow_s_per_audio_s"] = t.flow_s / t.audio_s
        if t.hift_s is not None:
            out["hift_s_per_audio_s"] = t.hift_s / t.audio_s
    if t.chunk_times_s:
        out["chunks"] = float(len(t.chunk_times_s))
        if t.chunk_audio_s:
            out["first_chunk_audio_s"] = t.chunk_audio_s[0]
            gaps = playback_gaps(t.chunk_times_s, t.chunk_audio_s)
            out["playback_gap_max_s"] = max(gaps, default=0.0)
    return out


def summarize(values: list[float]) -> dict[str, Any]:
    """Median, min, max and count of a figure's values (values kept for later analysis)."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": list(values),
    }


def aggregate(calls: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per figure, the summary over the warm calls that report it."""
    names: list[str] = []
    for c in calls:
        names += [n for n in c if n not in names]
    return {n: summarize([c[n] for c in calls if n in c]) for n in names}
