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
    versions.git_commit, run_id, created
    cases[].status                only "ok" cases are read
    cases[].settings              {target, llm, dtype, steps, text, stream}
    cases[].figures.<name>.median for rtf, first_chunk_s, rss_peak_mb, mlx_peak_mb

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
BENCH_FIGURES = ("rtf", "first_chunk_s", "rss_peak_mb", "mlx_peak_mb")
JOIN_TARGET = "cosyvoice2"
JOIN_TEXT = "short"
JOIN_AXES = {"dtype": "fp32", "kernels": "auto"}
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
    figures: dict[str, float]
    weights: str


@dataclass(frozen=True)
class BenchRun:
    source: Path
    weights: str
    machine: str
    git_commit: str | None
    run_id: str | None
    cases: tuple[BenchCase, ...] = field(default_factory=tuple)


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


def read_bench(path: str | Path) -> BenchRun:
    """Read a bench results JSON (only the fields listed in this module's docstring)."""
    path = Path(path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    schema = doc.get("schema", "")
    if not isinstance(schema, str) or not schema.startswith(BENCH_SCHEMA_PREFIX):
        raise ValueError(f"{path}: not a bench results file (schema {schema!r})")
    weights = (doc.get("weights") or {}).get("label", "unknown")
    machine = doc.get("machine") or {}
    cases = []
    for c in doc.get("cases", []):
        if c.get("status") != "ok":
            continue
        figs = {
            name: float(f["median"])
            for name, f in (c.get("figures") or {}).items()
            if name in BENCH_FIGURES and isinstance(f, dict) and f.get("median") is not None
        }
        cases.append(
            BenchCase(
                settings=dict(c.get("settings", {})),
                figures=figs,
                weights=c.get("weights", weights),
            )
        )
    return BenchRun(
        source=path,
        weights=weights,
        machine=f"{machine.get('kind', '?')} ({machine.get('cpu', '?')})",
        git_commit=(doc.get("versions") or {}).get("git_commit"),
        run_id=doc.get("run_id"),
        cases=tuple(cases),
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
