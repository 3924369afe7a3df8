"""Synthesis of a test set, cached per utterance and resumable.

The harness only needs a callable `Synthesizer(target_text, prompt_wav, prompt_text)`
returning `(mono float32 wav, sample_rate)` plus a `describe()` of its settings, so the
cache logic is independent of the model. `CosyVoice2Synthesizer` adapts the package's
model (imported lazily, so the harness runs without it); `CopySynthesizer` returns the
prompt audio itself, which makes a synthesis whose ASR and similarity are known in
advance (used by the tests and to check an eval setup end to end).

Cache layout of an output folder:

    <out>/manifest.json   settings of the synthesizer and one entry per utterance
    <out>/wavs/<id>.wav   the audio (16-bit PCM at the model's rate)

The manifest is rewritten atomically after every utterance. A rerun with the same
settings skips the utterances whose entry is complete and whose wav exists, and
retries the failed ones; a rerun with other settings is refused (use another folder,
or `overwrite=True`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from eval.audio import load_audio, save_audio
from eval.datasets import TestSet, Utterance

MANIFEST_VERSION = 1


@runtime_checkable
class Synthesizer(Protocol):
    """What the harness needs from a TTS system."""

    def __call__(
        self, target_text: str, prompt_wav: Path, prompt_text: str
    ) -> tuple[np.ndarray, int]: ...

    def describe(self) -> dict[str, Any]:
        """Model and settings, recorded with the results; equal settings mean equal audio."""
        ...


class CopySynthesizer:
    """Returns the prompt audio unchanged: a stand-in TTS with known ASR and SIM.

    ASR of its output should give back the prompt's transcript, and its speaker
    similarity to the prompt is the encoder's maximum (the same audio twice).
    """

    def __call__(
        self, target_text: str, prompt_wav: Path, prompt_text: str
    ) -> tuple[np.ndarray, int]:
        return load_audio(prompt_wav)

    def describe(self) -> dict[str, Any]:
        return {"tts": "copy-prompt", "weights": "none"}


def utterance_seed(seed: int, utt_id: str) -> int:
    """A per-utterance seed that depends only on the run seed and the id (stable on resume)."""
    return (seed * 1_000_003 + zlib.crc32(utt_id.encode("utf-8"))) % (2**31)


WEIGHTS_LABELS = ("synthetic", "real", "unknown")


def weights_label(model_dir: Path) -> str:
    """`synthetic`, `real` or `unknown`, from the model dir's own record, never assumed.

    An official dir made by `cosyvoice2_testing.synthetic` holds `synthetic.json`; an MLX
    dir records `weights` in its `config.json` (the converter writes `synthetic` or
    `unknown`). No record, or a value other than these three, is `unknown`.
    """
    if (Path(model_dir) / "synthetic.json").is_file():
        return "synthetic"
    p = Path(model_dir) / "config.json"
    if p.is_file():
        try:
            label = json.loads(p.read_text(encoding="utf-8")).get("weights")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            label = None
        if label in WEIGHTS_LABELS:
            return label
    return "unknown"


def precision_kwargs(precision: str | None) -> dict[str, Any]:
    """`cosyvoice2.load` arguments for a precision name of the bench (`bench.cases.LLM_PRECISIONS`).

    None keeps the model dir's own precision; fp32/bf16/fp16 cast the speech LM;
    `<n>bit` quantises it at load time (from a float dir).
    """
    if precision is None:
        return {}
    dtypes = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    if precision in dtypes:
        return {"llm_dtype": dtypes[precision]}
    if precision.endswith("bit") and precision[:-3].isdigit():
        return {"llm_bits": int(precision[:-3])}
    raise ValueError(f"unknown precision {precision!r}; use fp32, bf16, fp16 or <n>bit")


FLOW_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Flow/HiFT dtype names of the bench (`bench.cases.DTYPES`) -> MLX dtype names."""
FLOW_BITS = (8, 4, 16)
"""Bit widths the flow's linear layers may be quantised to (`cosyvoice2.load(flow_bits=...)`;
16: the estimator's transformer projections in bfloat16)."""


def check_synthesis_settings(
    dtype: str | None = None,
    flow_bits: int | None = None,
    inference_cfg_rate: float | None = None,
) -> None:
    """Raise ValueError (one line) for a flow/HiFT dtype, flow bit width or CFG rate out of range."""
    if dtype is not None and dtype not in FLOW_DTYPES:
        raise ValueError(f"unknown flow/HiFT dtype {dtype!r}; use one of {tuple(FLOW_DTYPES)}")
    if flow_bits is not None and (
        isinstance(flow_bits, bool) or not isinstance(flow_bits, int) or flow_bits not in FLOW_BITS
    ):
        raise ValueError(f"flow_bits must be one of {FLOW_BITS}, got {flow_bits!r}")
    if inference_cfg_rate is not None and (
        isinstance(inference_cfg_rate, bool)
        or not isinstance(inference_cfg_rate, int | float)
        or not math.isfinite(inference_cfg_rate)
        or inference_cfg_rate < 0
    ):
        raise ValueError(
            f"inference_cfg_rate must be a finite number >= 0, got {inference_cfg_rate!r}"
        )


def settings_tag(settings: dict[str, Any]) -> str:
    """The folder name of a synthesis: `<model>-<precision>-n<steps>-s<seed>`, then
    `-flow<dtype>`, `-fb<bits>` and `-cfg<rate>` only for the settings that are set (so the
    names of runs without them stay as they were); `copy-prompt` for the copy synthesizer."""
    if settings.get("tts") == "copy-prompt":
        return "copy-prompt"
    prec = settings.get("precision") or "default"
    tag = (
        f"{Path(settings['model_dir']).name}-{prec}-n{settings['n_timesteps']}-s{settings['seed']}"
    )
    if settings.get("dtype") is not None:
        tag += f"-flow{settings['dtype']}"
    if settings.get("flow_bits") is not None:
        tag += f"-fb{settings['flow_bits']}"
    if settings.get("inference_cfg_rate") is not None:
        tag += f"-cfg{settings['inference_cfg_rate']:g}"
    return tag


class CosyVoice2Synthesizer:
    """Adapter to this package's model: `cosyvoice2.load(model_dir, ...)` then `generate`.

    This is the one place that calls the model API, so it is where the eval harness
    follows changes of that API. Settings: `precision` (the speech LM's precision,
    named as in the bench: fp32, bf16, fp16, 8bit, 4bit; None keeps the dir's own),
    `n_timesteps` (flow-matching diffusion steps) and the run `seed` (each utterance
    gets `utterance_seed(seed, id)`, passed as `seed=`). Zero-shot mode: the prompt wav
    with its transcript (cross-lingual when the transcript is empty).

    The bench's other axes, each None by default (the model's own), and then neither
    passed on nor recorded in `describe()`, so the settings of older runs are unchanged:
    `dtype` (flow and HiFT cast with `set_dtype` after loading, as the bench does: fp32,
    bf16, fp16), `flow_bits` (the flow's linear layers quantised, 8 or 4) and
    `inference_cfg_rate` (the flow's classifier-free guidance rate); the last two are
    `cosyvoice2.load` keyword arguments.
    """

    takes_seed = True  # synthesize_set passes the per-utterance seed

    def __init__(
        self,
        model_dir: str | Path,
        precision: str | None = None,
        n_timesteps: int = 10,
        seed: int = 0,
        dtype: str | None = None,
        flow_bits: int | None = None,
        inference_cfg_rate: float | None = None,
    ) -> None:
        check_synthesis_settings(dtype, flow_bits, inference_cfg_rate)
        self.model_dir = Path(model_dir)
        self.precision = precision
        self._load_kwargs = precision_kwargs(precision)
        if flow_bits is not None:
            self._load_kwargs["flow_bits"] = flow_bits
        if inference_cfg_rate is not None:
            inference_cfg_rate = float(inference_cfg_rate)
            self._load_kwargs["inference_cfg_rate"] = inference_cfg_rate
        self.n_timesteps = n_timesteps
        self.seed = seed
        self.dtype = dtype
        self.flow_bits = flow_bits
        self.inference_cfg_rate = inference_cfg_rate
        self.weights = weights_label(self.model_dir)  # the dir's own record: no override
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            try:
                import cosyvoice2
            except ImportError as e:
                raise RuntimeError("the cosyvoice2 package is not importable") from e
            load = getattr(cosyvoice2, "load", None)
            if load is None:
                raise RuntimeError(
                    "cosyvoice2.load is not available in this version of the package: the "
                    "model API is not there, so only other synthesizers (e.g. --tts copy) "
                    "can be evaluated"
                )
            try:
                model = load(str(self.model_dir), **self._load_kwargs)
            except TypeError as e:
                new = [k for k in ("flow_bits", "inference_cfg_rate") if k in self._load_kwargs]
                missing = [k for k in new if repr(k) in str(e)]
                if missing:
                    raise RuntimeError(
                        f"this cosyvoice2.load does not take {missing[0]}= ({e})"
                    ) from e
                raise
            if self.dtype is not None:
                import mlx.core as mx

                dt = getattr(mx, FLOW_DTYPES[self.dtype])
                model.flow.set_dtype(dt)
                model.hift.set_dtype(dt)
            self._model = model
        return self._model

    def __call__(
        self, target_text: str, prompt_wav: Path, prompt_text: str, seed: int | None = None
    ) -> tuple[np.ndarray, int]:
        model = self._load()
        wav = model.generate(
            target_text,
            ref_audio=str(prompt_wav),
            ref_text=prompt_text,
            seed=self.seed if seed is None else seed,
            n_timesteps=self.n_timesteps,
        )
        return np.asarray(wav, dtype=np.float32).reshape(-1), int(model.sample_rate)

    def describe(self) -> dict[str, Any]:
        out = {
            "tts": "cosyvoice2-mlx",
            "model_dir": str(self.model_dir.resolve()),
            "weights": self.weights,
            "precision": self.precision,
            "n_timesteps": self.n_timesteps,
            "seed": self.seed,
        }
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.flow_bits is not None:
            out["flow_bits"] = self.flow_bits
        if self.inference_cfg_rate is not None:
            out["inference_cfg_rate"] = self.inference_cfg_rate
        return out


@dataclass
class SynthEntry:
    """One utterance's line in the manifest."""

    id: str
    target_text: str
    prompt_wav: str
    prompt_text: str
    wav: str | None = None  # relative to the output folder
    sample_rate: int | None = None
    duration_s: float | None = None
    synth_time_s: float | None = None
    seed: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.wav is not None


@dataclass
class SynthRun:
    """The manifest of an output folder."""

    out_dir: Path
    settings: dict[str, Any]
    entries: dict[str, SynthEntry]

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / "manifest.json"

    def wav_path(self, utt_id: str) -> Path | None:
        e = self.entries.get(utt_id)
        return self.out_dir / e.wav if e is not None and e.ok else None

    def failed(self) -> list[SynthEntry]:
        return [e for e in self.entries.values() if not e.ok]

    def save(self) -> None:
        data = {
            "format": "cosyvoice2-mlx synthesis manifest",
            "version": MANIFEST_VERSION,
            "settings": self.settings,
            "utterances": [asdict(e) for e in self.entries.values()],
        }
        _atomic_write_text(self.manifest_path, json.dumps(data, indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, out_dir: str | Path) -> SynthRun:
        out_dir = Path(out_dir)
        data = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"{out_dir}/manifest.json: unknown manifest version {data.get('version')}"
            )
        entries = {e["id"]: SynthEntry(**e) for e in data["utterances"]}
        return cls(out_dir=out_dir, settings=data["settings"], entries=entries)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _same_request(e: SynthEntry, u: Utterance) -> bool:
    return (e.target_text, e.prompt_wav, e.prompt_text) == (
        u.target_text,
        str(u.prompt_wav),
        u.prompt_text,
    )


def synthesize_set(
    test_set: TestSet,
    synth: Synthesizer | Callable[..., tuple[np.ndarray, int]],
    out_dir: str | Path,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SynthRun:
    """Synthesise every utterance of `test_set` into `out_dir`, reusing what is cached there.

    `settings` defaults to `synth.describe()`. A synthesizer with `takes_seed = True` is
    called with `seed=utterance_seed(settings["seed"], id)`. An utterance whose synthesis raises is
    recorded with its error (and retried on the next run); the run goes on.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    (out_dir / "wavs").mkdir(parents=True, exist_ok=True)
    if settings is None:
        settings = synth.describe() if hasattr(synth, "describe") else {"tts": repr(synth)}
    settings = json.loads(json.dumps(settings))  # plain JSON values, as stored
    if (out_dir / "manifest.json").is_file() and not overwrite:
        run = SynthRun.load(out_dir)
        if run.settings != settings:
            raise ValueError(
                f"{out_dir} holds a synthesis with other settings:\n  cached: {run.settings}\n"
                f"  asked:  {settings}\nuse another folder or overwrite=True"
            )
    else:
        run = SynthRun(out_dir=out_dir, settings=settings, entries={})
    seed = settings.get("seed")
    takes_seed = bool(getattr(synth, "takes_seed", False))
    todo = []
    for u in test_set:
        e = run.entries.get(u.id)
        if e is not None and e.ok and _same_request(e, u) and (out_dir / e.wav).is_file():
            continue
        todo.append(u)
    bar = tqdm(todo, desc=f"synthesis {test_set.name}", unit="utt", disable=not progress)
    for u in bar:
        entry = SynthEntry(
            id=u.id,
            target_text=u.target_text,
            prompt_wav=str(u.prompt_wav),
            prompt_text=u.prompt_text,
        )
        useed = utterance_seed(int(seed), u.id) if isinstance(seed, int) else None
        entry.seed = useed
        t0 = time.perf_counter()
        try:
            if takes_seed:
                wav, sr = synth(u.target_text, u.prompt_wav, u.prompt_text, seed=useed)
            else:
                wav, sr = synth(u.target_text, u.prompt_wav, u.prompt_text)
            wav = np.asarray(wav, dtype=np.float32)
            if wav.ndim != 1 or wav.size == 0:
                raise ValueError(f"synthesizer returned audio of shape {wav.shape}")
            if not np.all(np.isfinite(wav)):
                raise ValueError("synthesizer returned non-finite samples")
            rel = f"wavs/{u.id}.wav"
            save_audio(out_dir / rel, wav, sr)
            entry.wav, entry.sample_rate = rel, int(sr)
            entry.duration_s = len(wav) / float(sr)
        except Exception as exc:  # recorded and retried next run; never dropped
            entry.error = f"{type(exc).__name__}: {exc}"
        entry.synth_time_s = time.perf_counter() - t0
        run.entries[u.id] = entry
        run.save()
    # keep the manifest in set order (entries of ids no longer in the set stay, after them)
    order = [u.id for u in test_set if u.id in run.entries]
    in_set = set(order)
    rest = [k for k in run.entries if k not in in_set]
    run.entries = {k: run.entries[k] for k in order + rest}
    run.save()
    return run
