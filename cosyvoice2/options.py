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
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cosyvoice2.errors import InputError
from cosyvoice2.sampling import Sampler
from cosyvoice2.streaming import StreamSchedule, TimingHook

__all__ = ["OptionError", "SynthesisOptions"]

MIN_SPEED, MAX_SPEED = 0.25, 4.0


class OptionError(InputError, TypeError):
    """An unknown keyword option (or a bad value for one); a `TypeError` too, as for a wrong keyword."""


@dataclass(frozen=True)
class SynthesisOptions:
    """The options of one request.

    - `seed`: every random draw of the request (LLM sampling, HiFT's source noise;
      text segment `i` uses `seed + i`).
    - `n_timesteps`: flow-matching Euler steps.
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
        if not isinstance(self.n_timesteps, numbers.Integral) or self.n_timesteps < 1:
            raise OptionError(f"n_timesteps must be an integer >= 1, got {self.n_timesteps!r}")
        if not (MIN_SPEED <= self.speed <= MAX_SPEED):
            raise OptionError(f"speed must be between 0.25 and 4, got {self.speed}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise OptionError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.schedule is not None and not isinstance(self.schedule, StreamSchedule):
            raise OptionError(f"schedule must be a StreamSchedule, got {type(self.schedule)}")

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
        if "seed" in options:
            options["seed"] = int(options["seed"])
        return dataclasses.replace(base, **options) if base is not None else cls(**options)

    @property
    def stream_schedule(self) -> StreamSchedule:
        return self.schedule if self.schedule is not None else StreamSchedule()
