"""Eval results files: per-utterance rows and a summary, in JSON and CSV.

One run writes, in its output folder:

- `results.json`: everything: `format`/`format_version`, `date` (UTC), `git` (commit and
  whether the tree was dirty), `versions`, `machine`, `test_set`, `weights` (`real`,
  `synthetic`, `unknown` or `none`, from the model dir's own record), `settings` (TTS
  model and settings: precision, n_timesteps, seed), `models` (`tts`, `asr`, `sim`
  descriptions, the SIM encoder always named), `summary` (see `eval.metrics.Summary`,
  plus `metric` and `sim_encoder`), `by_language` (the same per language when the set
  mixes languages) and `utterances` (the rows of `eval.score.UtteranceResult`);
- `utterances.csv`: the rows (id, lang, metric, target text, hypothesis, error rate,
  counts, SIM, duration, errors);
- `summary.csv`: one row: set, weights, settings, encoders, and the summary figures.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import subprocess
import tempfile
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
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
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


def _csv_text(fields: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for row in rows:
        w.writerow({k: row.get(k) for k in fields})
    return buf.getvalue()


def _staged_file(path: Path, text: str) -> Path:
    """`text` written to a temporary file beside `path` (to be renamed onto it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _remove_stale_temps(out_dir: Path, names: list[str]) -> None:
    """Temporary files of a write that was killed before its rename (`.NAME.*.tmp`)."""
    for name in names:
        for p in out_dir.glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)


def write_results(doc: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write `results.json`, `utterances.csv` and `summary.csv` into `out_dir`.

    Each file is written whole to a temporary file and renamed onto its name, so a
    reader (or a run killed at any moment) sees each file old or new, never part of
    one. `results.json` is renamed last: when it is new, the CSVs are new too.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "utterances_csv": out_dir / "utterances.csv",
        "summary_csv": out_dir / "summary.csv",
    }
    _remove_stale_temps(out_dir, [p.name for p in paths.values()])
    json_text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
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
    texts = {
        "utterances_csv": _csv_text(_ROW_FIELDS, doc["utterances"]),
        "summary_csv": _csv_text(list(_SUMMARY_FIELDS), [flat]),
        "json": json_text,
    }
    staged: dict[str, Path] = {}
    try:
        for key, text in texts.items():
            staged[key] = _staged_file(paths[key], text)
        for key in texts:  # the CSVs first, results.json last
            os.replace(staged.pop(key), paths[key])
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
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
