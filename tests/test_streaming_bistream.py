"""Text-in streaming: irregular text pieces give the same speech tokens as the whole text at once,
and audio chunks come out while text still arrives.

The pieces comparison is exact (tokens identical). Its power (`tests/power.py`): with
the incremental sentence splitter taking the end of every piece as the end of a
sentence, words cut between two pieces are tokenised in halves and the streams differ.
(A splitter that merely misses a sentence boundary is not such a bug: the text tokens
are the same, only their grouping differs, which the LLM input does not depend on.
Nor are small text changes seen here: with random weights the speech LM's
distribution is nearly flat and the seeded draws follow the key, so dropping the
leading spaces of sentences changes 1 of the 144 tokens.)
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.frontend.text import IncrementalNormalizer
from cosyvoice2.model import CosyVoice2, Prompt
from cosyvoice2.streaming import StreamSchedule, Timings
from tests.power import assert_power, wrapped

S = 6561
TEXT = (
    "Streaming speech starts before the sentence ends. It keeps going, while the text "
    "still arrives: word by word, or in larger pieces! Does it sound the same? It should."
)


class SpeechSampler:
    """Seeded draws over the 6561 speech tokens only (random weights would draw 6562 otherwise,
    which the official bistream rejects); fill tokens come from the official 5:15 schedule."""

    window = 0

    def __call__(self, logp: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return mx.random.categorical(logp[:S], key=key).astype(mx.int32)


@pytest.fixture(scope="module")
def ours(mlx_tiny_dir) -> CosyVoice2:
    return CosyVoice2.load(mlx_tiny_dir)


def prompt(model: CosyVoice2) -> Prompt:
    rng = np.random.default_rng(4)
    tok = mx.array(rng.integers(0, S, (1, 23)), dtype=mx.int32)
    return Prompt(
        embedding=mx.array(rng.standard_normal((1, 192)).astype(np.float32)),
        prompt_text=model._text_tokens("A short prompt."),
        llm_speech_token=tok,
        flow_speech_token=tok,
        speech_feat=mx.array(rng.standard_normal((1, 46, 80)).astype(np.float32)),
    )


def pieces(text: str, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < len(text):
        n = int(rng.integers(1, 12))
        out.append(text[i : i + n])
        i += n
    return out


OPTS = dict(sampling=SpeechSampler(), max_token_text_ratio=4)


PIECE_SEEDS = range(3)


def test_irregular_pieces_give_the_same_tokens(ours: CosyVoice2) -> None:
    p = prompt(ours)
    whole = list(ours.bistream_token_stream([TEXT], p, seed=11, **OPTS))
    assert len(whole) > 50
    for seed in PIECE_SEEDS:
        split = pieces(TEXT, seed)
        assert len(split) > 10
        got = list(ours.bistream_token_stream(iter(split), p, seed=11, **OPTS))
        assert got == whole, f"pieces seed {seed}: first difference at {_first_diff(got, whole)}"
    other = list(ours.bistream_token_stream([TEXT], p, seed=12, **OPTS))
    assert other != whole  # the seed matters: the comparison can fail


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _mismatches(a: list[int], b: list[int]) -> int:
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


def _piece_end_as_sentence_end(push):
    """`push` that also emits the text buffered at the end of every piece, as if each piece
    ended a sentence (so a word cut between two pieces is tokenised in two halves)."""

    def bugged(self, piece):
        out = push(self, piece)
        if self._buf:
            out.extend(self._emit(self._buf))
            self._buf, self._scan = "", 0
        return out

    return bugged


def test_irregular_pieces_power(ours: CosyVoice2) -> None:
    p = prompt(ours)

    def measure() -> int:
        whole = list(ours.bistream_token_stream([TEXT], p, seed=11, **OPTS))
        return sum(
            _mismatches(
                list(ours.bistream_token_stream(iter(pieces(TEXT, seed)), p, seed=11, **OPTS)),
                whole,
            )
            for seed in PIECE_SEEDS
        )

    assert_power(
        "bistream tokens, pieces against the whole text",
        measure,
        0,
        wrapped(IncrementalNormalizer, "push", _piece_end_as_sentence_end),
        "piece_end_taken_as_sentence_end",
    )


@pytest.mark.parametrize("overlap", [False, True])
def test_audio_chunks_come_while_text_arrives(ours: CosyVoice2, monkeypatch, overlap) -> None:
    """Serial: the first chunk comes before the text generator is exhausted. Overlapped (the
    LLM pulls text in its own thread): the last text pieces are only released once the
    first audio chunk is out, which cannot happen if the first chunk waits for the text."""
    import threading

    p = prompt(ours)
    monkeypatch.setattr(ours, "prompt_from_wav", lambda *a, **k: p)
    split = pieces(TEXT, 7)
    pulled = []
    first_chunk_out = threading.Event()
    held = []

    def text():
        for i, piece in enumerate(split):
            if overlap and i == len(split) - 2:
                held.append(first_chunk_out.wait(120))
            pulled.append(piece)
            yield piece

    tm = Timings()
    consumed_at_chunk = []
    for out in ours.inference_bistream(
        text(), "A short prompt.", ("unused", 16000), seed=3, n_timesteps=1, timings=tm,
        schedule=StreamSchedule(first_hop_len=10, overlap_llm=overlap), **OPTS,
    ):  # fmt: skip
        consumed_at_chunk.append(len(pulled))
        first_chunk_out.set()
        assert out["tts_speech"].shape[1] > 0
    assert len(consumed_at_chunk) >= 3
    assert consumed_at_chunk[0] < len(split), "the first audio chunk waited for the whole text"
    if overlap:
        assert held == [True], "the text was held back but no audio chunk came"
    assert tm.first("text") < tm.first("audio")


def test_zero_shot_with_a_generator_is_bistream(ours: CosyVoice2, monkeypatch) -> None:
    p = prompt(ours)
    monkeypatch.setattr(ours, "prompt_from_wav", lambda *a, **k: p)
    kw = dict(seed=5, n_timesteps=1, **OPTS)
    a = [np.array(o["tts_speech"]) for o in ours.inference_zero_shot(
        iter(pieces(TEXT[:80], 1)), "A short prompt.", ("unused", 16000), stream=True, **kw)]  # fmt: skip
    b = [np.array(o["tts_speech"]) for o in ours.inference_bistream(
        [TEXT[:80]], "A short prompt.", ("unused", 16000), **kw)]  # fmt: skip
    assert len(a) == len(b) >= 2
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
