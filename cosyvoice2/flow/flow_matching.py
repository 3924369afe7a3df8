"""`CausalConditionalCFM`: conditional flow matching solved with Euler steps and classifier-free guidance.

Port of the official `cosyvoice/flow/flow_matching.py` (inference only). The
ODE runs from the fixed official noise at t=0 to the mel at t=1 over
`n_timesteps` Euler steps on a cosine schedule `t = 1 - cos(pi/2 * s)`,
`s = 0, 1/n, ..., 1`. Each step evaluates the estimator on a batch of two (or once
per branch, see `solve_euler`): the conditional input (`mu`, speaker, prompt `cond`)
and the unconditional one (zeros for all three); the velocity is
`(1 + r) v_cond - r v_uncond` with `r = inference_cfg_rate` (0.7).

The time values follow the official float32 arithmetic exactly (`t` is
accumulated as `t + dt` and `dt` recomputed from the schedule), so the
estimator sees the same `t` as the official one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from cosyvoice2 import branches
from cosyvoice2.config import CFMConfig
from cosyvoice2.flow.conditional_decoder import ConditionalDecoder
from cosyvoice2.flow.decoder import CausalConditionalDecoder
from cosyvoice2.flow.noise import cfm_noise


def _torch_linspace_f32(n_points: int) -> np.ndarray:
    """`torch.linspace(0, 1, n_points)` in float32 as torch's CPU kernel computes it."""
    if n_points == 1:
        return np.zeros(1, dtype=np.float32)
    step = np.float32(1.0) / np.float32(n_points - 1)
    idx = np.arange(n_points)
    half = n_points // 2
    out = np.where(
        idx < half,
        np.float32(0.0) + step * idx.astype(np.float32),
        np.float32(1.0) - step * (n_points - 1 - idx).astype(np.float32),
    )
    return out.astype(np.float32)


def time_schedule(n_timesteps: int, scheduler: str = "cosine") -> np.ndarray:
    """The `n_timesteps + 1` time points of the solver, float32."""
    if n_timesteps < 1:
        raise ValueError(f"n_timesteps must be at least 1, got {n_timesteps}")
    t = _torch_linspace_f32(n_timesteps + 1)
    if scheduler == "cosine":
        t = np.float32(1.0) - np.cos(t * np.float32(0.5) * np.float32(np.pi)).astype(np.float32)
    elif scheduler != "linear":
        raise ValueError(f"unknown t_scheduler {scheduler!r}")
    return t.astype(np.float32)


def euler_times(n_timesteps: int, scheduler: str = "cosine") -> list[tuple[float, float]]:
    """`(t, dt)` of each Euler step, accumulated in float32 as the official `solve_euler` does."""
    span = time_schedule(n_timesteps, scheduler)
    t, dt = span[0], span[1] - span[0]
    steps = []
    for step in range(1, len(span)):
        steps.append((float(t), float(dt)))
        t = np.float32(t + dt)
        if step < len(span) - 1:
            dt = np.float32(span[step + 1] - t)
    return steps


class CausalConditionalCFM(nn.Module):
    """Holds the estimator; `__call__` solves the ODE (see module doc)."""

    estimator_class: type[nn.Module] = CausalConditionalDecoder

    def __init__(self, config: CFMConfig):
        super().__init__()
        self.config = config
        self.estimator = self.estimator_class(config.estimator)

    def __call__(
        self,
        mu: mx.array,
        mask: mx.array | None,
        n_timesteps: int,
        temperature: float = 1.0,
        spks: mx.array | None = None,
        cond: mx.array | None = None,
        streaming: bool = False,
        noise: mx.array | None = None,
        caches: Sequence[tuple[Any, Any]] | None = None,
    ) -> mx.array:
        """Generate a mel `(1, T, 80)` from encoder features `mu` `(1, T, 80)`.

        `noise` overrides the official fixed noise (its first T frames) when given.
        `spks` is the projected speaker embedding `(1, 80)`, `cond` the prompt mel
        padded with zeros to `(1, T, 80)`. `caches` (streaming): per Euler step, the
        estimator's caches of the conditional and the unconditional branch
        (`cosyvoice2.flow.cache`); None: the whole utterance.
        """
        if noise is None:
            noise = cfm_noise(mu.shape[1])
        z = noise.astype(mu.dtype) * temperature
        return self.solve_euler(z, n_timesteps, mu, mask, spks, cond, streaming, caches)

    def solve_euler(
        self,
        x: mx.array,
        n_timesteps: int,
        mu: mx.array,
        mask: mx.array | None,
        spks: mx.array | None,
        cond: mx.array | None,
        streaming: bool = False,
        caches: Sequence[tuple[Any, Any]] | None = None,
    ) -> mx.array:
        """Fixed-step Euler from `x` (noise, t=0) to t=1, with CFG (see module doc).

        Each step evaluates the two CFG branches as one batch-2 estimator call, or
        one call per branch where `branches.split()` says so (on two threads where
        `branches.enabled()`, else one after the other), and always with `caches`
        (each branch has its own streaming state).
        """
        rate = self.config.inference_cfg_rate
        times = euler_times(n_timesteps, self.config.t_scheduler)
        if caches is not None and len(caches) != len(times):
            raise ValueError(f"{len(caches)} step caches for {len(times)} Euler steps")
        mask_in = None if mask is None else mx.concatenate([mask, mask], axis=0)
        mu_in = mx.concatenate([mu, mx.zeros_like(mu)], axis=0)
        spks_in = None if spks is None else mx.concatenate([spks, mx.zeros_like(spks)], axis=0)
        cond_in = None if cond is None else mx.concatenate([cond, mx.zeros_like(cond)], axis=0)
        split = caches is not None or branches.split()

        def branch(cache: Any, *a: mx.array) -> tuple[mx.array, list]:
            # the cache's new state is returned so that the branch's thread evaluates it
            return self.estimator(*a, streaming, cache), [] if cache is None else cache.new

        for i, (t, dt) in enumerate(times):
            x_in = mx.concatenate([x, x], axis=0)
            t_in = mx.full((2,), t, dtype=x.dtype)
            inputs = (x_in, mask_in, mu_in, t_in, spks_in, cond_in)
            if split:
                step = (None, None) if caches is None else caches[i]
                (v_cond, _), (v_uncond, _) = branches.map_branches(
                    branch,
                    [
                        [step[b], *(None if a is None else a[b : b + 1] for a in inputs)]
                        for b in (0, 1)
                    ],
                )
            else:
                v = self.estimator(*inputs, streaming)
                v_cond, v_uncond = v[:1], v[1:]
            x = x + dt * ((1.0 + rate) * v_cond - rate * v_uncond)
        return x


OVERLAP_FRAMES = 34
"""Frames of noise and `mu` a first-generation stream carries from one call to the next
(`int(token_overlap_len / 50 * 22050 / 256)` for its 20 overlap tokens)."""


class OverlapCache:
    """The first generation's streaming flow cache (the official `flow_cache`), passed in by
    the caller and updated by each call: the noise and `mu` of the prompt's frames and of the
    last `OVERLAP_FRAMES` frames, `(1, n, 80)` each. The next call starts from them, so the
    frames the two calls share (the cross-faded overlap) are solved from the same start."""

    def __init__(self) -> None:
        self.z: mx.array | None = None
        self.mu: mx.array | None = None

    @property
    def size(self) -> int:
        return 0 if self.z is None else self.z.shape[1]

    def apply(self, z: mx.array, mu: mx.array, prompt_len: int) -> tuple[mx.array, mx.array]:
        """`z` and `mu` with their first frames replaced by the cache's, and the cache set to
        the prompt's and the last `OVERLAP_FRAMES` frames of the result (the official order)."""
        n = self.size
        if n:
            if n > z.shape[1]:
                raise ValueError(f"the flow cache holds {n} frames, the call has {z.shape[1]}")
            z = mx.concatenate([self.z.astype(z.dtype), z[:, n:]], axis=1)
            mu = mx.concatenate([self.mu.astype(mu.dtype), mu[:, n:]], axis=1)
        tail = slice(max(z.shape[1] - OVERLAP_FRAMES, 0), None)
        self.z = mx.concatenate([z[:, :prompt_len], z[:, tail]], axis=1)
        self.mu = mx.concatenate([mu[:, :prompt_len], mu[:, tail]], axis=1)
        return z, mu


class ConditionalCFM(CausalConditionalCFM):
    """The first generation's CFM (`MaskedDiffWithXvec`'s): the same solver with the
    non-causal estimator (`ConditionalDecoder`). Its official noise is drawn afresh for each
    call (`torch.randn_like`), not the fixed noise: here `noise`, or a draw from `key`. A
    stream passes an `OverlapCache` (`cache`) and the prompt's frame count (`prompt_len`)."""

    estimator_class = ConditionalDecoder

    def __call__(
        self,
        mu: mx.array,
        mask: mx.array | None,
        n_timesteps: int,
        temperature: float = 1.0,
        spks: mx.array | None = None,
        cond: mx.array | None = None,
        noise: mx.array | None = None,
        key: mx.array | None = None,
        prompt_len: int = 0,
        cache: OverlapCache | None = None,
    ) -> mx.array:
        """A mel `(1, T, 80)` from `mu` `(1, T, 80)` (see `CausalConditionalCFM.__call__`)."""
        if noise is None:
            noise = mx.random.normal(mu.shape, key=key)
        z = noise.astype(mu.dtype) * temperature
        if cache is not None:
            z, mu = cache.apply(z, mu, prompt_len)
        return self.solve_euler(z, n_timesteps, mu, mask, spks, cond)
