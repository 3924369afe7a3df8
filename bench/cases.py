"""Bench cases (one point of a sweep), the work each case does, and the sweeps.

A case is a frozen set of settings along the sweep axes (the LLM precision, the
flow/HiFT dtype, the diffusion steps, the text length, streaming) plus which
implementation runs it (`target`). Its `work` is derived from the settings and
the run's prompt length: how many prompt and text tokens go in, how many speech
tokens come out. On synthetic weights the number of speech tokens is fixed (the
end-of-speech token is masked until the target length, see
`bench.fixed_length`), so two runs of the same case do the same work.

Sweeps are chosen by flags or a TOML/JSON sweep file (`load_sweep_file`):

    [sweep]                 # cartesian product of these axes
    llm = ["fp32", "8bit"]
    steps = [1, 10]
    stream = [false, true]

    [[case]]                # extra cases; unset axes take the defaults
    llm = "4bit"
    steps = 3

    [run]                   # run options (same names as the CLI flags)
    repeats = 3
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The axes and the values each may take.
LLM_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "8bit", "4bit")
DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
STEPS: tuple[int, ...] = (1, 2, 3, 5, 10)
TEXT_LENGTHS: dict[str, float] = {"short": 5.0, "medium": 15.0, "long": 30.0}
"""Seconds of speech each text length asks for (`short` is the headline 5 s)."""

TARGETS: tuple[str, ...] = ("cosyvoice2", "official", "mlx-audio-plus", "toy")
REFERENCES: tuple[str, ...] = ("official", "mlx-audio-plus")
"""Implementations ours is compared with (`--reference`): their cases are twins of ours."""
KERNELS: tuple[str, ...] = ("auto", "off")
"""The speech LM's optional CPU kernels (`cosyvoice2.load(llm_kernels=...)`): `auto` uses
them where they apply (bf16/8-bit on a CPU that has them), `off` keeps MLX's own ops."""

# Rates of the CosyVoice2 model (config: token_frame_rate, token_mel_ratio, sample_rate).
SPEECH_TOKEN_RATE = 25  # speech tokens per second of audio
MEL_RATE = 50  # mel frames per second of audio (token_mel_ratio 2)
# Text tokens per second of speech, about what English text gives with the Qwen2 BPE
# (2.5-3 words/s, about 2 tokens per word). With the headline work (3 s prompt, 5 s
# speech) the LLM prefill is 1 + 15 + 28 + 1 + 75 = 120 positions.
TEXT_TOKENS_PER_SECOND = 5.6
PROMPT_TEXT_TOKENS_PER_SECOND = 5.0

HEADLINE = {
    "llm": "fp32",
    "dtype": "fp32",
    "steps": 10,
    "text": "short",
    "stream": False,
    "kernels": "auto",
    "first_hop": None,
    "saved": False,
    "final": "full",
    "flow_bits": None,
    "cfg": None,
}
AXES = tuple(HEADLINE)
FLOW_BITS: tuple[int, ...] = (8, 4, 16)
"""The flow's linear layers quantised with MLX's own quantisation (`cosyvoice2.load(flow_bits=)`),
or 16: the estimator's transformer projections in bfloat16."""
FINALS = ("full", "chunked")
LOW_LATENCY_FIRST_HOP = 10
"""First hop (tokens) of the default sweep's low-latency streaming case: 0.24 s of audio in the
first chunk (10 tokens = 20 mel frames, less HiFT's 8-frame hold-back) against 0.84 s for the
official schedule."""


@dataclass(frozen=True)
class Case:
    """One point of a sweep. `id` is stable and names the case in results and comparisons."""

    target: str = "cosyvoice2"
    llm: str = "fp32"
    dtype: str = "fp32"
    steps: int = 10
    text: str = "short"
    stream: bool = False
    kernels: str = "auto"
    first_hop: int | None = None
    """Streaming: tokens in the first chunk (no padding); `None` is the official schedule
    (25, padded so prompt + hop is a multiple of 25)."""
    saved: bool = False
    """A saved speaker: the LLM's prompt-text prefix (`prefix_id`) and the flow's prompt
    state (`spk_id`, streaming) are computed on the first call and reused by later ones."""
    final: str = "full"
    """Streaming: the last chunk as the official code renders it (`full`: a whole flow pass
    with full attention) or chunk-masked from the flow cache (`chunked`: O(n) in all;
    `StreamSchedule(final_full_attention=False)`)."""
    flow_bits: int | None = None
    """The flow's linear layers quantised to 8 or 4 bits, or (16) the estimator's transformer
    projections in bfloat16 (`None`: float, the case's `dtype`)."""
    cfg: float | None = None
    """Classifier-free guidance strength of the flow (`inference_cfg_rate`; `None`: the
    model's own, 0.7)."""

    def __post_init__(self) -> None:
        if self.flow_bits is not None and (
            isinstance(self.flow_bits, bool) or self.flow_bits not in FLOW_BITS
        ):
            raise ValueError(
                f"flow_bits must be one of {FLOW_BITS} or none, got {self.flow_bits!r}"
            )
        if self.cfg is not None:
            if isinstance(self.cfg, bool) or not isinstance(self.cfg, (int, float)):
                raise ValueError(f"cfg must be a number or none, got {self.cfg!r}")
            if not math.isfinite(self.cfg) or self.cfg < 0:
                raise ValueError(f"cfg must be a finite number >= 0, got {self.cfg!r}")
            object.__setattr__(self, "cfg", float(self.cfg))
        if not isinstance(self.saved, bool):
            raise ValueError(f"saved must be true or false, got {self.saved!r}")
        if self.final not in FINALS:
            raise ValueError(f"final must be one of {FINALS}, got {self.final!r}")
        if self.llm not in LLM_PRECISIONS:
            raise ValueError(f"llm precision must be one of {LLM_PRECISIONS}, got {self.llm!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.text not in TEXT_LENGTHS:
            raise ValueError(f"text must be one of {tuple(TEXT_LENGTHS)}, got {self.text!r}")
        if not isinstance(self.stream, bool):
            raise ValueError(f"stream must be true or false, got {self.stream!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.first_hop is not None and (
            not isinstance(self.first_hop, int)
            or isinstance(self.first_hop, bool)
            or self.first_hop < 1
        ):
            raise ValueError(
                f"first_hop must be a positive integer or official, got {self.first_hop!r}"
            )

    @property
    def id(self) -> str:
        """`target/llm=../dtype=../steps=../text=../stream=..`, then the optional axes when not
        at their defaults (`/kernels=off`, `/first_hop=10`, `/saved=on`, `/final=chunked`),
        so older ids stay valid."""
        stream = "on" if self.stream else "off"
        out = (
            f"{self.target}/llm={self.llm}/dtype={self.dtype}/steps={self.steps}"
            f"/text={self.text}/stream={stream}"
        )
        if self.kernels != "auto":
            out += f"/kernels={self.kernels}"
        if self.first_hop is not None:
            out += f"/first_hop={self.first_hop}"
        if self.saved:
            out += "/saved=on"
        if self.final != "full":
            out += f"/final={self.final}"
        if self.flow_bits is not None:
            out += f"/flow_bits={self.flow_bits}"
        if self.cfg is not None:
            out += f"/cfg={self.cfg:g}"
        return out

    @property
    def load_key(self) -> tuple[Any, ...]:
        """Cases with the same load key can share one loaded model."""
        return (self.target, self.llm, self.dtype, self.kernels, self.flow_bits, self.cfg)

    def without_target(self) -> tuple:
        """The settings that identify the same work across implementations (for side-by-side ratios)."""
        return (self.llm, self.dtype, self.steps, self.text, self.stream)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Case:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown case settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**_coerce(data))


def _coerce(data: dict[str, Any]) -> dict[str, Any]:
    """Accept the spellings a sweep file or a flag may use (`"10"`, `"on"`, `8` for `8bit`)."""
    out = dict(data)
    if "steps" in out and isinstance(out["steps"], str):
        out["steps"] = int(out["steps"])
    if "stream" in out and isinstance(out["stream"], str):
        out["stream"] = parse_bool(out["stream"])
    if "llm" in out and isinstance(out["llm"], int):
        out["llm"] = f"{out['llm']}bit"
    if "saved" in out and isinstance(out["saved"], str):
        out["saved"] = parse_bool(out["saved"])
    if "first_hop" in out and isinstance(out["first_hop"], str):
        v = out["first_hop"].strip().lower()
        out["first_hop"] = None if v in ("official", "none", "") else int(v)
    if "flow_bits" in out and isinstance(out["flow_bits"], str):
        v = out["flow_bits"].strip().lower().removesuffix("bit")
        out["flow_bits"] = None if v in ("none", "off", "float", "") else int(v)
    if "cfg" in out and isinstance(out["cfg"], str):
        v = out["cfg"].strip().lower()
        out["cfg"] = None if v in ("none", "default", "") else float(v)
    return out


def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "on", "yes", "stream"):
        return True
    if v in ("0", "false", "off", "no", "nostream"):
        return False
    raise ValueError(f"not a boolean: {value!r} (use on/off)")


@dataclass(frozen=True)
class Work:
    """What one synthesis call of a case does, in tokens and frames.

    Inputs are synthetic and seeded (`inputs()`): prompt speech tokens, a prompt mel,
    a speaker embedding, and text token ids. The computation, and so the time, does
    not depend on their values once the output length is fixed.
    """

    prompt_seconds: float
    speech_seconds: float
    prompt_text_tokens: int
    text_tokens: int
    prompt_speech_tokens: int
    prompt_mel_frames: int
    speech_tokens: int
    seed: int = 0
    fixed_length: bool = True

    @classmethod
    def for_case(
        cls, case: Case, prompt_seconds: float = 3.0, seed: int = 0, fixed_length: bool = True
    ) -> Work:
        speech_seconds = TEXT_LENGTHS[case.text]
        return cls(
            prompt_seconds=prompt_seconds,
            speech_seconds=speech_seconds,
            prompt_text_tokens=round(prompt_seconds * PROMPT_TEXT_TOKENS_PER_SECOND),
            text_tokens=round(speech_seconds * TEXT_TOKENS_PER_SECOND),
            prompt_speech_tokens=round(prompt_seconds * SPEECH_TOKEN_RATE),
            prompt_mel_frames=round(prompt_seconds * MEL_RATE),
            speech_tokens=round(speech_seconds * SPEECH_TOKEN_RATE),
            seed=seed,
            fixed_length=fixed_length,
        )

    @property
    def prefill_positions(self) -> int:
        """LLM input length: sos + prompt text + text + task id + prompt speech tokens."""
        return 1 + self.prompt_text_tokens + self.text_tokens + 1 + self.prompt_speech_tokens

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prefill_positions"] = self.prefill_positions
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Work:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def inputs(self, text_vocab: int = 151643, speech_vocab: int = 6561) -> dict[str, Any]:
        """Seeded numpy inputs: the same arrays for every implementation and every run.

        Keys: `prompt_text` (int32, (1, P)), `text` (int32, (1, T)), `prompt_speech_token`
        (int32, (1, S)), `prompt_feat` (float32, (1, F, 80)), `embedding` (float32, (1, 192)).
        Text ids are drawn from the ordinary BPE range (below Qwen2's special tokens).
        """
        import numpy as np

        rng = np.random.default_rng(self.seed)
        return {
            "prompt_text": rng.integers(
                0, text_vocab, (1, self.prompt_text_tokens), dtype=np.int32
            ),
            "text": rng.integers(0, text_vocab, (1, self.text_tokens), dtype=np.int32),
            "prompt_speech_token": rng.integers(
                0, speech_vocab, (1, self.prompt_speech_tokens), dtype=np.int32
            ),
            "prompt_feat": rng.standard_normal((1, self.prompt_mel_frames, 80)).astype(np.float32),
            "embedding": rng.standard_normal((1, 192)).astype(np.float32),
        }

    def prompt_wav(self, sample_rate: int = 24000) -> Any:
        """A seeded prompt recording of `prompt_seconds` (float32, mono) for the cold call's
        prompt processing: a voiced harmonic sound with a wandering pitch plus a little noise.
        Prompt processing costs the same for any audio of that length."""
        import numpy as np

        rng = np.random.default_rng(self.seed + 1)
        n = round(self.prompt_seconds * sample_rate)
        t = np.arange(n) / sample_rate
        f0 = 140.0 + 30.0 * np.sin(2 * np.pi * 0.7 * t)
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        wav = sum(np.sin(k * phase) / k for k in range(1, 9)) * 0.15
        wav = wav + 0.01 * rng.standard_normal(n)
        return wav.astype(np.float32)


@dataclass
class Sweep:
    """A list of cases plus run options read from a sweep file (flags override them)."""

    cases: list[Case] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


def product(target: str = "cosyvoice2", **axes: list[Any]) -> list[Case]:
    """Every combination of the given axis values (unset axes take the headline value)."""
    unknown = set(axes) - set(AXES)
    if unknown:
        raise ValueError(f"unknown axes {sorted(unknown)}; known: {AXES}")
    names = list(AXES)
    values = [axes.get(n) or [HEADLINE[n]] for n in names]
    return [
        Case.from_dict({"target": target, **dict(zip(names, combo))})
        for combo in itertools.product(*values)
    ]


def dedupe(cases: list[Case]) -> list[Case]:
    """Drop repeated cases, keeping the first occurrence's position."""
    seen: set[str] = set()
    out = []
    for c in cases:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


DEFAULT_SWEEP_REPEATS = 1
"""Timed calls per case of the default sweep (after the cold call): one, so that the sweep
ends within about 15 minutes on a 2-core CPU; a single call's figure carries the machine's
run-to-run noise (stated in the report)."""


def default_cases(target: str = "cosyvoice2") -> list[Case]:
    """The default sweep: what a user chooses from, kept to about 15 minutes with full-size
    weights on a 2-core CPU (one timed call per case, `DEFAULT_SWEEP_REPEATS`).

    The reference setting first (fp32, 10 steps, 5 s of speech, no streaming: every other
    case's fidelity is measured against its output), then fewer diffusion steps (5, 3, 1),
    the 8- and 4-bit speech LM, the bf16 flow and HiFT, the flow estimator's products in
    bf16 (`flow_bits=16`), and streaming on the official schedule and in its fastest setup
    (a first chunk of `LOW_LATENCY_FIRST_HOP` tokens, a saved speaker, the chunk-masked
    last chunk). The flow quantised to 8 or 4 bits is left to `--flow-bits`: MLX's
    quantised matmul is a slow path on the CPU.
    """
    return [
        Case(target=target),
        Case(target=target, steps=5),
        Case(target=target, steps=3),
        Case(target=target, steps=1),
        Case(target=target, llm="8bit"),
        Case(target=target, llm="4bit"),
        Case(target=target, dtype="bf16"),
        Case(target=target, flow_bits=16),
        Case(target=target, stream=True),
        Case(
            target=target,
            stream=True,
            first_hop=LOW_LATENCY_FIRST_HOP,
            saved=True,
            final="chunked",
        ),
    ]


def quick_cases(target: str = "cosyvoice2") -> list[Case]:
    """The CI sweep: the headline case, non-streaming and streaming."""
    return [Case(target=target), Case(target=target, stream=True)]


def full_cases(target: str = "cosyvoice2") -> list[Case]:
    """Everything: every LLM precision x steps x text length x streaming at fp32 flow/HiFT,
    the other flow/HiFT dtypes at the headline settings, the LLM precisions without the
    CPU kernels, and the low-latency first hop per text length."""
    cases = product(
        target,
        llm=list(LLM_PRECISIONS),
        steps=list(STEPS),
        text=list(TEXT_LENGTHS),
        stream=[False, True],
    )
    cases += product(target, dtype=list(DTYPES[1:]), stream=[False, True])
    cases += product(target, llm=list(LLM_PRECISIONS), kernels=["off"])
    cases += product(
        target, text=list(TEXT_LENGTHS), stream=[True], first_hop=[LOW_LATENCY_FIRST_HOP]
    )
    return dedupe(cases)


def reference_cases(cases: list[Case], target: str = "official") -> list[Case]:
    """A reference implementation's cases beside a sweep (`target`: `official` or
    `mlx-audio-plus`): the headline work (fp32, 10 steps, 5 s of speech), streaming off and
    on where the sweep has them, plus twins of the sweep's other fp32 cases (neither has a
    quantised or reduced-precision path here). What a reference cannot run (the peer's
    streaming) is recorded as unsupported, with its reason, when the sweep runs."""
    out = [Case(target=target, **{**HEADLINE, "stream": s}) for s in (False, True)]
    out = [c for c in out if any(x.stream == c.stream for x in cases)] or out[:1]
    for c in cases:
        if c.llm == "fp32" and c.dtype == "fp32" and c.flow_bits is None and c.cfg is None:
            # references have one schedule and no kernels: a twin uses the defaults
            out.append(
                dataclasses.replace(
                    c, target=target, kernels="auto", first_hop=None, saved=False, final="full"
                )
            )
    return dedupe(out)


def load_sweep_file(path: str | Path, target: str = "cosyvoice2") -> Sweep:
    """Read a TOML or JSON sweep file (`[sweep]` axes, `[[case]]` extra cases, `[run]` options)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(text)
    unknown = set(data) - {"sweep", "case", "run"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)} (use sweep, case, run)")
    cases: list[Case] = []
    if "sweep" in data:
        axes = {k: v if isinstance(v, list) else [v] for k, v in data["sweep"].items()}
        bad = set(axes) - set(AXES)
        if bad:
            raise ValueError(f"{path}: unknown sweep axes {sorted(bad)}")
        cases += product(target, **{k: [_coerce({k: x})[k] for x in v] for k, v in axes.items()})
    for extra in data.get("case", []):
        cases.append(Case.from_dict({"target": target, **extra}))
    return Sweep(cases=dedupe(cases), options=dict(data.get("run", {})))
