"""Seed-TTS-eval text normalisation, per-utterance WER/CER, and the summary figures.

The protocol (the one the CosyVoice2 paper reports with):

- remove every punctuation mark of Python's `string.punctuation` and of the Chinese
  punctuation set (`zhon.hanzi.punctuation`), except the ASCII apostrophe, so "don't"
  stays one word; curly quotes and the full-width apostrophe are removed like any mark;
- English is lower-cased and scored in words (WER);
- Chinese is split into characters (every character becomes a token) and scored as CER;
- the error rate of an utterance is (S + D + I) / N over the reference tokens
  (`jiwer.process_words`; jiwer 4 has no `compute_measures`);
- the reported figure is the mean of the per-utterance rates (x100); the corpus rate
  (all errors over all reference tokens) is reported beside it.

A failed utterance (no audio, an ASR error, an empty reference) is kept as a row with
its reason; the summary counts and lists failures and never drops them silently.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass

# Chinese punctuation as Seed-TTS-eval removes it (the set `zhon.hanzi.punctuation`):
# full-width ASCII variants, half-width CJK marks, CJK symbols, brackets, dashes,
# quotation marks, the ellipsis, small forms, the middle dot, and the stops.
ZH_PUNCTUATION = (
    "\uff02\uff03\uff04\uff05\uff06\uff07\uff08\uff09\uff0a\uff0b\uff0c\uff0d"
    "\uff0f\uff1a\uff1b\uff1c\uff1d\uff1e\uff20\uff3b\uff3c\uff3d\uff3e\uff3f"
    "\uff40\uff5b\uff5c\uff5d\uff5e\uff5f\uff60"
    "\uff62\uff63\uff64"
    "\u3000\u3001\u3003"
    "\u3008\u3009\u300a\u300b\u300c\u300d\u300e\u300f\u3010\u3011"
    "\u3014\u3015\u3016\u3017\u3018\u3019\u301a\u301b\u301c\u301d\u301e\u301f"
    "\u3030\u303e\u303f"
    "\u2013\u2014"
    "\u2018\u2019\u201b\u201c\u201d\u201e\u201f"
    "\u2026\u2027\ufe4f\ufe51\ufe54\u00b7"
    "\uff01\uff1f\uff61\u3002"
)
REMOVED_PUNCTUATION = frozenset(ZH_PUNCTUATION + string.punctuation) - {"'"}
_REMOVE_TABLE = {ord(c): None for c in REMOVED_PUNCTUATION}

LANGUAGES = ("en", "zh")


def normalize(text: str, lang: str) -> str:
    """Seed-TTS-eval's normalisation: the text as the tokens that are scored, space-joined.

    English: punctuation removed (apostrophes kept), lower-cased, whitespace collapsed.
    Chinese: punctuation removed, then every non-space character is one token.
    """
    if lang not in LANGUAGES:
        raise ValueError(f"language {lang!r} is not supported; use one of {LANGUAGES}")
    text = text.translate(_REMOVE_TABLE)
    if lang == "zh":
        return " ".join(c for c in text if not c.isspace())
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class ErrorCounts:
    """Alignment counts of one hypothesis against its reference (in scored tokens)."""

    hits: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def ref_len(self) -> int:
        return self.hits + self.substitutions + self.deletions

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """(S + D + I) / N: WER for English, CER for Chinese (may exceed 1)."""
        return self.errors / self.ref_len


def error_counts(reference: str, hypothesis: str, lang: str) -> ErrorCounts:
    """Normalise both texts and align them with `jiwer.process_words`.

    Raises ValueError when the reference has no token left after normalisation: the
    rate is undefined there, and the caller records the utterance as failed.
    """
    import jiwer

    ref = normalize(reference, lang)
    hyp = normalize(hypothesis, lang)
    if not ref:
        raise ValueError(f"empty reference after normalisation: {reference!r}")
    if not hyp:
        return ErrorCounts(hits=0, substitutions=0, deletions=len(ref.split()), insertions=0)
    out = jiwer.process_words(ref, hyp)
    return ErrorCounts(
        hits=out.hits,
        substitutions=out.substitutions,
        deletions=out.deletions,
        insertions=out.insertions,
    )


def metric_name(lang: str) -> str:
    """The name of the error rate for a language: WER (words) or CER (characters)."""
    return "CER" if lang == "zh" else "WER"


@dataclass(frozen=True)
class Summary:
    """Aggregate figures of one eval run (rates as fractions; x100 where reported)."""

    n_total: int
    n_scored: int
    n_failed: int
    failed_ids: tuple[str, ...]
    mean_error_rate: float | None  # mean of per-utterance rates (Seed-TTS-eval's WER/CER)
    corpus_error_rate: float | None  # all errors / all reference tokens
    sim_mean: float | None
    n_sim: int
    ref_tokens: int
    errors: int

    @property
    def mean_error_rate_x100(self) -> float | None:
        return None if self.mean_error_rate is None else 100.0 * self.mean_error_rate

    def to_dict(self) -> dict[str, object]:
        return {
            "n_total": self.n_total,
            "n_scored": self.n_scored,
            "n_failed": self.n_failed,
            "failed_ids": list(self.failed_ids),
            "mean_error_rate": self.mean_error_rate,
            "mean_error_rate_x100": self.mean_error_rate_x100,
            "corpus_error_rate": self.corpus_error_rate,
            "sim_mean": self.sim_mean,
            "n_sim": self.n_sim,
            "ref_tokens": self.ref_tokens,
            "errors": self.errors,
        }


def summarize(
    ids: Sequence[str],
    counts: Sequence[ErrorCounts | None],
    sims: Sequence[float | None],
) -> Summary:
    """Summary of per-utterance results; a None count marks a failed utterance.

    The error-rate means are over scored utterances only, and the failures are
    counted and named; with nothing scored the rates are None. SIM is averaged over
    the utterances that have one.
    """
    if not (len(ids) == len(counts) == len(sims)):
        raise ValueError("ids, counts and sims must have the same length")
    scored = [c for c in counts if c is not None]
    failed = tuple(i for i, c in zip(ids, counts) if c is None)
    sim_values = [s for s in sims if s is not None and not math.isnan(s)]
    ref_tokens = sum(c.ref_len for c in scored)
    errors = sum(c.errors for c in scored)
    return Summary(
        n_total=len(ids),
        n_scored=len(scored),
        n_failed=len(failed),
        failed_ids=failed,
        mean_error_rate=sum(c.rate for c in scored) / len(scored) if scored else None,
        corpus_error_rate=errors / ref_tokens if ref_tokens else None,
        sim_mean=sum(sim_values) / len(sim_values) if sim_values else None,
        n_sim=len(sim_values),
        ref_tokens=ref_tokens,
        errors=errors,
    )
