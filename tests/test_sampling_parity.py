"""Sampling against the official `cosyvoice.utils.common` functions (the parity reference).

The official `nucleus_sampling` builds its candidate list in a Python loop and
draws with `torch.multinomial`. Its candidate set and probabilities are read
exactly by replacing `Tensor.multinomial` during the call with one that records
its input and returns index j, for every j in turn. The repetition fallback is
observed by replacing the module's `random_sampling` with a recorder.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.sampling import nucleus_candidates, ras_sampling

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def common():
    pytest.importorskip("cosyvoice", reason="the official CosyVoice code is not installed")
    from cosyvoice2.testing.shims import install_shims

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


@pytest.mark.parametrize("top_p,top_k", [(0.8, 25), (0.5, 25), (0.95, 10), (0.3, 3)])
def test_nucleus_candidates_equal_official(common, top_p: float, top_k: int) -> None:
    for i, scores in enumerate(score_vectors()):
        ref_ids, ref_p = official_candidates(common, scores, top_p, top_k)
        ids, probs = nucleus_candidates(mx.array(scores), top_p, top_k)
        assert ids == ref_ids, f"vector {i}: candidate sets differ"
        err = float(np.abs(np.array(probs, dtype=np.float64) - ref_p).max())
        assert err <= 1e-6, f"vector {i}: max abs probability difference {err:.2e}"


def test_repetition_fallback_triggers_on_same_histories(common, monkeypatch) -> None:
    """For the same drawn token and history, the fallback runs on both sides or on neither."""
    rng = np.random.default_rng(1)
    logits = np.full(40, -9.0, dtype=np.float32)
    logits[7] = 9.0  # the nucleus is {7}: both sides draw 7 first
    calls = []

    def recorder(weighted_scores, decoded_tokens, sampling):
        calls.append(1)
        return 3

    monkeypatch.setattr(common, "random_sampling", recorder)
    win, tau = 10, 0.1
    n_checked = n_fallback = 0
    for length in range(0, 16):
        for _ in range(12):
            hist = [int(t) for t in rng.choice([7, 1, 2, 3], size=length, p=[0.15, 0.3, 0.3, 0.25])]
            calls.clear()
            common.ras_sampling(torch.tensor(logits), list(hist), 25, 0.8, 25, win, tau)
            official_fallback = bool(calls)
            recent = mx.array(([-1] * win + hist)[-win:], dtype=mx.int32)
            tok = ras_sampling(mx.array(logits), recent, mx.random.key(length), 0.8, 25, win, tau)
            assert (tok.item() != 7) == official_fallback, hist
            n_checked += 1
            n_fallback += official_fallback
    assert 0 < n_fallback < n_checked


@pytest.mark.parametrize("win,tau", [(4, 0.5), (10, 0.3)])
def test_repetition_threshold_matches_official(common, monkeypatch, win: int, tau: float) -> None:
    logits = np.full(40, -9.0, dtype=np.float32)
    logits[5] = 9.0
    calls = []
    monkeypatch.setattr(common, "random_sampling", lambda *a: calls.append(1) or 3)
    for k in range(0, 6):
        hist = [5] * k + [1] * (win - k)
        for order in (hist, hist[::-1]):
            calls.clear()
            common.ras_sampling(torch.tensor(logits), list(order), 25, 0.8, 25, win, tau)
            recent = mx.array(order[-win:], dtype=mx.int32)
            tok = ras_sampling(mx.array(logits), recent, mx.random.key(k), 0.8, 25, win, tau)
            assert (tok.item() != 5) == bool(calls), (k, order)
