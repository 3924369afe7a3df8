"""Seed-TTS-eval normalisation, WER/CER and the summary on hand-made cases with known answers."""

from __future__ import annotations

import pytest

from eval.metrics import ErrorCounts, normalize, summarize

jiwer = pytest.importorskip("jiwer")

from eval.metrics import error_counts  # noqa: E402  (needs jiwer at call time)


@pytest.mark.parametrize(
    ("text", "lang", "expected"),
    [
        # apostrophes stay, other punctuation goes, English is lower-cased
        ("Don't stop, Mr. Smith!", "en", "don't stop mr smith"),
        ("  Hello,   WORLD...  ", "en", "hello world"),
        # hyphens are removed without a space (the protocol's behaviour)
        ("A well-known fact; (really).", "en", "a wellknown fact really"),
        # the curly apostrophe is in the removed set (only the ASCII one is kept)
        ("It\u2019s fine", "en", "its fine"),
        # Chinese: punctuation removed, one token per character
        ("你好，世界！", "zh", "你 好 世 界"),
        ("“今天”天气很好。", "zh", "今 天 天 气 很 好"),
        # Latin letters inside Chinese text are split into characters too; case is kept
        ("我爱AI。", "zh", "我 爱 A I"),
        ("", "en", ""),
        ("？！。", "zh", ""),
    ],
)
def test_normalize(text: str, lang: str, expected: str) -> None:
    assert normalize(text, lang) == expected


def test_normalize_rejects_unknown_language() -> None:
    with pytest.raises(ValueError, match="not supported"):
        normalize("bonjour", "fr")


@pytest.mark.parametrize(
    ("ref", "hyp", "lang", "counts", "rate"),
    [
        # punctuation and case only: no error
        ("Please enter your password.", "please enter your password", "en", (4, 0, 0, 0), 0.0),
        # a contraction is one word: don't -> do (S) + not (I) = 2 errors over 4 words
        ("Don't stop, Mr. Smith!", "do not stop mr smith", "en", (3, 1, 0, 1), 0.5),
        # the contraction written the same way matches
        ("I can't go.", "I can't go", "en", (3, 0, 0, 0), 0.0),
        # one word dropped of five
        ("The conference is now locked.", "The conference is locked.", "en", (4, 0, 1, 0), 0.2),
        # insertions can push the rate above one
        ("Yes.", "yes yes yes", "en", (1, 0, 0, 2), 2.0),
        # empty hypothesis (nothing recognised): every reference word deleted
        ("hello world", "", "en", (0, 0, 2, 0), 1.0),
        ("hello world", " ... ", "en", (0, 0, 2, 0), 1.0),
        # Chinese CER: one character substituted of six
        ("今天天气很好。", "今天天汽很好", "zh", (5, 1, 0, 0), 1 / 6),
        # Chinese: full-width punctuation ignored, missing character is a deletion
        ("你好，世界！", "你好世", "zh", (3, 0, 1, 0), 0.25),
        ("你好", "", "zh", (0, 0, 2, 0), 1.0),
    ],
)
def test_error_counts(ref: str, hyp: str, lang: str, counts: tuple, rate: float) -> None:
    c = error_counts(ref, hyp, lang)
    assert (c.hits, c.substitutions, c.deletions, c.insertions) == counts
    assert c.rate == pytest.approx(rate, abs=1e-12)


def test_empty_reference_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty reference"):
        error_counts("?!", "something", "en")


def test_summary_equals_hand_computation() -> None:
    ids = ["a", "b", "c", "d"]
    counts = [
        ErrorCounts(hits=3, substitutions=1, deletions=0, insertions=1),  # 2/4 = 0.5
        ErrorCounts(hits=5, substitutions=1, deletions=0, insertions=0),  # 1/6
        None,  # failed utterance: counted and listed, not scored
        ErrorCounts(hits=3, substitutions=0, deletions=0, insertions=0),  # 0/3
    ]
    sims = [0.8, None, 0.6, 0.7]
    s = summarize(ids, counts, sims)
    assert s.n_total == 4 and s.n_scored == 3 and s.n_failed == 1
    assert s.failed_ids == ("c",)
    # mean of per-utterance rates (Seed-TTS-eval): (0.5 + 1/6 + 0) / 3
    assert s.mean_error_rate == pytest.approx((0.5 + 1 / 6 + 0.0) / 3, abs=1e-12)
    assert s.mean_error_rate_x100 == pytest.approx(100 * (0.5 + 1 / 6) / 3, abs=1e-10)
    # corpus rate: all errors over all reference tokens: (2 + 1 + 0) / (4 + 6 + 3)
    assert s.errors == 3 and s.ref_tokens == 13
    assert s.corpus_error_rate == pytest.approx(3 / 13, abs=1e-12)
    # SIM over the rows that have one, failures included when they have audio
    assert s.sim_mean == pytest.approx((0.8 + 0.6 + 0.7) / 3, abs=1e-12)
    assert s.n_sim == 3


def test_summary_from_texts_matches_hand_computation() -> None:
    refs = ["Don't stop, Mr. Smith!", "今天天气很好。", "The conference is now locked."]
    hyps = ["do not stop mr smith", "今天天汽很好", "the conference is now locked"]
    langs = ["en", "zh", "en"]
    counts = [error_counts(r, h, g) for r, h, g in zip(refs, hyps, langs)]
    s = summarize(["x", "y", "z"], counts, [None, None, None])
    assert s.mean_error_rate == pytest.approx((2 / 4 + 1 / 6 + 0 / 5) / 3, abs=1e-12)
    assert s.corpus_error_rate == pytest.approx((2 + 1 + 0) / (4 + 6 + 5), abs=1e-12)
    assert s.sim_mean is None and s.n_sim == 0


def test_summary_with_nothing_scored() -> None:
    s = summarize(["a"], [None], [None])
    assert s.n_failed == 1 and s.mean_error_rate is None and s.corpus_error_rate is None
    assert s.to_dict()["mean_error_rate_x100"] is None
