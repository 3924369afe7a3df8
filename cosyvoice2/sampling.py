"""Speech-token sampling: repetition-aware (`ras_sampling`), nucleus, random and greedy.

Ports `cosyvoice.utils.common.ras_sampling`, `nucleus_sampling` and
`random_sampling` to MLX, vectorised (the official nucleus sampling walks the
sorted vocabulary in a Python loop with one tensor read per element):

- `nucleus_sampling`: softmax, stable descending sort, then the candidates are
  the leading tokens while the cumulative probability *before* each one is
  `< top_p` and fewer than `top_k` were taken; one of them is drawn with the
  renormalised probabilities. The cumulative sum is float32, as the official
  loop's `cum_prob += sorted_value[i]` is, so the candidate set is the same.
  Only the `top_k` leading tokens can be candidates, so they are found with a
  partition (O(V)) and only they are sorted; ties keep index order as in the
  official stable sort (a full argsort of the 6564 scores took longer).
- `ras_sampling` (repetition-aware sampling, VALL-E 2): draw with
  `nucleus_sampling`; if the drawn token occurs `>= win_size * tau_r` times
  among the last `win_size` decoded tokens, draw instead from the whole
  distribution (`random_sampling`).

One difference between the official versions, selectable here: the latest
upstream (`exclude_repeated=True`, the default) sets the repeated token's score
to `-inf` before the fallback draw, so the fallback never returns it; the
mid-2025 code (the `cosyvoice-minicpmo` wheel used as parity reference,
`exclude_repeated=False`) draws from the full distribution.

Randomness: every draw takes an explicit `mx.random.key`; nothing here touches
a global generator, so the same key gives the same token. Both branches of
`ras_sampling` are computed and selected with `mx.where`, so a sampling step is
one lazy graph without a host synchronisation (the decode loop reads the token
once, after scheduling the next step). The sampler objects compile their
function once (`mx.compile`), which takes less time per draw than op by op.

The recent-token window is an `int32` array of the last `win_size` tokens,
padded on the left with `-1` (which never matches a token), so its shape is
fixed and it never leaves the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx

from cosyvoice2.config import SamplingConfig

_NEG_INF = float("-inf")


def _top_k_sorted(probs: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The `k` most probable tokens in stable descending order (ties by index), and their probabilities.

    Equal to the first `k` entries of a stable descending sort of the whole
    vocabulary, in O(V): a partition finds the k-th largest value, ties at that
    value are admitted in index order, the k candidates are gathered in index
    order by a scatter and only they are sorted (stable, so ties keep index order).
    """
    v = probs.shape[-1]
    if k >= v:
        order = mx.argsort(-probs)  # stable, as torch's sort(stable=True)
        return order.astype(mx.int32), probs[order]
    kth = -mx.partition(-probs, k - 1)[k - 1]
    greater = probs > kth
    equal = probs == kth
    room = k - greater.astype(mx.int32).sum()
    take = greater | (equal & (mx.cumsum(equal.astype(mx.int32)) <= room))
    slot = mx.where(take, mx.cumsum(take.astype(mx.int32)) - 1, k)  # non-candidates go to slot k
    ids = mx.zeros((k + 1,), dtype=mx.int32).at[slot].add(mx.arange(v, dtype=mx.int32))[:k]
    cand_p = probs[ids]
    order = mx.argsort(-cand_p)  # stable over k candidates listed in index order
    return ids[order], cand_p[order]


def nucleus_mask(
    weighted_scores: mx.array, top_p: float = 0.8, top_k: int = 25
) -> tuple[mx.array, mx.array, mx.array]:
    """The `top_k` most probable token ids (stable descending), their probabilities and the nucleus mask.

    Token `ids[i]` is a candidate iff `mask[i]`: the probability mass of the
    tokens ranked before it is `< top_p` (and `i < top_k` by construction): the
    official loop's `cum_prob < top_p and len(prob) < top_k` test, evaluated
    before adding. The cumulative sum is float32 and sequential, as the official
    loop's `cum_prob += sorted_value[i]` is.
    """
    probs = mx.softmax(weighted_scores.astype(mx.float32), axis=-1)
    ids, sorted_p = _top_k_sorted(probs, top_k)
    before = mx.cumsum(sorted_p, axis=-1, inclusive=False)
    return ids, sorted_p, before < top_p


def nucleus_candidates(
    weighted_scores: mx.array, top_p: float = 0.8, top_k: int = 25
) -> tuple[list[int], mx.array]:
    """The candidate token ids (most probable first) and their renormalised probabilities.

    Reads the result on the host; meant for tests and inspection, not the decode loop.
    """
    order, sorted_p, mask = nucleus_mask(weighted_scores, top_p, top_k)
    n = int(mask.astype(mx.int32).sum().item())
    probs = sorted_p[:n]
    return order[:n].tolist(), probs / probs.sum()


def nucleus_sampling(
    weighted_scores: mx.array, key: mx.array, top_p: float = 0.8, top_k: int = 25
) -> mx.array:
    """Draw one token among the nucleus candidates with their renormalised probabilities."""
    order, sorted_p, mask = nucleus_mask(weighted_scores, top_p, top_k)
    logits = mx.where(mask, mx.log(sorted_p), _NEG_INF)
    pick = mx.random.categorical(logits, key=key)
    return order[pick].astype(mx.int32)


def random_sampling(weighted_scores: mx.array, key: mx.array) -> mx.array:
    """Draw one token from the softmax of the scores (the whole vocabulary)."""
    return mx.random.categorical(weighted_scores.astype(mx.float32), key=key).astype(mx.int32)


def greedy(weighted_scores: mx.array) -> mx.array:
    """The highest-scoring token (lowest index on ties)."""
    return mx.argmax(weighted_scores, axis=-1).astype(mx.int32)


def repetition_count(recent: mx.array, token: mx.array, win_size: int) -> mx.array:
    """How often `token` occurs among the last `win_size` entries of `recent`."""
    window = recent[-win_size:] if win_size > 0 else recent
    return (window == token).astype(mx.int32).sum()


def ras_sampling(
    weighted_scores: mx.array,
    recent: mx.array,
    key: mx.array,
    top_p: float = 0.8,
    top_k: int = 25,
    win_size: int = 10,
    tau_r: float = 0.1,
    exclude_repeated: bool = True,
) -> mx.array:
    """Repetition-aware sampling: nucleus draw, random fallback when the draw repeats.

    `recent` holds the last decoded tokens (`-1` for padding). The fallback
    condition is the official `rep_num >= win_size * tau_r`. With
    `exclude_repeated` (latest upstream) the repeated token cannot be drawn by
    the fallback; without it (mid-2025 code) it can.
    """
    k_nucleus, k_random = mx.random.split(key)
    top = nucleus_sampling(weighted_scores, k_nucleus, top_p, top_k)
    repeated = repetition_count(recent, top, win_size) >= win_size * tau_r
    scores = weighted_scores
    if exclude_repeated:
        ids = mx.arange(weighted_scores.shape[-1])
        scores = mx.where(ids == top, _NEG_INF, weighted_scores)
    alt = random_sampling(scores, k_random)
    return mx.where(repeated, alt, top)


def push_recent(recent: mx.array, token: mx.array) -> mx.array:
    """Shift the fixed-size recent-token window left by one and append `token` (lazy)."""
    if recent.shape[0] == 0:
        return recent
    return mx.concatenate([recent[1:], token.reshape(1).astype(recent.dtype)])


def empty_recent(window: int) -> mx.array:
    """A recent-token window of `window` slots, all padding."""
    return mx.full((window,), -1, dtype=mx.int32)


class Sampler(Protocol):
    """What the decode loop calls: scores (log-probabilities, shape (V,)) -> one token (int32 scalar).

    `window` is how many recent tokens the sampler looks at (the loop keeps a
    window of that size); `key` is the step's random key (ignored by greedy).
    """

    window: int

    def __call__(self, weighted_scores: mx.array, recent: mx.array, key: mx.array) -> mx.array: ...


@dataclass(frozen=True)
class RasSampler:
    """`ras_sampling` with fixed settings (the official default: top_p 0.8, top_k 25, window 10, tau_r 0.1)."""

    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1
    exclude_repeated: bool = True

    @classmethod
    def from_config(cls, config: SamplingConfig, exclude_repeated: bool = True) -> RasSampler:
        return cls(config.top_p, config.top_k, config.win_size, config.tau_r, exclude_repeated)

    @property
    def window(self) -> int:
        return self.win_size

    @functools.cached_property
    def _compiled(self) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
        return mx.compile(
            functools.partial(
                ras_sampling,
                top_p=self.top_p,
                top_k=self.top_k,
                win_size=self.win_size,
                tau_r=self.tau_r,
                exclude_repeated=self.exclude_repeated,
            )
        )

    def __call__(self, weighted_scores: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return self._compiled(weighted_scores, recent, key)


@dataclass(frozen=True)
class NucleusSampler:
    """`nucleus_sampling` alone (top-p and top-k, no repetition check)."""

    top_p: float = 0.8
    top_k: int = 25
    window: int = 0

    @functools.cached_property
    def _compiled(self) -> Callable[[mx.array, mx.array], mx.array]:
        return mx.compile(functools.partial(nucleus_sampling, top_p=self.top_p, top_k=self.top_k))

    def __call__(self, weighted_scores: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return self._compiled(weighted_scores, key)


@dataclass(frozen=True)
class RandomSampler:
    """`random_sampling`: the whole distribution."""

    window: int = 0

    def __call__(self, weighted_scores: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return random_sampling(weighted_scores, key)


@dataclass(frozen=True)
class GreedySampler:
    """Arg-max decoding (deterministic; used by parity tests)."""

    window: int = 0

    def __call__(self, weighted_scores: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return greedy(weighted_scores)
