"""The interface between the harness and what it measures.

A `BenchTarget` prepares its weights once per run (`prepare`), loads a model for
a case's load settings (`load`, timed by the harness as the model load time) and
runs one synthesis call of a case (`run`), returning the raw timings of that
call as `CallTimings`. The harness does the rest: warm-up, repeats, medians,
memory, derived figures (RTF, tokens/s, seconds per audio second), results files.

Implementations (looked up by name with `get_target`):
- `cosyvoice2`: our MLX pipeline (`bench/targets.py`, the one file to adapt when the
  pipeline's API changes);
- `official`: the official PyTorch code on the same weights and work (`bench/reference.py`);
- `mlx-audio-plus`: another MLX port of CosyVoice2 on the same weights and work, in its own
  virtualenv (`bench/peer.py`);
- `toy`: a small MLX workload shaped like the pipeline (`bench/toy.py`), to test the harness.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from bench.cases import Case, Work

WEIGHTS_LABELS = ("synthetic", "real", "unknown")
"""The weights labels a result can carry: read from the weights' own record, never assumed."""


def official_dir_label(path: str | Path) -> str:
    """The weights label of an official model dir, from its own record: `synthetic` when it
    holds `synthetic.json` (written by `cosyvoice2_testing.synthetic`), else `unknown` (the
    released files carry no record that they are the release)."""
    return "synthetic" if (Path(path) / "synthetic.json").exists() else "unknown"


@dataclass
class CallTimings:
    """Raw figures of one synthesis call (seconds unless stated; `None` where not applicable).

    Times are wall-clock (`time.perf_counter`) and must cover evaluated results: MLX
    is lazy, so a target evaluates (`mx.eval`) what it times before reading the clock.
    """

    wall_s: float
    """The whole call: inputs in, every audio sample out."""
    audio_s: float
    """Seconds of audio produced (samples / sample rate)."""
    speech_tokens: int
    """Speech tokens the LLM produced."""
    ttft_s: float | None = None
    """Call start to the first speech token."""
    prefill_s: float | None = None
    """LLM prefill (the prompt's forward pass and the first sample); equals `ttft_s` when the
    target cannot separate them."""
    decode_s: float | None = None
    """First token to last token: `speech_tokens - 1` decode steps."""
    llm_s: float | None = None
    """All LLM time (prefill + decode)."""
    flow_s: float | None = None
    """Flow (encoder + CFM solve with `steps` estimator calls), all chunks together when streaming."""
    hift_s: float | None = None
    """HiFT vocoder, all chunks together when streaming."""
    first_chunk_s: float | None = None
    """Streaming: call start to the first audio chunk in hand."""
    chunk_times_s: list[float] | None = None
    """Streaming: call start to each audio chunk in hand."""
    chunk_audio_s: list[float] | None = None
    """Streaming: seconds of audio in each chunk."""
    extra: dict[str, float] = field(default_factory=dict)
    """Target-specific figures, stored as they are (not compared)."""


@dataclass
class Prepared:
    """What `prepare` resolved: where the weights are and how to label them."""

    weights: dict[str, Any]
    """At least `label` (one of `WEIGHTS_LABELS`, from the weights' own record); also `path`,
    `size`, `seed` where known."""
    options: dict[str, Any] = field(default_factory=dict)
    """Passed back to `load` (e.g. converted model dirs per precision). `python`, if set, is
    the interpreter the target's case workers run with (a target with its own virtualenv)."""
    versions: dict[str, str] = field(default_factory=dict)
    """Versions of what this target runs (e.g. torch for the official code)."""


@runtime_checkable
class BenchTarget(Protocol):
    """What the harness needs from an implementation."""

    name: str
    backend: str
    """`mlx` (workers get OpenBLAS preloaded on Linux) or `torch` (they must not)."""

    def env(self) -> dict[str, str | None]:
        """Environment changes for the worker process (`None` removes a variable)."""
        ...

    def supports(self, case: Case) -> str | None:
        """`None` if the case can run, else the reason it cannot (recorded, not an error)."""
        ...

    def prepare(self, cases: list[Case], options: dict[str, Any]) -> Prepared:
        """Make the weights the cases need (generate, convert, cache); once per run."""
        ...

    def load(self, case: Case, prepared: Prepared) -> Any:
        """Load a model for the case's load settings (`case.load_key`); timed as `load_s`."""
        ...

    def run(self, handle: Any, case: Case, work: Work) -> CallTimings:
        """One synthesis call of the case's work; returns its raw timings."""
        ...

    def unload(self, handle: Any) -> None:
        """Release the model (memory returns before the next load)."""
        ...


_REGISTRY: dict[str, str] = {
    "cosyvoice2": "bench.targets:CosyVoice2Target",
    "official": "bench.reference:OfficialTarget",
    "mlx-audio-plus": "bench.peer:PeerTarget",
    "toy": "bench.toy:ToyTarget",
}


def get_target(name: str) -> BenchTarget:
    """Instantiate the target registered under `name` (imported lazily: the official
    target's module must not import torch in the harness process)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown target {name!r}; known: {sorted(_REGISTRY)}")
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
