"""Which setting to use: the Pareto front of speed against fidelity, and two recommendations.

Pure functions on `Point`s (a label, a real-time factor, a distance where lower is
better: `mrstft_distance` on synthetic or unknown weights, WER in % on real weights).
`reports.bench_plots` draws and tabulates what these functions pick.

- `pareto_front`: the points no other point beats on both axes (lower real-time factor
  and lower distance), fastest first.
- `recommend`: (a) the best fidelity among the cases within `SPEED_FACTOR` times the
  fastest case's real-time factor, and (b) the fastest case whose distance is within a
  bound (`FIDELITY_BOUND` for `mrstft_distance`; the reference setting's WER plus
  `WER_MARGIN` for real weights, see `wer_bound`). A point can be marked not eligible
  (a case whose LLM agrees with the reference LLM on fewer than `TOKEN_AGREEMENT_BOUND`
  of its choices): it is drawn, never recommended.

Ties are broken deterministically: by the other axis, then by label. A case exactly at
a limit counts as within it (limits are compared with a relative tolerance of `REL_TOL`,
so that, e.g., 1.5 x 0.6 admits 0.9 despite binary rounding).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SPEED_FACTOR = 1.5
"""Recommendation (a) looks at the cases whose real-time factor is at most this many times
the fastest case's."""

FIDELITY_BOUND = 0.2
"""The largest `mrstft_distance` from the reference setting (fp32 LLM, fp32 flow/HiFT, 10
steps, default cfg, same inputs and seed) that recommendation (b) accepts on synthetic or
unknown weights. The distance is the mean over three STFT resolutions of spectral
convergence plus mean absolute log-magnitude difference. On the synthetic full-size model
(the default sweep, `bench/runs/default-b.json`) it admits 5 and 3 diffusion steps and
not 1; it bounds numerical drift from the reference setting, not perceived quality."""

TOKEN_AGREEMENT_BOUND = 0.9
"""The smallest `token_agreement_greedy` (the LLM's top-1 choices, teacher-forced, equal to
the reference LLM's) of a case that either recommendation may pick, where the case has
one. The audio distance alone cannot judge the LLM: on synthetic weights another token
sequence changes the audio less than fewer diffusion steps do, so a 4-bit LLM that agrees
on a third of its choices would pass an audio bound."""

REL_TOL = 1e-9
"""Relative tolerance of the limit comparisons (rounding only, not a margin)."""

WER_MARGIN = 1.0
"""On real weights, recommendation (b) accepts a case whose WER (in %) is at most the
reference setting's WER plus this many percentage points (absolute)."""


@dataclass(frozen=True)
class Point:
    """One case: its label, real-time factor (median) and distance (lower is better)."""

    label: str
    rtf: float
    distance: float
    eligible: bool = True
    """False: the case fails a gate other than the distance (e.g. `TOKEN_AGREEMENT_BOUND`);
    it stays on the plot, off the Pareto front the report draws, and is never recommended."""


@dataclass(frozen=True)
class Recommendation:
    """What `recommend` picked; None where no case qualifies (or there are no points)."""

    fastest: Point | None
    best_within_speed: Point | None
    fastest_within_bound: Point | None
    bound: float | None


def _finite(points: Iterable[Point]) -> list[Point]:
    return [p for p in points if math.isfinite(p.rtf) and math.isfinite(p.distance)]


def _at_most(x: float, limit: float) -> bool:
    return x <= limit + REL_TOL * abs(limit)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The non-dominated points, by increasing real-time factor.

    A point is dominated when another has a real-time factor and a distance no larger,
    and one of them smaller. Points equal on both axes do not dominate each other: all
    of them are kept (ordered by label). Non-finite points are left out.
    """
    front: list[Point] = []
    for p in sorted(_finite(points), key=lambda p: (p.rtf, p.distance, p.label)):
        if not front:
            front.append(p)
            continue
        last = front[-1]
        if p.distance < last.distance or (p.rtf, p.distance) == (last.rtf, last.distance):
            front.append(p)
    return front


def wer_bound(reference_wer: float | None, margin: float = WER_MARGIN) -> float | None:
    """The WER bound for real weights: the reference setting's WER plus `margin` points."""
    return None if reference_wer is None else reference_wer + margin


def recommend(
    points: Sequence[Point],
    bound: float | None = FIDELITY_BOUND,
    speed_factor: float = SPEED_FACTOR,
) -> Recommendation:
    """(a) the lowest-distance point with real-time factor <= speed_factor x the fastest's;
    (b) the lowest-real-time-factor point with distance <= bound (None when bound is None).
    The fastest is taken over every point; only eligible points are recommended.
    """
    pts = _finite(points)
    if not pts:
        return Recommendation(None, None, None, bound)
    fastest = min(pts, key=lambda p: (p.rtf, p.distance, p.label))
    limit = speed_factor * fastest.rtf
    pts = [p for p in pts if p.eligible]
    near = [p for p in pts if _at_most(p.rtf, limit)]
    best = min(near, key=lambda p: (p.distance, p.rtf, p.label)) if near else None
    within = [] if bound is None else [p for p in pts if _at_most(p.distance, bound)]
    quick = min(within, key=lambda p: (p.rtf, p.distance, p.label)) if within else None
    return Recommendation(fastest, best, quick, bound)
