"""Synthesis options: every keyword option a mode accepts, in one frozen dataclass.

The modes (`CosyVoice2.inference_*`, `generate`) take their options as keywords,
as before; they are gathered here once per request (`SynthesisOptions.of`), so a
misspelt option (`n_timestep=5`) is an error that names it and the valid ones
instead of being dropped by a stage that does not read it. The LLM side reads
the sampling fields, the engine (`cosyvoice2.engine`) the flow, speed and
stream fields; every mode accepts every option (voice conversion has no LLM, so
the sampling fields do not change its audio).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cosyvoice2.errors import InputError
from cosyvoice2.sampling import Sampler
from cosyvoice2.streaming import StreamSchedule, TimingHook

__all__ = ["OptionError", "SynthesisOptions"]

MIN_SPEED, MAX_SPEED = 0.25, 4.0
# Seeds are MLX random keys (64-bit); text segment `i` uses `seed + i` and HiFT's noise
# `seed + 1_000_003`, so the range leaves room above it.
MAX_SEED = 2**62
# The flow's Euler steps (the official default is 10); the cap keeps a typo such as
# `n_timesteps=10**9` from allocating a schedule of that length.
MAX_TIMESTEPS = 1000


class OptionError(InputError, TypeError):
    """An unknown keyword option (or a bad value for one); a `TypeError` too, as for a wrong keyword.

    `option` names the option at fault (None when unknown), so a front end (the CLI) can
    name its own flag."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SynthesisOptions:
    """The options of one request.

    - `seed`: every random draw of the request (LLM sampling, HiFT's source noise;
      text segment `i` uses `seed + i`); 0 to 2**62.
    - `n_timesteps`: flow-matching Euler steps, 1 to 1000.
    - `speed`: tempo change of the whole utterance (mel interpolation); not with
      streaming, as in the official code.
    - `sampling`: the LLM's sampler (`cosyvoice2.sampling`); None: the model's default.
    - `max_token_text_ratio`, `min_token_text_ratio`: bounds on the speech tokens per
      text token; `max_tokens`: a cap on the speech tokens of a segment.
    - `schedule`: the streaming schedule (`StreamSchedule`); None: the official one.
    - `timings`: a timing hook (`cosyvoice2.streaming.TimingHook`, e.g. `Timings`):
      latency events, and flow/HiFT work evaluated inside its `stage(...)` contexts.
    - `progress`: `progress(i, n, segment)` called before each of the `n` text segments.
    """

    seed: int = 0
    n_timesteps: int = 10
    speed: float = 1.0
    sampling: Sampler | None = None
    max_token_text_ratio: float = 20
    min_token_text_ratio: float = 2
    max_tokens: int | None = None
    schedule: StreamSchedule | None = None
    timings: TimingHook | None = None
    progress: Callable[[int, int, str], None] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise OptionError(f"seed must be an integer from 0 to 2**62, got {self.seed!r}", "seed")
        if not _is_int(self.n_timesteps) or not 1 <= self.n_timesteps <= MAX_TIMESTEPS:
            raise OptionError(
                f"n_timesteps must be an integer from 1 to {MAX_TIMESTEPS}, got {self.n_timesteps!r}",
                "n_timesteps",
            )
        # NaN fails every comparison, so `not (lo <= x <= hi)` rejects it too
        if not _is_real(self.speed) or not (MIN_SPEED <= self.speed <= MAX_SPEED):
            raise OptionError(f"speed must be between 0.25 and 4, got {self.speed!r}", "speed")
        for name in ("max_token_text_ratio", "min_token_text_ratio"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise OptionError(f"{name} must be a finite number >= 0, got {value!r}", name)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            raise OptionError(
                f"max_tokens must be an integer >= 0, got {self.max_tokens!r}", "max_tokens"
            )
        if self.schedule is not None and not isinstance(self.schedule, StreamSchedule):
            raise OptionError(
                f"schedule must be a StreamSchedule, got {type(self.schedule)}", "schedule"
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, base: SynthesisOptions | None = None, /, **options: Any) -> SynthesisOptions:
        """`base` (the defaults when None) with `options` set; an unknown name raises `OptionError`."""
        valid = cls.names()
        unknown = [k for k in options if k not in valid]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise OptionError(
                f"unknown option {name!r}{hint}; valid options: {', '.join(sorted(valid))}"
            )
        seed = options.get("seed")
        if _is_real(seed) and not _is_int(seed) and float(seed).is_integer():
            options["seed"] = int(seed)  # 3.0 -> 3; a fraction, NaN or inf is refused below
        elif _is_int(seed):
            options["seed"] = int(seed)  # numpy integers -> int
        return dataclasses.replace(base, **options) if base is not None else cls(**options)

    @property
    def stream_schedule(self) -> StreamSchedule:
        return self.schedule if self.schedule is not None else StreamSchedule()
