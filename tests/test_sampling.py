"""Speech-token sampling (`cosyvoice2.sampling`): candidate sets, seeding, distributions.

The official-code comparisons are in `test_sampling_parity.py`; these need only MLX.
Distribution checks are chi-square tests at significance 1e-3 on fixed keys
(deterministic), with the critical value from the Wilson-Hilferty approximation.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.sampling import (
    GreedySampler,
    NucleusSampler,
    RandomSampler,
    RasSampler,
    empty_recent,
    greedy,
    nucleus_candidates,
    nucleus_sampling,
    push_recent,
    random_sampling,
    ras_sampling,
    repetition_count,
)

Z_999 = 3.090232  # standard normal quantile for 1 - 1e-3


def chi2_critical(df: int, z: float = Z_999) -> float:
    """Upper chi-square quantile (Wilson-Hilferty), accurate to ~1% for df >= 3."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_statistic(counts: np.ndarray, expected_p: np.ndarray) -> tuple[float, int]:
    """Pearson statistic over the bins with non-zero expectation; fails if a zero-p bin was drawn."""
    n = counts.sum()
    zero = expected_p <= 0
    assert counts[zero].sum() == 0, (
        f"drew tokens with probability 0: {np.nonzero(counts * zero)[0]}"
    )
    exp = expected_p[~zero] * n
    assert exp.min() >= 5, "test design: every bin needs an expected count >= 5"
    stat = float(((counts[~zero] - exp) ** 2 / exp).sum())
    return stat, int((~zero).sum()) - 1


def draws(fn, n: int, seed: int) -> np.ndarray:
    """`n` tokens from `fn(key)`, one key each (vectorised with `mx.vmap`)."""
    keys = mx.random.split(mx.random.key(seed), n)
    return np.array(mx.vmap(fn)(keys))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0
    return e / e.sum()


def test_nucleus_candidates_follow_top_p_and_top_k() -> None:
    # probabilities 0.5, 0.2, 0.15, 0.1, 0.05: the mass before each is 0, .5, .7, .85, .95
    p = np.array([0.1, 0.5, 0.05, 0.2, 0.15])
    scores = mx.array(np.log(p), dtype=mx.float32)
    ids, probs = nucleus_candidates(scores, top_p=0.8, top_k=25)
    assert ids == [1, 3, 4]  # 0.85 >= 0.8 stops before token 0
    np.testing.assert_allclose(np.array(probs), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85], atol=1e-6)
    assert nucleus_candidates(scores, top_p=0.8, top_k=2)[0] == [1, 3]
    assert nucleus_candidates(scores, top_p=0.5, top_k=25)[0] == [1]  # mass 0.5 is not < 0.5
    assert nucleus_candidates(scores, top_p=0.01, top_k=25)[0] == [1]  # the first is always kept
    assert nucleus_candidates(scores, top_p=1.0, top_k=25)[0] == [1, 3, 4, 0, 2]


def test_nucleus_ties_keep_index_order() -> None:
    scores = mx.array([0.0, 1.0, 1.0, 0.5, 1.0, 1.0], dtype=mx.float32)
    ids, _ = nucleus_candidates(scores, top_p=0.99, top_k=3)
    assert ids == [1, 2, 4]


def test_same_key_same_token_and_keys_matter() -> None:
    scores = mx.random.normal((6564,), key=mx.random.key(3)) * 3
    recent = mx.array([5, 9, 9, -1, 7, 1, 2, 3, 4, 6], dtype=mx.int32)
    for fn in (
        lambda k: nucleus_sampling(scores, k),
        lambda k: random_sampling(scores, k),
        lambda k: ras_sampling(scores, recent, k),
    ):
        a = [fn(mx.random.key(s)).item() for s in range(20)]
        b = [fn(mx.random.key(s)).item() for s in range(20)]
        assert a == b
        assert len(set(a)) > 3, "different keys should give different tokens"


def test_vmapped_draws_equal_single_draws() -> None:
    scores = mx.random.normal((50,), key=mx.random.key(4))
    keys = mx.random.split(mx.random.key(9), 16)
    batched = mx.vmap(lambda k: nucleus_sampling(scores, k))(keys).tolist()
    single = [nucleus_sampling(scores, keys[i]).item() for i in range(16)]
    assert batched == single


def test_greedy() -> None:
    scores = mx.array([0.1, 3.0, -1.0, 3.0], dtype=mx.float32)
    assert greedy(scores).item() == 1
    assert GreedySampler()(scores, empty_recent(0), mx.random.key(0)).item() == 1


def test_recent_window() -> None:
    recent = empty_recent(3)
    for t in (4, 5, 6, 7):
        recent = push_recent(recent, mx.array(t))
    assert recent.tolist() == [5, 6, 7]
    assert empty_recent(0).shape == (0,)
    assert push_recent(empty_recent(0), mx.array(3)).shape == (0,)
    hist = mx.array([-1, -1, 3, 8, 3], dtype=mx.int32)
    assert repetition_count(hist, mx.array(3), 5).item() == 2
    assert repetition_count(hist, mx.array(3), 2).item() == 1
    assert repetition_count(hist, mx.array(-5), 5).item() == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_nucleus_frequencies_chi_square(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=40).astype(np.float32) * 1.5
    scores = mx.array(logits)
    ids, probs = nucleus_candidates(scores, 0.8, 25)
    expected = np.zeros(40)
    expected[ids] = np.array(probs)
    got = draws(lambda k: nucleus_sampling(scores, k), 20000, seed)
    stat, df = chi2_statistic(np.bincount(got, minlength=40), expected)
    assert df >= 3
    assert stat < chi2_critical(df), f"chi2 {stat:.1f} >= {chi2_critical(df):.1f} (df {df})"


def test_random_sampling_frequencies_chi_square() -> None:
    logits = np.random.default_rng(5).normal(size=30).astype(np.float32)
    scores = mx.array(logits)
    got = draws(lambda k: random_sampling(scores, k), 20000, 7)
    stat, df = chi2_statistic(np.bincount(got, minlength=30), softmax(logits.astype(np.float64)))
    assert stat < chi2_critical(df), f"chi2 {stat:.1f} >= {chi2_critical(df):.1f} (df {df})"


def ras_expected(logits: np.ndarray, recent: list[int], exclude_repeated: bool) -> np.ndarray:
    """Exact token distribution of `ras_sampling` (win_size covering `recent`, one repeat triggers)."""
    ids, probs = nucleus_candidates(mx.array(logits.astype(np.float32)), 0.8, 25)
    full = softmax(logits)
    expected = np.zeros(len(logits))
    for tok, p in zip(ids, np.array(probs, dtype=np.float64)):
        if tok in recent:  # rep_num >= win_size * tau_r = 1
            alt = full.copy()
            if exclude_repeated:
                alt[tok] = 0
                alt /= alt.sum()
            expected += p * alt
        else:
            expected[tok] += p
    return expected


def pooled_chi2(counts: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """Chi-square with the rare tokens pooled into one bin (every expected count >= 5)."""
    rare = expected * counts.sum() < 5
    return chi2_statistic(
        np.append(counts[~rare], counts[rare].sum()),
        np.append(expected[~rare], expected[rare].sum()),
    )


@pytest.mark.parametrize("exclude_repeated", [True, False])
def test_ras_frequencies_chi_square(exclude_repeated: bool) -> None:
    """The mixture: nucleus draw kept unless it repeats, else a fallback draw (with or without it).

    The same draws must fail against the other variant's distribution (the test has power).
    """
    logits = np.random.default_rng(6).normal(size=30).astype(np.float64) * 1.2
    scores = mx.array(logits.astype(np.float32))
    ids, _ = nucleus_candidates(scores, 0.8, 25)
    recent_list = [ids[0], ids[2], 17, -1]  # two nucleus candidates recently decoded
    recent = mx.array(recent_list, dtype=mx.int32)
    fn = lambda k: ras_sampling(scores, recent, k, 0.8, 25, 4, 0.25, exclude_repeated)  # noqa: E731
    counts = np.bincount(draws(fn, 40000, 11), minlength=30)
    stat, df = pooled_chi2(counts, ras_expected(logits, recent_list, exclude_repeated))
    assert stat < chi2_critical(df), f"chi2 {stat:.1f} >= {chi2_critical(df):.1f} (df {df})"
    other = ras_expected(logits, recent_list, not exclude_repeated)
    rare = other * counts.sum() < 5
    wrong = float(
        ((counts[~rare] - other[~rare] * counts.sum()) ** 2 / (other[~rare] * counts.sum())).sum()
    )
    assert wrong > chi2_critical(int((~rare).sum()) - 1), (
        "the chi-square test cannot tell the variants apart"
    )


def test_ras_fallback_condition() -> None:
    """A single-candidate nucleus (p > top_p) isolates the repetition rule."""
    logits = np.full(20, -8.0, dtype=np.float32)
    logits[7] = 8.0
    scores = mx.array(logits)
    key = mx.random.key(0)
    win, tau = 4, 0.5  # the fallback needs 2 repeats in the last 4 tokens
    cases = {
        (7,): False,
        (7, 7): True,
        (7, 1, 7, 1, 1): False,  # one of the two 7s is outside the window
        (1, 7, 1, 7): True,
        (): False,
    }
    for hist, fallback in cases.items():
        recent = mx.array(([-1] * win + list(hist))[-win:], dtype=mx.int32)
        tok = ras_sampling(scores, recent, key, 0.8, 25, win, tau, exclude_repeated=True).item()
        assert (tok != 7) == fallback, hist


def test_sampler_objects() -> None:
    scores = mx.random.normal((100,), key=mx.random.key(2))
    recent = empty_recent(10)
    key = mx.random.key(5)
    assert RasSampler().window == 10
    assert RasSampler(win_size=3).window == 3
    k1, _ = mx.random.split(key)
    assert RasSampler()(scores, recent, key).item() == nucleus_sampling(scores, k1).item()
    assert NucleusSampler()(scores, recent, key).item() == nucleus_sampling(scores, key).item()
    assert RandomSampler()(scores, recent, key).item() == random_sampling(scores, key).item()
