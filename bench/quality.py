"""Perceived quality of the bench's settings: the eval harness (WER, CER, SIM) per setting.

The bench's fidelity figures measure numerical drift from the reference setting; on
real weights the question is also whether the speech stays intelligible and in the
prompt's voice. `run_quality` answers it for the `cosyvoice2`-target cases of a sweep
by running the eval harness (`eval.synth`, `eval.score`, in process) on a small fixed
set, once per distinct setting, and returns one entry per case.

The set (`QUALITY_SET`): one prompt, Allison's `queue-youarenext` ("Your call is now
first in line and will be answered by the next available representative.", 5.4 s),
and five target texts, the transcripts of five other recordings of hers
(`eval.realspeech`: Debian's `asterisk-core-sounds-en-wav` and `asterisk-core-sounds-en`).
Each utterance is zero-shot synthesis of a target text in the prompt's voice; WER is
scored against the target text, SIM against the prompt. The recording of each target
is kept as the utterance's `reference_wav` (ground truth, not used in the scores).
The texts hold no digits or symbols, so a transcript that spells them differently is
not an error, and each target's own recording transcribes exactly with `offline:tiny.en`
(WER 0: the floor of the set with that ASR). Always the same utterances, in the same order.

A case's setting, as the eval harness expresses it: the LLM precision (`llm`), the
flow/HiFT dtype (`dtype`), the diffusion steps (`steps`), `flow_bits` and `cfg`
(`inference_cfg_rate`) and the run seed. The eval harness synthesises whole
utterances, so a streaming case is scored as its non-streaming setting (its
`first_hop` and `final` with it); a saved-speaker case as the same request with the
prompt given each time; `kernels` is the load default; `text` (the bench's length) is
the set's own texts. The entry names these under `mapped`. Cases that map to the same
setting share one synthesis and one score.

Synthesis is cached per setting under `<out_dir>/<set name>/<eval tag>/` (the eval
harness's folder and names): a rerun scores again but synthesises only what is
missing or failed.

`quality_mode(weights_label, requested)`: `auto` runs only on real weights, `on`
always (on synthetic weights a plumbing check: the numbers say nothing about the
model, and each entry carries the `weights` label), `off` never.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosyvoice2.errors import CosyVoiceError

MODES = ("auto", "on", "off")
WEIGHTS_LABELS = ("synthetic", "real", "unknown")
SIM_ENCODERS = ("resemblyzer", "auto", "none")
"""Encoders `run_quality` can build without further files (WavLM-ECAPA needs a checkpoint)."""
_LLM = ("fp32", "bf16", "fp16", "8bit", "4bit")
_DTYPES = ("fp32", "bf16", "fp16")
_FLOW_BITS = (8, 4, 16)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class QualityError(CosyVoiceError):
    """Bad input to `run_quality` or `quality_mode` (one line, names the offending thing)."""


@dataclass(frozen=True)
class QualitySet:
    """A fixed test set from one Asterisk voice: one prompt clip, target texts from other clips."""

    name: str
    voice: str
    prompt: str
    targets: tuple[str, ...]


QUALITY_SET = QualitySet(
    name="bench-quality-en",
    voice="en_US_f_Allison",
    prompt="queue-youarenext",
    targets=(
        "ss-noservice",
        "dir-nomore",
        "vm-nobodyavail",
        "conf-placeintoconf",
        "tt-weasels",
    ),
)


def quality_set(spec: QualitySet = QUALITY_SET, limit: int | None = None):
    """The `eval.datasets.TestSet` of `spec` (its first `limit` targets when given).

    Raises QualityError when the recordings or transcripts are not installed (naming
    the Debian package) or a clip of `spec` is not among them.
    """
    from eval.datasets import TestSet, Utterance
    from eval.realspeech import english_transcripts, voice_dir

    try:
        d = voice_dir(spec.voice)
        texts = english_transcripts()
    except FileNotFoundError as e:
        raise QualityError(f"quality set: {e}") from None
    for clip in (spec.prompt, *spec.targets):
        if clip not in texts or not (d / f"{clip}.wav").is_file():
            raise QualityError(f"quality set: {d}/{clip}.wav or its transcript is missing")
    targets = spec.targets if limit is None else spec.targets[:limit]
    prompt_wav = (d / f"{spec.prompt}.wav").resolve()
    utts = tuple(
        Utterance(
            id=clip,
            prompt_wav=prompt_wav,
            prompt_text=texts[spec.prompt],
            target_text=texts[clip],
            lang="en",
            reference_wav=(d / f"{clip}.wav").resolve(),
        )
        for clip in targets
    )
    return TestSet(name=spec.name, source=d, format="asterisk", utterances=utts)


def quality_mode(weights_label: str, requested: str) -> bool:
    """Whether the quality pass runs: `auto` on real weights only, `on` always, `off` never."""
    if requested not in MODES:
        raise QualityError(f"quality mode must be one of {MODES}, got {requested!r}")
    if weights_label not in WEIGHTS_LABELS:
        raise QualityError(f"weights label must be one of {WEIGHTS_LABELS}, got {weights_label!r}")
    if requested == "auto":
        return weights_label == "real"
    return requested == "on"


def _load_options() -> set[str]:
    """The keyword arguments `cosyvoice2.load` takes in this version of the package."""
    import inspect

    from cosyvoice2.model import CosyVoice2

    return set(inspect.signature(CosyVoice2.load).parameters)


def eval_setting(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]] | str:
    """A bench case's settings as eval synthesis settings, with the axes mapped away.

    Returns `(setting, mapped)`: `setting` has `precision`, `n_timesteps`, `dtype`,
    `flow_bits`, `inference_cfg_rate` (None when the case leaves it at the model's
    own); `mapped` names each bench axis the eval harness does not reproduce and how it
    is scored instead. Returns a string (the reason) when the setting cannot be expressed.
    """
    llm = settings.get("llm", "fp32")
    if llm not in _LLM:
        return f"llm precision {llm!r} is not one of {_LLM}"
    dtype = settings.get("dtype", "fp32")
    if dtype not in _DTYPES:
        return f"flow/HiFT dtype {dtype!r} is not one of {_DTYPES}"
    steps = settings.get("steps", 10)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        return f"steps {steps!r} is not an integer from 1 to 1000"
    flow_bits = settings.get("flow_bits")
    if flow_bits is not None and (isinstance(flow_bits, bool) or flow_bits not in _FLOW_BITS):
        return f"flow_bits {flow_bits!r} is not one of {_FLOW_BITS}"
    cfg = settings.get("cfg")
    if cfg is not None and (
        isinstance(cfg, bool)
        or not isinstance(cfg, int | float)
        or not math.isfinite(cfg)
        or cfg < 0
    ):
        return f"cfg {cfg!r} is not a finite number >= 0"
    wanted = {"flow_bits": flow_bits, "inference_cfg_rate": cfg}
    if any(v is not None for v in wanted.values()):
        options = _load_options()
        for name, value in wanted.items():
            if value is not None and name not in options:
                return f"this cosyvoice2.load has no {name} option"
    mapped: dict[str, str] = {}
    if settings.get("stream"):
        mapped["stream"] = "scored as the non-streaming setting (eval synthesises whole utterances)"
        for axis in ("first_hop", "final"):
            if settings.get(axis) not in (None, "full"):
                mapped[axis] = "streaming only: not part of the non-streaming setting"
    if settings.get("saved"):
        mapped["saved"] = "the prompt is given with each request (same tokens, no saved speaker)"
    if settings.get("kernels", "auto") != "auto":
        mapped["kernels"] = "the load default (auto)"
    if "text" in settings:
        mapped["text"] = "the quality set's own texts"
    setting = {
        "precision": llm,
        "n_timesteps": steps,
        "dtype": dtype,
        "flow_bits": flow_bits,
        "inference_cfg_rate": None if cfg is None else float(cfg),
    }
    return setting, mapped


def _model_dir(model: str | Path) -> Path:
    """An MLX model dir for `model`: an MLX dir as is, an official dir converted once (fp32
    speech LM, in the bench's cache, shared with its `--model` runs), a hub id resolved."""
    p = Path(model)
    if p.exists():
        p = p.resolve()
        if (p / "config.json").is_file() and not (p / "llm.pt").exists():
            return p
        if (p / "llm.pt").is_file():
            from bench.targets import converted_dir

            tag = "dir-" + hashlib.sha256(str(p).encode()).hexdigest()[:12]
            try:
                return converted_dir(p, "fp32", tag)
            except CosyVoiceError as e:
                raise QualityError(f"model {model}: {e}") from None
        raise QualityError(f"model {model}: neither an MLX model dir nor an official model dir")
    if not _HUB_ID.match(str(model)):
        raise QualityError(f"model {model}: no such folder (nor a hub id owner/name)")
    from cosyvoice2.hub import resolve

    try:
        return Path(resolve(str(model)))
    except CosyVoiceError as e:
        raise QualityError(f"model {model}: {e}") from None


def _check_inputs(cases: Any, asr: Any, sim: Any, seed: Any, limit: Any) -> None:
    if not isinstance(cases, list):
        raise QualityError(f"cases must be a list of case records, got {type(cases).__name__}")
    seen: set[str] = set()
    for i, c in enumerate(cases):
        if not isinstance(c, dict):
            raise QualityError(f"case {i}: not a case record (a dict), got {type(c).__name__}")
        cid, settings = c.get("id"), c.get("settings")
        if not isinstance(cid, str) or not cid:
            raise QualityError(f"case {i}: no id")
        if not isinstance(settings, dict):
            raise QualityError(f"case {cid}: no settings dict")
        if cid in seen:
            raise QualityError(f"case {cid}: duplicate id")
        seen.add(cid)
    if not isinstance(asr, str) or not asr:
        raise QualityError(f"asr must be an mlx-whisper model name, got {asr!r}")
    if sim not in SIM_ENCODERS:
        raise QualityError(f"sim must be one of {SIM_ENCODERS}, got {sim!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise QualityError(f"seed must be an integer from 0 to 2**31-1, got {seed!r}")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit
    ):
        raise QualityError(f"limit must be a positive integer, got {limit!r}")


def _cer_x100(rows: list[Any]) -> float | None:
    """Mean character error rate (x100) of the scored rows: the same transcripts, each
    non-space character of the normalised text one token."""
    import jiwer

    from eval.metrics import normalize

    rates = []
    for r in rows:
        if r.error_rate is None or r.hypothesis is None:
            continue
        ref = " ".join(c for c in normalize(r.target_text, r.lang) if not c.isspace())
        hyp = " ".join(c for c in normalize(r.hypothesis, r.lang) if not c.isspace())
        if not ref:
            continue
        if not hyp:
            rates.append(1.0)
            continue
        out = jiwer.process_words(ref, hyp)
        rates.append((out.substitutions + out.deletions + out.insertions) / len(ref.split()))
    return 100.0 * sum(rates) / len(rates) if rates else None


class _Scorers:
    """The ASR model and speaker encoder, made on first use and shared by every setting."""

    def __init__(self, asr: str, sim: str) -> None:
        self.asr, self.sim = asr, sim
        self._made = False
        self.transcriber: Any = None
        self.encoder: Any = None

    def get(self) -> tuple[Any, Any]:
        if not self._made:
            from eval.asr import MLXWhisper
            from eval.similarity import make_encoder

            try:
                self.transcriber = MLXWhisper(self.asr)
            except Exception as e:
                raise QualityError(f"asr {self.asr!r}: {type(e).__name__}: {e}") from None
            if not self.transcriber.supports("en"):
                raise QualityError(f"asr {self.asr!r} cannot transcribe English")
            if self.sim != "none":
                try:
                    self.encoder = make_encoder(self.sim)
                except Exception as e:
                    raise QualityError(f"sim {self.sim!r}: {type(e).__name__}: {e}") from None
            self._made = True
        return self.transcriber, self.encoder


def _evaluate(
    ts: Any,
    model_dir: Path,
    setting: dict[str, Any],
    seed: int,
    out_root: Path,
    scorers: _Scorers,
) -> dict[str, Any]:
    from eval.results_io import build_results, write_results
    from eval.score import score_set
    from eval.synth import CosyVoice2Synthesizer, settings_tag, synthesize_set

    synth = CosyVoice2Synthesizer(
        model_dir,
        precision=setting["precision"],
        n_timesteps=setting["n_timesteps"],
        seed=seed,
        dtype=setting["dtype"],
        flow_bits=setting["flow_bits"],
        inference_cfg_rate=setting["inference_cfg_rate"],
    )
    out = out_root / ts.name / settings_tag(synth.describe())
    try:
        run = synthesize_set(ts, synth, out, progress=False)
    except ValueError as e:  # a folder holding a synthesis with other settings
        raise QualityError(str(e).splitlines()[0]) from None
    transcriber, encoder = scorers.get()

    def audio_for(utt_id: str):
        e = run.entries.get(utt_id)
        if e is None:
            return None, "not synthesised"
        return (run.out_dir / e.wav, None) if e.ok else (None, e.error)

    rows = score_set(ts, audio_for, transcriber, encoder, progress=False)
    models = {
        "tts": run.settings,
        "asr": transcriber.describe(),
        "sim": encoder.describe() if encoder is not None else None,
    }
    weights = run.settings.get("weights", "unknown")
    doc = build_results(rows, ts.describe(), run.settings, models, weights)
    paths = write_results(doc, out)
    s = doc["summary"]
    return {
        "wer": s["mean_error_rate_x100"],
        "cer": _cer_x100(rows),
        "sim": s["sim_mean"],
        "set": ts.name,
        "n": s["n_total"],
        "failed": s["n_failed"],
        "asr": scorers.asr,
        "sim_encoder": s["sim_encoder"],
        "results": str(paths["json"]),
        "weights": weights,
    }


def run_quality(
    model: str,
    cases: list[dict],
    out_dir: Path,
    asr: str = "offline:tiny.en",
    sim: str = "resemblyzer",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    *,
    limit: int | None = None,
) -> dict[str, dict]:
    """WER/CER (%, mean of utterances) and SIM per `cosyvoice2`-target case of a bench run.

    `model`: an MLX model dir, an official dir (converted once) or a hub id. `cases`:
    the results file's case records (`id`, `settings`; other targets are left out of
    the answer). Returns `{case_id: {"wer", "cer", "sim", "set", "n", "failed", "asr",
    "sim_encoder", "results", "weights", "setting", "mapped"}}`, or `{"skipped": reason}`
    for a case whose setting the eval harness cannot express. `progress(message)` is
    called before each setting. `limit` takes the set's first utterances only (tests).
    Bad inputs raise QualityError; a failed synthesis of an utterance is counted in
    `failed` (its reason is in the results file), not raised.
    """
    _check_inputs(cases, asr, sim, seed, limit)
    ours = [c for c in cases if c["settings"].get("target", "cosyvoice2") == "cosyvoice2"]
    answer: dict[str, dict] = {}
    groups: dict[str, tuple[dict[str, Any], list[tuple[str, dict[str, str]]]]] = {}
    for c in ours:
        got = eval_setting(c["settings"])
        if isinstance(got, str):
            answer[c["id"]] = {"skipped": got}
            continue
        setting, mapped = got
        key = repr(sorted(setting.items()))
        groups.setdefault(key, (setting, []))[1].append((c["id"], mapped))
    if not groups:
        return answer
    model_dir = _model_dir(model)
    ts = quality_set(limit=limit)
    scorers = _Scorers(asr, sim)
    out_root = Path(out_dir)
    for i, (setting, members) in enumerate(groups.values(), 1):
        if progress is not None:
            shown = ", ".join(f"{k}={v}" for k, v in setting.items() if v is not None)
            progress(f"quality {i}/{len(groups)}: {shown} ({len(members)} case(s))")
        figures = _evaluate(ts, model_dir, setting, seed, out_root, scorers)
        for cid, mapped in members:
            answer[cid] = {**figures, "setting": dict(setting), "mapped": dict(mapped)}
    return {c["id"]: answer[c["id"]] for c in ours}
