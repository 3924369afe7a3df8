"""Results files: one JSON document per run, written atomically after every case.

Layout (`SCHEMA` = "cosyvoice2-mlx-bench/1"; `validate` checks it):

    schema, run_id, status ("running" | "interrupted" | "complete"), created, updated, command
    machine   {kind, os, os_release, platform, arch, cpu, cores, memory_gb, hostname}
    versions  {python, mlx, mlx_lm, numpy, cosyvoice2_mlx, git_commit, git_dirty}
    weights   {label: "synthetic" | "real" | "unknown", ...}   the main target's weights
    targets   {name: {weights, versions, env}}     per implementation that ran
    settings  {repeats, warmup, prompt_seconds, seed, fixed_length, isolate, ...}
    plan      [case settings, in run order]
    cases     [{id, settings, work, status ("ok" | "error" | "unsupported"), weights,
                figures {name: {median, min, max, n, values}}, calls [...], env,
                machine (the machine it ran on, as `machine`), started, finished,
                duration_s, error?}]
    micro     {path, ...}   optional: pytest-benchmark JSON stored beside the run
    shard     {rank, size, hostname, pid, plan}   a part of a sharded run (`bench.shards`)
    shards    [{rank, size, hostname, pid, status, machine, versions, created, updated,
                cases}]     a merged sharded run: where each rank ran

A case's machine is its own `machine` record, else the run's (older files): a run merged
from ranks on several machines holds cases of several machine kinds (`machine_kinds`),
which reports and comparisons take one kind at a time (`by_machine`).

Where they live: `bench/results/` (`RESULTS`, ignored by git) is the scratch space every
run writes to; `bench/runs/` (`RUNS`, kept in the repository) holds the runs that documents
quote (`python -m bench run --keep`, or `python -m bench keep RUN`); a baseline is such a
file kept as `bench/baselines/<machine kind>.json` (`BASELINES`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bench import SCHEMA
from bench.figures import FIGURES
from bench.interface import WEIGHTS_LABELS

STATUSES = ("running", "interrupted", "complete")
CASE_STATUSES = ("ok", "error", "unsupported")
BASELINES = Path(__file__).resolve().parent / "baselines"
RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parent / "runs"


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to `path` so that readers see the old or the new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load(path: str | Path) -> dict[str, Any]:
    """Read a results file and check it; raises `ValueError` (one line) saying what is wrong."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    problems = validate(doc)
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(
            f"{path}: not a valid bench results file: " + "; ".join(problems[:5]) + more
        )
    return doc


def _need(d: Any, key: str, types: type | tuple[type, ...], where: str, out: list[str]) -> Any:
    if not isinstance(d, dict) or key not in d:
        out.append(f"{where}: missing `{key}`")
        return None
    v = d[key]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in _as_tuple(types)):
        out.append(f"{where}.{key}: expected {types}, got {type(v).__name__}")
        return None
    return v


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


_NUM = (int, float)


def validate(doc: Any) -> list[str]:
    """Every problem with a results document (empty list: valid)."""
    p: list[str] = []
    if not isinstance(doc, dict):
        return ["document: not a JSON object"]
    if doc.get("schema") != SCHEMA:
        p.append(f"schema: expected {SCHEMA!r}, got {doc.get('schema')!r}")
    _need(doc, "run_id", str, "document", p)
    status = _need(doc, "status", str, "document", p)
    if status is not None and status not in STATUSES:
        p.append(f"status: {status!r} not in {STATUSES}")
    for key in ("created", "updated"):
        _need(doc, key, str, "document", p)
    machine = _need(doc, "machine", dict, "document", p)
    if machine is not None:
        for key, t in (("kind", str), ("os", str), ("arch", str), ("cpu", str), ("cores", int)):
            _need(machine, key, t, "machine", p)
        if "memory_gb" in machine and not isinstance(machine["memory_gb"], (*_NUM, type(None))):
            p.append("machine.memory_gb: expected a number or null")
    versions = _need(doc, "versions", dict, "document", p)
    if versions is not None:
        for key in ("python", "mlx", "mlx_lm", "git_commit"):
            if key not in versions:
                p.append(f"versions: missing `{key}`")
    weights = _need(doc, "weights", dict, "document", p)
    if weights is not None:
        label = _need(weights, "label", str, "weights", p)
        if label is not None and label not in WEIGHTS_LABELS:
            p.append(f"weights.label: {label!r} not in {WEIGHTS_LABELS}")
    _need(doc, "targets", dict, "document", p)
    settings = _need(doc, "settings", dict, "document", p)
    if settings is not None:
        for key in ("repeats", "warmup"):
            _need(settings, key, int, "settings", p)
    plan = _need(doc, "plan", list, "document", p)
    cases = _need(doc, "cases", list, "document", p)
    if plan is not None and cases is not None:
        planned = set()
        for i, c in enumerate(plan):
            if not isinstance(c, dict) or "id" not in c:
                p.append(f"plan[{i}]: expected a case with an `id`")
            else:
                planned.add(c["id"])
        seen = set()
        for i, c in enumerate(cases):
            _validate_case(c, f"cases[{i}]", p)
            cid = c.get("id") if isinstance(c, dict) else None
            if cid in seen:
                p.append(f"cases[{i}]: duplicate case id {cid!r}")
            seen.add(cid)
            if cid is not None and cid not in planned:
                p.append(f"cases[{i}]: case {cid!r} is not in the plan")
        if status == "complete" and planned - seen:
            p.append(f"status is complete but cases are missing: {sorted(planned - seen)}")
    return p


def _validate_case(c: Any, where: str, p: list[str]) -> None:
    if not isinstance(c, dict):
        p.append(f"{where}: not an object")
        return
    _need(c, "id", str, where, p)
    _need(c, "settings", dict, where, p)
    status = _need(c, "status", str, where, p)
    if status is not None and status not in CASE_STATUSES:
        p.append(f"{where}.status: {status!r} not in {CASE_STATUSES}")
    if status == "error":
        _need(c, "error", str, where, p)
    if status == "unsupported":
        _need(c, "reason", str, where, p)
    if "machine" in c:
        machine = _need(c, "machine", dict, where, p)
        if machine is not None:
            _need(machine, "kind", str, f"{where}.machine", p)
    if status != "ok":
        return
    _need(c, "weights", str, where, p)
    work = _need(c, "work", dict, where, p)
    if work is not None:
        for key in ("speech_tokens", "prompt_speech_tokens", "text_tokens"):
            _need(work, key, int, f"{where}.work", p)
    figures = _need(c, "figures", dict, where, p)
    if figures is None:
        return
    for required in ("wall_s", "audio_s", "rtf", "speech_tokens", "load_s"):
        if required not in figures:
            p.append(f"{where}.figures: missing `{required}`")
    for name, f in figures.items():
        fw = f"{where}.figures.{name}"
        if name not in FIGURES:
            p.append(f"{fw}: unknown figure (register it in bench/figures.py)")
        if not isinstance(f, dict):
            p.append(f"{fw}: not an object")
            continue
        vals = [_need(f, k, _NUM, fw, p) for k in ("median", "min", "max")]
        n = _need(f, "n", int, fw, p)
        if None not in vals and not vals[1] <= vals[0] <= vals[2]:
            p.append(f"{fw}: expected min <= median <= max, got {vals[1]}, {vals[0]}, {vals[2]}")
        values = f.get("values")
        if values is not None and n is not None and len(values) != n:
            p.append(f"{fw}: {len(values)} values but n = {n}")
    if (
        work is not None
        and work.get("fixed_length")
        and "speech_tokens" in figures
        and isinstance(figures["speech_tokens"], dict)
    ):
        st = figures["speech_tokens"]
        if st.get("min") != work.get("speech_tokens") or st.get("max") != work.get("speech_tokens"):
            p.append(
                f"{where}: fixed-length work asked for {work.get('speech_tokens')} speech tokens,"
                f" calls produced {st.get('min')}..{st.get('max')}"
            )


def case_index(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in doc.get("cases", [])}


def case_machine(doc: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """The machine a case ran on: its own record, else the run's (files before per-case records)."""
    m = case.get("machine")
    return m if isinstance(m, dict) and isinstance(m.get("kind"), str) else doc.get("machine", {})


def machine_kinds(doc: dict[str, Any]) -> list[str]:
    """The machine kinds of a run's cases, in the order they first appear (the run's own kind
    for a run without cases)."""
    kinds = [case_machine(doc, c).get("kind") for c in doc.get("cases", [])]
    return list(dict.fromkeys(k for k in kinds if k)) or [doc.get("machine", {}).get("kind")]


def by_machine(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The run as one document per machine kind of its cases: each with only that kind's cases
    (and plan entries) and that kind's machine record; a one-machine run is itself."""
    kinds = machine_kinds(doc)
    if len(kinds) <= 1:
        return [(kinds[0], doc)]
    out = []
    for kind in kinds:
        cases = [c for c in doc["cases"] if case_machine(doc, c).get("kind") == kind]
        ids = {c["id"] for c in cases}
        sub = {**doc, "cases": cases, "plan": [c for c in doc["plan"] if c["id"] in ids]}
        sub["machine"] = case_machine(doc, cases[0])
        out.append((kind, sub))
    return out


def list_runs(results_dir: str | Path = RESULTS) -> list[tuple[Path, dict[str, Any] | None]]:
    """Results files in a directory (newest first), each with its document or `None` if unreadable."""
    results_dir = Path(results_dir)
    out = []
    for path in sorted(results_dir.glob("*.json"), key=lambda q: q.stat().st_mtime, reverse=True):
        if path.name.endswith(".micro.json"):
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
                doc = None
        except (OSError, json.JSONDecodeError):
            doc = None
        out.append((path, doc))
    return out


def resolve_run(ref: str | Path, results_dir: str | Path = RESULTS) -> Path:
    """A run given as a path (e.g. `bench/runs/X.json`), `latest` (the newest in the results
    dir), or a run id: `<id>.json` in the results dir, else in `bench/runs/`, else in
    `bench/baselines/` (a machine kind)."""
    p = Path(ref)
    if p.is_file():
        return p
    results_dir = Path(results_dir)
    if str(ref) == "latest":
        runs = [path for path, doc in list_runs(results_dir) if doc is not None]
        if not runs:
            raise FileNotFoundError(f"no runs in {results_dir}")
        return runs[0]
    dirs = [results_dir, RUNS, BASELINES]
    for d in dirs:
        cand = d / f"{ref}.json"
        if cand.is_file():
            return cand
    where = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(f"no run {ref!r} (not a file, not in {where})")


def keep_run(path: str | Path, runs_dir: str | Path = RUNS) -> Path:
    """Copy a complete results file (and its `.micro.json`, if any) into `runs_dir`, the
    directory of runs kept in the repository; refuses an incomplete run or an existing name."""
    import shutil

    path = Path(path)
    doc = load(path)
    if doc["status"] != "complete":
        raise ValueError(f"{path}: run is {doc['status']}; keep complete runs only")
    runs_dir = Path(runs_dir)
    dest = runs_dir / f"{doc['run_id']}.json"
    if dest.exists():
        raise FileExistsError(f"{dest} exists: runs are kept once, under their run id")
    runs_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dest)
    micro = path.with_name(f"{doc['run_id']}.micro.json")
    if micro.exists():
        shutil.copyfile(micro, runs_dir / micro.name)
    return dest
