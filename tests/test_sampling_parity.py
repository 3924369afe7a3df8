"""Sampling against the official `cosyvoice.utils.common` functions (the parity reference).

The official `nucleus_sampling` builds its candidate list in a Python loop and
draws with `torch.multinomial`. Its candidate set and probabilities are read
exactly by replacing `Tensor.multinomial` during the call with one that records
its input and returns index j, for every j in turn. The repetition fallback is
observed by replacing the module's `random_sampling` with a recorder.

Tolerances: candidate sets identical, probabilities within 1e-6 (float32 softmax and
cumulative sums on both sides), fallback decisions identical. Power (`tests/power.py`),
each bug put into `cosyvoice2.sampling`: the nucleus boundary tested on the mass up to
and including a token (instead of before it) for the candidate sets; the scores rounded
to bfloat16 before the softmax (a bf16 model's logits used without the float32 cast) for
the probabilities; the fallback taken when the count exceeds `win_size * tau_r` (instead
of reaching it) for the repetition decisions.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import cosyvoice2.sampling as sampling
from tests.power import assert_power, wrapped

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def common():
    pytest.importorskip("cosyvoice", reason="the official CosyVoice code is not installed")
    from cosyvoice2_testing.shims import install_shims

    install_shims()
    from cosyvoice.utils import common

    return common


def official_candidates(common, scores: np.ndarray, top_p: float, top_k: int):
    """(ids, renormalised probabilities) of the official nucleus sampling for `scores`."""
    seen: dict[str, torch.Tensor] = {}
    pick = {"j": 0}

    def fake_multinomial(self, num_samples, replacement=False, *, generator=None):
        seen["prob"] = self.detach().clone()
        return torch.tensor([pick["j"]])

    original = torch.Tensor.multinomial
    torch.Tensor.multinomial = fake_multinomial
    try:
        ids = []
        n = None
        while n is None or pick["j"] < n:
            top = common.nucleus_sampling(torch.tensor(scores), top_p=top_p, top_k=top_k)
            n = len(seen["prob"])
            ids.append(int(top))
            pick["j"] += 1
    finally:
        torch.Tensor.multinomial = original
    prob = seen["prob"].double()
    return ids, (prob / prob.sum()).numpy()


def score_vectors() -> list[np.ndarray]:
    """Flat (vocabulary-sized, like random weights), peaked, tied and eos-masked log-probabilities."""
    rng = np.random.default_rng(0)
    out = []
    for scale in (0.5, 2.0, 4.0, 8.0):
        x = rng.normal(size=6564).astype(np.float32) * scale
        out.append(x - np.log(np.exp(x.astype(np.float64)).sum()).astype(np.float32))
    tied = np.round(rng.normal(size=6564) * 3).astype(np.float32)  # many exact ties
    out.append(tied)
    masked = out[2].copy()
    masked[6561] = -np.inf  # as `sampling_ids` masks eos
    out.append(masked)
    small = rng.normal(size=50).astype(np.float32) * 1.5
    out.append(small)
    return out


SETTINGS = [(0.8, 25), (0.5, 25), (0.95, 10), (0.3, 3)]
PROB_TOL = 1e-6


def nucleus_errors(common, settings) -> tuple[int, float]:
    """Over `settings` x `score_vectors()`: how many candidate sets differ from the official
    ones, and the max abs difference of the candidates' probabilities (over the leading
    candidates both sides have)."""
    n_differ, err = 0, 0.0
    for top_p, top_k in settings:
        for scores in score_vectors():
            ref_ids, ref_p = official_candidates(common, scores, top_p, top_k)
            ids, probs = sampling.nucleus_candidates(mx.array(scores), top_p, top_k)
            n_differ += ids != ref_ids
            n = min(len(ids), len(ref_ids))
            diff = np.abs(np.array(probs, dtype=np.float64)[:n] - ref_p[:n])
            err = max(err, float(diff.max()) if n else 1.0)
    return n_differ, err


@pytest.mark.parametrize("top_p,top_k", SETTINGS)
def test_nucleus_candidates_equal_official(common, top_p: float, top_k: int) -> None:
    for i, scores in enumerate(score_vectors()):
        ref_ids, ref_p = official_candidates(common, scores, top_p, top_k)
        ids, probs = sampling.nucleus_candidates(mx.array(scores), top_p, top_k)
        assert ids == ref_ids, f"vector {i}: candidate sets differ"
        err = float(np.abs(np.array(probs, dtype=np.float64) - ref_p).max())
        assert err <= PROB_TOL, f"vector {i}: max abs probability difference {err:.2e}"


def _inclusive_boundary(f):
    """`nucleus_mask` deciding on the mass up to and including each token."""

    def bugged(weighted_scores, top_p=0.8, top_k=25):
        ids, sorted_p, _ = f(weighted_scores, top_p, top_k)
        return ids, sorted_p, mx.cumsum(sorted_p, axis=-1) < top_p

    return bugged


def _bf16_scores(f):
    """`nucleus_mask` on scores rounded to bfloat16."""
    return lambda weighted_scores, *a: f(weighted_scores.astype(mx.bfloat16), *a)


def test_nucleus_power(common) -> None:
    assert_power(
        "nucleus candidate sets (28 cases)",
        lambda: nucleus_errors(common, SETTINGS)[0],
        0,
        wrapped(sampling, "nucleus_mask", _inclusive_boundary),
        "top_p_boundary_inclusive",
    )
    assert_power(
        "nucleus candidate probabilities (max abs diff)",
        lambda: nucleus_errors(common, SETTINGS)[1],
        PROB_TOL,
        wrapped(sampling, "nucleus_mask", _bf16_scores),
        "scores_rounded_to_bf16",
    )


def fallback_decisions(common, monkeypatch, token: int, win: int, tau: float, histories):
    """Per history: (official fallback, ours) when the nucleus is {`token`} (both draw it first)."""
    logits = np.full(40, -9.0, dtype=np.float32)
    logits[token] = 9.0
    calls = []
    monkeypatch.setattr(common, "random_sampling", lambda *a: calls.append(1) or 3)
    out = []
    for i, hist in enumerate(histories):
        calls.clear()
        common.ras_sampling(torch.tensor(logits), list(hist), 25, 0.8, 25, win, tau)
        recent = mx.array(([-1] * win + list(hist))[-win:], dtype=mx.int32)
        tok = sampling.ras_sampling(mx.array(logits), recent, mx.random.key(i), 0.8, 25, win, tau)
        out.append((bool(calls), tok.item() != token))
    return out


def random_histories() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [
        [int(t) for t in rng.choice([7, 1, 2, 3], size=length, p=[0.15, 0.3, 0.3, 0.25])]
        for length in range(0, 16)
        for _ in range(12)
    ]


def boundary_histories(win: int) -> list[list[int]]:
    """k repeats of 5 among `win` tokens, k = 0..5, repeats first or last."""
    out = []
    for k in range(0, 6):
        hist = [5] * k + [1] * (win - k)
        out += [hist, hist[::-1]]
    return out


BOUNDARY_SETTINGS = [(4, 0.5), (10, 0.3)]


def test_repetition_fallback_triggers_on_same_histories(common, monkeypatch) -> None:
    """For the same drawn token and history, the fallback runs on both sides or on neither."""
    histories = random_histories()
    decisions = fallback_decisions(common, monkeypatch, 7, 10, 0.1, histories)
    for hist, (official, ours) in zip(histories, decisions):
        assert ours == official, hist
    n_fallback = sum(official for official, _ in decisions)
    assert 0 < n_fallback < len(decisions)


@pytest.mark.parametrize("win,tau", BOUNDARY_SETTINGS)
def test_repetition_threshold_matches_official(common, monkeypatch, win: int, tau: float) -> None:
    histories = boundary_histories(win)
    for hist, (official, ours) in zip(
        histories, fallback_decisions(common, monkeypatch, 5, win, tau, histories)
    ):
        assert ours == official, hist


def test_repetition_fallback_power(common, monkeypatch) -> None:
    def disagreements() -> int:
        runs = [(7, 10, 0.1, random_histories())]
        runs += [(5, w, t, boundary_histories(w)) for w, t in BOUNDARY_SETTINGS]
        return sum(
            official != ours
            for token, win, tau, hists in runs
            for official, ours in fallback_decisions(common, monkeypatch, token, win, tau, hists)
        )

    assert_power(
        "repetition fallback decisions (216 histories)",
        disagreements,
        0,
        wrapped(sampling, "repetition_count", lambda f: lambda *a: f(*a) - 1),
        "fallback_when_count_exceeds_threshold",
    )
