"""Eval results files: per-utterance rows and a summary, in JSON and CSV.

One run writes, in its output folder:

- `results.json`: everything: `format`/`format_version`, `date` (UTC), `git` (commit and
  whether the tree was dirty), `versions`, `machine`, `test_set`, `weights` (`real`,
  `synthetic` or `none`), `settings` (TTS model and settings: precision, n_timesteps,
  seed), `models` (`tts`, `asr`, `sim` descriptions, the SIM encoder always named),
  `summary` (see `eval.metrics.Summary`, plus `metric` and `sim_encoder`),
  `by_language` (the same per language when the set mixes languages) and `utterances`
  (the rows of `eval.score.UtteranceResult`);
- `utterances.csv`: the rows (id, lang, metric, target text, hypothesis, error rate,
  counts, SIM, duration, errors);
- `summary.csv`: one row: set, weights, settings, encoders, and the summary figures.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from eval.metrics import summarize
from eval.score import UtteranceResult

RESULTS_FORMAT = "cosyvoice2-mlx eval results"
RESULTS_FORMAT_VERSION = 1
_PACKAGES = (
    "cosyvoice2-mlx",
    "mlx",
    "mlx-whisper",
    "jiwer",
    "numpy",
    "resemblyzer",
    "torch",
    "soundfile",
    "scipy",
)


def package_versions(names: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages that shape the figures (None when absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """The commit of the working tree and whether it has uncommitted changes."""
    cwd = str(repo or Path(__file__).resolve().parent.parent)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def machine_info() -> dict[str, Any]:
    import os

    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpus": os.cpu_count(),
    }


def summary_dict(rows: list[UtteranceResult]) -> dict[str, Any]:
    """The summary of some rows, with the metric name (WER, CER or mixed)."""
    s = summarize([r.id for r in rows], [r.counts for r in rows], [r.sim for r in rows])
    d = s.to_dict()
    metrics = sorted({r.metric for r in rows})
    d["metric"] = metrics[0] if len(metrics) == 1 else "mixed"
    d["sim_failed_ids"] = [r.id for r in rows if r.sim is None]
    d["failures"] = {r.id: r.error for r in rows if r.error is not None}
    durations = [r.duration_s for r in rows if r.duration_s is not None]
    d["audio_s"] = sum(durations)
    return d


def build_results(
    rows: list[UtteranceResult],
    test_set: dict[str, Any],
    settings: dict[str, Any],
    models: dict[str, Any],
    weights: str,
) -> dict[str, Any]:
    """The results document of a run (see the module docstring)."""
    summary = summary_dict(rows)
    summary["sim_encoder"] = (models.get("sim") or {}).get("encoder")
    langs = sorted({r.lang for r in rows})
    by_language = (
        {lang: summary_dict([r for r in rows if r.lang == lang]) for lang in langs}
        if len(langs) > 1
        else {}
    )
    return {
        "format": RESULTS_FORMAT,
        "format_version": RESULTS_FORMAT_VERSION,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "versions": package_versions(),
        "machine": machine_info(),
        "test_set": test_set,
        "weights": weights,
        "settings": settings,
        "models": models,
        "summary": summary,
        "by_language": by_language,
        "utterances": [r.to_dict() for r in rows],
    }


_ROW_FIELDS = list(UtteranceResult.__dataclass_fields__)
_SUMMARY_FIELDS = (
    "test_set",
    "weights",
    "tts",
    "precision",
    "n_timesteps",
    "seed",
    "asr",
    "sim_encoder",
    "metric",
    "n_total",
    "n_scored",
    "n_failed",
    "mean_error_rate_x100",
    "corpus_error_rate",
    "sim_mean",
    "n_sim",
    "audio_s",
    "git_commit",
    "date",
)


def write_results(doc: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write `results.json`, `utterances.csv` and `summary.csv` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "utterances_csv": out_dir / "utterances.csv",
        "summary_csv": out_dir / "summary.csv",
    }
    paths["json"].write_text(
        json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
    )
    with open(paths["utterances_csv"], "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_ROW_FIELDS)
        w.writeheader()
        for row in doc["utterances"]:
            w.writerow({k: row.get(k) for k in _ROW_FIELDS})
    s, st = doc["summary"], doc["settings"]
    flat = {
        "test_set": doc["test_set"].get("name"),
        "weights": doc["weights"],
        "tts": st.get("tts"),
        "precision": st.get("precision"),
        "n_timesteps": st.get("n_timesteps"),
        "seed": st.get("seed"),
        "asr": (doc["models"].get("asr") or {}).get("model"),
        "sim_encoder": s.get("sim_encoder"),
        "git_commit": doc["git"].get("commit"),
        "date": doc["date"],
        **{k: s.get(k) for k in _SUMMARY_FIELDS if k in s},
    }
    with open(paths["summary_csv"], "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(_SUMMARY_FIELDS))
        w.writeheader()
        w.writerow({k: flat.get(k) for k in _SUMMARY_FIELDS})
    return paths


def read_results(path: str | Path) -> dict[str, Any]:
    """Read a `results.json` (or the folder holding one) and check its format."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path}: not an eval results file (format {doc.get('format')!r})")
    if doc.get("format_version") != RESULTS_FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported results format_version {doc.get('format_version')}")
    return doc
