"""What the report builder reads from results files: the one place to align with their formats.

**Eval results** (`eval.results_io`, `format` = "cosyvoice2-mlx eval results", version 1):

    test_set.name                 set name ("en", "zh", "hardcase" for Seed-TTS-eval's folders)
    weights                       "real" | "synthetic" | "unknown" | "none" (missing: "unknown")
    settings.precision            LLM precision of the model (e.g. "fp32", "8bit"); null = default
    settings.n_timesteps          flow-matching steps
    settings.seed, settings.tts   recorded, shown
    models.asr.model, summary.sim_encoder
    summary.metric                "WER" | "CER" | "mixed"
    summary.mean_error_rate       mean of per-utterance rates (fraction; Seed-TTS-eval's figure)
    summary.corpus_error_rate, summary.sim_mean, summary.n_total, summary.n_failed, summary.failures
    utterances[].error_rate       per-utterance rates (fraction or null when failed)
    git.commit, date

**Bench results** (`bench.results`, `schema` = "cosyvoice2-mlx-bench/1"): only these fields:

    weights.label                 "real" | "synthetic" | "unknown" (missing: "unknown")
    machine.kind, machine.cpu     shown in the report
    versions.git_commit (or versions.commit), run_id, created, settings.repeats
    cases[].id, cases[].status    only "ok" cases are read
    cases[].settings              {target, llm, dtype, steps, text, stream, kernels,
                                  first_hop, saved, final, flow_bits, cfg}; older runs
                                  lack flow_bits and cfg: read as null
    cases[].figures.<name>        median, min, max of the names in `BENCH_FIGURES`
    cases[].fidelity.reference    the id of the case a fidelity figure is measured against
    cases[].machine.kind, .cpu    the case's machine (a merged sharded run's cases may
                                  name several); without it, the run's `machine`

A results file is read only up to `MAX_RESULTS_BYTES`; a file that is not a JSON object
of this shape raises ValueError with a one-line message.

Joining (quality against speed): an eval run matches the bench cases of target
`cosyvoice2`, not streaming, with `llm` equal to the eval `precision`, `steps` equal to
`n_timesteps`, the same weights label, and the other axes at the values eval runs the
model with (`JOIN_AXES`: flow/HiFT `dtype` fp32, LLM `kernels` auto; a case without such
a key matches). The RTF of the join is the median over the matching cases of text
length `short` (the headline work), or over all matching cases when there is no
`short` one.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVAL_FORMAT = "cosyvoice2-mlx eval results"
EVAL_FORMAT_VERSION = 1
BENCH_SCHEMA_PREFIX = "cosyvoice2-mlx-bench/"
BENCH_FIGURES = (
    "rtf",
    "first_chunk_s",
    "cold_first_chunk_s",
    "new_speaker_first_chunk_s",
    "prompt_s",
    "playback_gap_max_s",
    "rss_peak_mb",
    "mlx_peak_mb",
    "token_agreement_greedy",
    "token_agreement_sampled",
    "log_mel_distance",
    "mrstft_distance",
    "f0_rmse_cents",
    "voicing_disagreement",
    "click_max",
    "wer",
    "cer",
    "sim",
)
NEW_SETTINGS = ("flow_bits", "cfg")
"""Settings that older runs lack: read as null (None)."""
MAX_RESULTS_BYTES = 64 * 1024 * 1024
JOIN_TARGET = "cosyvoice2"
JOIN_TEXT = "short"
JOIN_AXES = {"dtype": "fp32", "kernels": "auto", "flow_bits": None, "cfg": None}
WEIGHTS_MARKS = {"synthetic": " [synthetic]", "unknown": " [unknown weights]"}
"""The mark a run's label carries for weights that are not recorded as the real ones."""

# Seed-TTS-eval set names -> the paper's names.
SET_ALIASES = {
    "en": "test-en",
    "test-en": "test-en",
    "zh": "test-zh",
    "test-zh": "test-zh",
    "hardcase": "test-hard",
    "hard": "test-hard",
    "test-hard": "test-hard",
}


@dataclass(frozen=True)
class EvalRun:
    """One eval results file, flattened to what the report shows."""

    source: Path
    set_name: str
    weights: str
    precision: str | None
    n_timesteps: int | None
    seed: int | None
    tts: str | None
    asr: str | None
    sim_encoder: str | None
    metric: str
    mean_error_rate: float | None
    corpus_error_rate: float | None
    sim_mean: float | None
    n_total: int
    n_failed: int
    failures: dict[str, str]
    rates: tuple[float, ...]  # per-utterance rates of the scored utterances
    git_commit: str | None
    date: str | None

    @property
    def paper_set(self) -> str | None:
        return SET_ALIASES.get(self.set_name)

    @property
    def label(self) -> str:
        tag = WEIGHTS_MARKS.get(self.weights, "")
        if self.tts and not self.tts.startswith("cosyvoice2"):
            return f"{self.tts}{tag}"
        prec = self.precision or "default"
        steps = "?" if self.n_timesteps is None else self.n_timesteps
        return f"{prec}, {steps} steps{tag}"


@dataclass(frozen=True)
class BenchCase:
    settings: dict[str, Any]
    figures: dict[str, float]  # name -> median
    weights: str
    id: str = ""
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (min, max)
    reference: str | None = None  # fidelity.reference: the case the distances are against
    machine: str = ""  # "<kind> (<cpu>)" of the machine the case ran on (a merged run's vary)


@dataclass(frozen=True)
class BenchRun:
    source: Path
    weights: str
    machine: str
    git_commit: str | None
    run_id: str | None
    cases: tuple[BenchCase, ...] = field(default_factory=tuple)
    created: str | None = None
    repeats: int | None = None


def read_eval(path: str | Path) -> EvalRun:
    """Read an eval `results.json` (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("format") != EVAL_FORMAT or doc.get("format_version") != EVAL_FORMAT_VERSION:
        raise ValueError(f"{path}: not an eval results file (format {doc.get('format')!r})")
    s, st = doc["summary"], doc.get("settings", {})
    rates = tuple(
        u["error_rate"] for u in doc.get("utterances", []) if u.get("error_rate") is not None
    )
    return EvalRun(
        source=path,
        set_name=doc["test_set"]["name"],
        weights=doc.get("weights", "unknown"),
        precision=st.get("precision"),
        n_timesteps=st.get("n_timesteps"),
        seed=st.get("seed"),
        tts=st.get("tts"),
        asr=(doc.get("models", {}).get("asr") or {}).get("model"),
        sim_encoder=s.get("sim_encoder"),
        metric=s.get("metric", "WER"),
        mean_error_rate=s.get("mean_error_rate"),
        corpus_error_rate=s.get("corpus_error_rate"),
        sim_mean=s.get("sim_mean"),
        n_total=int(s.get("n_total", len(doc.get("utterances", [])))),
        n_failed=int(s.get("n_failed", 0)),
        failures=dict(s.get("failures", {})),
        rates=rates,
        git_commit=(doc.get("git") or {}).get("commit"),
        date=doc.get("date"),
    )


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _obj(x: Any, where: str) -> dict:
    if x is None:
        return {}
    if not isinstance(x, dict):
        raise ValueError(f"{where}: expected an object")
    return x


def _text(x: Any) -> str | None:
    return x if isinstance(x, str) else None


def read_bench(path: str | Path) -> BenchRun:
    """Read a bench results JSON (only the fields listed in this module's docstring)."""
    path = Path(path)
    if path.stat().st_size > MAX_RESULTS_BYTES:
        raise ValueError(f"{path}: larger than {MAX_RESULTS_BYTES} bytes")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSON and UTF-8 errors
        raise ValueError(f"{path}: not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a bench results file (not a JSON object)")
    schema = doc.get("schema", "")
    if not isinstance(schema, str) or not schema.startswith(BENCH_SCHEMA_PREFIX):
        raise ValueError(f"{path}: not a bench results file (schema {schema!r})")
    weights = _text(_obj(doc.get("weights"), f"{path}: weights").get("label")) or "unknown"
    machine = _obj(doc.get("machine"), f"{path}: machine")
    versions = _obj(doc.get("versions"), f"{path}: versions")
    run_settings = _obj(doc.get("settings"), f"{path}: settings")
    raw_cases = doc.get("cases", [])
    if not isinstance(raw_cases, list):
        raise ValueError(f"{path}: cases: expected a list")
    cases = []
    for i, c in enumerate(raw_cases):
        c = _obj(c, f"{path}: cases[{i}]")
        if c.get("status") != "ok":
            continue
        figs, spread = {}, {}
        for name, f in _obj(c.get("figures"), f"{path}: cases[{i}].figures").items():
            if name not in BENCH_FIGURES or not isinstance(f, dict):
                continue
            med = _number(f.get("median"))
            if med is None:
                continue
            figs[name] = med
            lo, hi = _number(f.get("min")), _number(f.get("max"))
            spread[name] = (med if lo is None else lo, med if hi is None else hi)
        settings = dict(_obj(c.get("settings"), f"{path}: cases[{i}].settings"))
        for key in NEW_SETTINGS:
            settings.setdefault(key, None)
        fidelity = c.get("fidelity")
        own = c.get("machine")
        cm = own if isinstance(own, dict) and isinstance(own.get("kind"), str) else machine
        cases.append(
            BenchCase(
                settings=settings,
                figures=figs,
                weights=_text(c.get("weights")) or weights,
                id=_text(c.get("id")) or "",
                spread=spread,
                reference=_text(fidelity.get("reference")) if isinstance(fidelity, dict) else None,
                machine=f"{cm.get('kind', '?')} ({cm.get('cpu', '?')})",
            )
        )
    commit = versions.get("git_commit", versions.get("commit"))
    repeats = run_settings.get("repeats")
    return BenchRun(
        source=path,
        weights=weights,
        machine=f"{machine.get('kind', '?')} ({machine.get('cpu', '?')})",
        git_commit=_text(commit),
        run_id=_text(doc.get("run_id")),
        cases=tuple(cases),
        created=_text(doc.get("created")),
        repeats=repeats if isinstance(repeats, int) and not isinstance(repeats, bool) else None,
    )


def join_rtf(run: EvalRun, benches: list[BenchRun]) -> float | None:
    """The RTF of an eval run's settings in the bench results (see the join rule above)."""
    matches = [
        c
        for b in benches
        for c in b.cases
        if c.settings.get("target", JOIN_TARGET) == JOIN_TARGET
        and not c.settings.get("stream", False)
        and c.settings.get("llm") == run.precision
        and c.settings.get("steps") == run.n_timesteps
        and c.weights == run.weights
        and all(c.settings.get(k, v) == v for k, v in JOIN_AXES.items())
        and "rtf" in c.figures
    ]
    short = [c for c in matches if c.settings.get("text") == JOIN_TEXT]
    chosen = short or matches
    return statistics.median(c.figures["rtf"] for c in chosen) if chosen else None


def find_files(paths: list[Path], name: str | None, suffix: str = ".json") -> list[Path]:
    """Files given directly, plus files found under given folders (by exact name or suffix)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            pattern = name if name else f"*{suffix}"
            out.extend(sorted(q for q in p.rglob(pattern) if q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out
