"""Running a sweep: one fresh worker process per case, results written after every case.

Each case runs in its own process (`python -m bench.worker`) by default, so that
- the model load time and the first call after load (cold figures) are what a user sees,
- the process peak RSS belongs to that case alone,
- each implementation gets its own environment: MLX workers run with OpenBLAS preloaded
  on Linux, the official PyTorch worker without it (the preload distorts torch timing)
  and with 2 torch threads; a target with its own virtualenv (the `mlx-audio-plus` peer)
  names its interpreter in `Prepared.options["python"]` and its case workers run with it.
`isolate=False` runs cases in this process instead (for debugging; peak RSS is then
the process's, and cold figures are only cold for the first case of each model).

The run's results file is rewritten atomically after every case. Ctrl-C stops the
sweep, keeps every finished case and marks the run `interrupted`; `resume` continues
it, skipping finished cases.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import SCHEMA
from bench.cases import Case, Work
from bench.drift import NOTES as FIDELITY_NOTES
from bench.drift import REFERENCE_SETTINGS, is_reference, reference_case, reference_path
from bench.figures import aggregate, call_figures, summarize
from bench.interface import BenchTarget, CallTimings, Prepared, get_target
from bench.machine import (
    machine_info,
    openblas_preloaded,
    peak_rss_mb,
    preloaded_blas,
    versions,
)
from bench.results import now, write_json_atomic
from sharding import LAUNCH_ENV

INTERRUPTED = 130  # exit status of an interrupted sweep (as a shell reports Ctrl-C)


@dataclass
class RunOptions:
    """Settings of a run, recorded in its results file (`settings`)."""

    repeats: int = 3
    warmup: int = 1
    prompt_seconds: float = 3.0
    seed: int = 0
    fixed_length: bool = True
    isolate: bool = True
    blas: str = "auto"
    """BLAS for MLX workers on Linux (`cosyvoice2.blas`): `auto`, `system`, `scipy-openblas32`,
    `off` (MLX's bundled reference BLAS) or a library path; given to them in `LD_PRELOAD`."""
    case_timeout: float | None = None
    device: str | None = None
    """MLX device for MLX targets (`cpu` or `gpu`); `None`: MLX's default (Metal on Apple silicon)."""
    target_options: dict[str, Any] = field(default_factory=dict)
    """Passed to each target's `prepare`: `model` (a converted or official model dir),
    `size` (`full` or `tiny` synthetic weights)."""
    fidelity: bool = True
    """Compare each case's output with the reference setting's (`bench.drift`)."""

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError("repeats must be >= 1")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------- one case


def reference_id(case: Case) -> str:
    """The id of the reference setting on `case`'s work (`bench.drift`)."""
    return reference_case(case).id


def write_reference(
    target: BenchTarget, prepared: Prepared, case: Case, work: Work, path: str
) -> None:
    """Run the reference setting once (untimed) and write its output to `path`."""
    handle = target.load(case, prepared)
    try:
        target.run(handle, case, work)
        target.fidelity(handle, case, work, Path(path))
    finally:
        target.unload(handle)


def _mlx_reset_peak() -> None:
    if "mlx.core" in sys.modules:
        mx = sys.modules["mlx.core"]
        mx.reset_peak_memory()


def _mlx_peak_mb() -> float | None:
    if "mlx.core" in sys.modules:
        return sys.modules["mlx.core"].get_peak_memory() / 1e6
    return None


def _loadavg() -> float | None:
    """The 1-minute system load average (other work on the machine distorts timings)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _mlx_device() -> str:
    """Apply `BENCH_MLX_DEVICE` (cpu/gpu) if set; return the MLX device cases run on."""
    import mlx.core as mx

    want = os.environ.get("BENCH_MLX_DEVICE")
    if want:
        mx.set_default_device(mx.gpu if want == "gpu" else mx.cpu)
    dev = mx.default_device()
    name = "gpu" if dev.type == mx.DeviceType.gpu else "cpu"
    if name == "gpu":
        try:
            name += f" ({mx.device_info().get('device_name', '')})"
        except Exception:  # older MLX: mx.metal.device_info
            pass
    return name


def measure_case(
    target: BenchTarget,
    prepared: Prepared,
    case: Case,
    work: Work,
    repeats: int,
    warmup: int,
    progress: Callable[[str], None] | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """Load, run the cold call and the warm-ups, then the timed repeats; return the case record.

    The first call after load is the cold call; it is also the first of `warmup` calls
    that are left out of the medians (with `warmup=0` it is counted as a repeat).
    Before it, for a streaming case, a target that can (`process_prompt`) times the
    processing of a new prompt wav: `prompt_s`, and with the cold call's first chunk, the
    latency of a new speaker (`new_speaker_first_chunk_s`); non-streaming cases leave it
    out, so that their peak RSS is the synthesis alone, as the official twin's is. Memory: MLX's peak is reset before each
    call and read after it; the process peak RSS is read after the last call (load plus
    every call, not the fidelity comparison after them). `reference`: the reference output's file (`bench.drift`); the last call's
    output is compared with it (`fidelity`) by a target that can.
    """
    started = now()
    load_start = _loadavg()
    t_start = time.perf_counter()
    device = _mlx_device() if getattr(target, "backend", "mlx") == "mlx" else None
    t0 = time.perf_counter()
    handle = target.load(case, prepared)
    load_s = time.perf_counter() - t0
    if progress is not None:
        progress(f"loaded in {load_s:.2f} s")
    calls: list[dict[str, Any]] = []
    prompt_s = None
    fid = None
    fid_error = None
    try:
        if case.stream and hasattr(target, "process_prompt"):
            prompt_s = target.process_prompt(handle, work)
            if progress is not None and prompt_s is not None:
                progress(f"new prompt processed in {prompt_s:.2f} s")
        for i in range(max(warmup, 0) + repeats):
            _mlx_reset_peak()
            cpu0 = time.process_time()
            timings: CallTimings = target.run(handle, case, work)
            cpu = time.process_time() - cpu0
            figs = call_figures(timings)
            figs["cpu_s"] = cpu
            if timings.wall_s > 0:
                figs["cpu_util"] = cpu / timings.wall_s
            peak = _mlx_peak_mb()
            if peak is not None:
                figs["mlx_peak_mb"] = peak
            calls.append(
                {
                    "cold": i == 0,
                    "warmup": i < warmup,
                    "figures": figs,
                    "timings": dataclasses.asdict(timings),
                }
            )
            if progress is not None:
                kind = "cold" if i == 0 else ("warm-up" if i < warmup else "timed")
                progress(
                    f"call {i + 1}/{warmup + repeats} ({kind}): wall {timings.wall_s:.2f} s,"
                    f" RTF {figs.get('rtf', float('nan')):.2f}"
                )
            if work.fixed_length and timings.speech_tokens != work.speech_tokens:
                raise RuntimeError(
                    f"fixed-length mode: asked for {work.speech_tokens} speech tokens,"
                    f" the call produced {timings.speech_tokens}"
                )
        rss = peak_rss_mb()  # the calls' work, before the fidelity figures' own
        if reference is not None and hasattr(target, "fidelity"):
            try:
                fid = target.fidelity(handle, case, work, Path(reference))
            except Exception as e:  # the timings stand without it
                fid_error = f"{type(e).__name__}: {e}".splitlines()[0]
                if progress is not None:
                    progress(f"no fidelity figures: {fid_error}")
    finally:
        target.unload(handle)
    warm = [c["figures"] for c in calls if not c["warmup"]]
    figures = aggregate(warm)
    figures["load_s"] = summarize([load_s])
    figures["rss_peak_mb"] = summarize([rss])
    cold = calls[0]["figures"]
    figures["cold_wall_s"] = summarize([cold["wall_s"]])
    if "first_chunk_s" in cold:
        figures["cold_first_chunk_s"] = summarize([cold["first_chunk_s"]])
    if prompt_s is not None:
        figures["prompt_s"] = summarize([prompt_s])
        if "first_chunk_s" in cold:
            figures["new_speaker_first_chunk_s"] = summarize([prompt_s + cold["first_chunk_s"]])
    extra: dict[str, Any] = {}
    if fid_error is not None:
        extra["fidelity"] = {"reference": reference_id(case), "error": fid_error}
    if fid is not None:
        for name, value in fid["figures"].items():
            figures[name] = summarize([value])
        label = prepared.weights.get("label", "unknown")
        extra["fidelity"] = {
            "reference": reference_id(case),
            "note": FIDELITY_NOTES.get(label, FIDELITY_NOTES["unknown"]),
            **fid["details"],
        }
    return {
        "id": case.id,
        "settings": case.to_dict(),
        "work": work.to_dict(),
        "status": "ok",
        "weights": prepared.weights.get("label", "unknown"),
        "figures": figures,
        "calls": calls,
        "env": {
            "openblas_preloaded": openblas_preloaded(),
            "blas": preloaded_blas(),
            **({"mlx_device": device} if device else {}),
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
            "pid": os.getpid(),
            **{k: os.environ[k] for k in ("OMP_NUM_THREADS", *BACKEND_SWITCHES) if k in os.environ},
            **prepared.options.get("worker_env", {}),
        },
        **extra,
        "started": started,
        "finished": now(),
        "duration_s": time.perf_counter() - t_start,
    }


# --------------------------------------------------------------------------- executors


# the switches that choose our compute backend (`cosyvoice2.backend`), recorded per case
BACKEND_SWITCHES = (
    "COSYVOICE2_KERNELS",
    "COSYVOICE2_FLOW_KERNELS",
    "COSYVOICE2_FLOW_BRANCH_THREADS",
)


def worker_env(
    target: BenchTarget, blas: str = "auto", device: str | None = None
) -> dict[str, str]:
    """The environment of a worker process for this target.

    MLX on Linux: the wheel's bundled BLAS is a much slower fp32 matmul than OpenBLAS.
    Every MLX worker (ours and the peer's) gets the same library in `LD_PRELOAD`, the one
    `cosyvoice2.blas.find(blas)` picks; `off` gives none. Other workers (torch) get none."""
    env = dict(os.environ)
    changes = target.env()
    is_mlx = getattr(target, "backend", "mlx") == "mlx"
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    if sys.platform.startswith("linux") and (blas == "off" or not is_mlx):
        preload = [p for p in preload if "blas" not in p.lower()]
        env["COSYVOICE2_BLAS"] = "off"
    elif sys.platform.startswith("linux") and not any("blas" in p.lower() for p in preload):
        from cosyvoice2 import blas as blas_lib

        found, _, _ = blas_lib.find(blas)
        if found is not None:
            preload.insert(0, str(found))
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env.setdefault("PYTHONHASHSEED", "0")
    for k in (*LAUNCH_ENV, "MLX_HOSTFILE"):  # a rank's case workers are not ranks themselves
        env.pop(k, None)
    if device:
        env["BENCH_MLX_DEVICE"] = device
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH")) if x)
    return env


class WorkerError(RuntimeError):
    pass


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 400))
            lines = f.read().decode("utf-8", errors="replace").strip().splitlines()
        return lines[-1] if lines else ""
    except OSError:
        return ""


def _call_worker(
    mode: str,
    spec: dict[str, Any],
    env: dict[str, str],
    timeout: float | None,
    status: Callable[[str], None] | None = None,
    python: str | None = None,
) -> dict[str, Any]:
    """Run `python -m bench.worker MODE SPEC OUT` and return what it wrote to OUT.

    `python` is the interpreter (default: this one's; a target with its own virtualenv
    names its python in `Prepared.options["python"]`). While it runs, `status` gets the
    last line of its log every second (progress display).
    """
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        out_path = Path(tmp) / "out.json"
        log_path = Path(tmp) / "log.txt"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        cmd = [python or sys.executable, "-m", "bench.worker", mode, str(spec_path), str(out_path)]
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                while True:
                    try:
                        rc = proc.wait(timeout=1.0)
                        break
                    except subprocess.TimeoutExpired:
                        if deadline is not None and time.monotonic() > deadline:
                            raise
                        if status is not None:
                            status(_last_line(log_path))
            except KeyboardInterrupt:
                _stop(proc)
                raise
            except subprocess.TimeoutExpired:
                _stop(proc)
                raise WorkerError(f"worker timed out after {timeout} s") from None
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        if rc in (INTERRUPTED, -2):
            raise KeyboardInterrupt
        if rc != 0 or not out_path.exists():
            raise WorkerError(f"worker exited with status {rc}:\n{tail}")
        return json.loads(out_path.read_text(encoding="utf-8"))


def _stop(proc: subprocess.Popen) -> None:
    """Stop a worker: SIGINT first (it may be in the middle of a case), then kill."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prepare_target(
    name: str, cases: list[Case], opts: RunOptions
) -> tuple[BenchTarget, Prepared, dict[str, str]]:
    """Prepare a target's weights (in a worker process when isolating)."""
    target = get_target(name)
    env = worker_env(target, opts.blas, opts.device)
    if opts.isolate:
        spec = {
            "target": name,
            "cases": [c.to_dict() for c in cases],
            "options": opts.target_options,
        }
        out = _call_worker("prepare", spec, env, None)
        prepared = Prepared(**out)
    else:
        prepared = target.prepare(cases, dict(opts.target_options))
    return target, prepared, env


def execute_case(
    target: BenchTarget,
    prepared: Prepared,
    env: dict[str, str],
    case: Case,
    work: Work,
    opts: RunOptions,
    status: Callable[[str], None] | None = None,
    reference: Path | None = None,
) -> dict[str, Any]:
    """Run one case (in a fresh worker when isolating); errors become `error` records.
    `reference`: the reference output file to compare the case's output with."""
    reason = target.supports(case)
    if reason is not None:
        return {
            "id": case.id,
            "settings": case.to_dict(),
            "status": "unsupported",
            "reason": reason,
        }
    python = prepared.options.get("python")
    try:
        if opts.isolate:
            spec = {
                "target": target.name,
                "case": case.to_dict(),
                "work": work.to_dict(),
                "prepared": dataclasses.asdict(prepared),
                "repeats": opts.repeats,
                "warmup": opts.warmup,
                "reference": None if reference is None else str(reference),
            }
            record = _call_worker("case", spec, env, opts.case_timeout, status, python)
            record["env"]["isolated"] = True
            if python is not None:
                record["env"]["python"] = python
        elif python is not None and Path(python) != Path(sys.executable):
            raise WorkerError(
                f"{target.name} runs in its own interpreter ({python}): run it without --in-process"
            )
        else:
            record = measure_case(
                target,
                prepared,
                case,
                work,
                opts.repeats,
                opts.warmup,
                reference=None if reference is None else str(reference),
            )
            record["env"]["isolated"] = False
        return record
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failing case must not lose the sweep
        return {
            "id": case.id,
            "settings": case.to_dict(),
            "work": work.to_dict(),
            "status": "error",
            "error": f"{type(e).__name__}: {e}",
            "finished": now(),
        }


# --------------------------------------------------------------------------- the sweep


def new_run(
    plan: list[Case], opts: RunOptions, run_id: str | None = None, command: list[str] | None = None
) -> dict[str, Any]:
    """A fresh results document for a plan (no cases done yet)."""
    machine = machine_info()
    created = now()
    if run_id is None:
        run_id = default_run_id(machine["kind"])
    return {
        "schema": SCHEMA,
        "run_id": run_id,
        "status": "running",
        "created": created,
        "updated": created,
        "command": command or sys.argv,
        "machine": machine,
        "versions": versions(),
        "weights": {"label": "unknown"},  # until the main target's weights are prepared
        "targets": {},
        "settings": opts.to_dict(),
        "plan": [{"id": c.id, **c.to_dict()} for c in plan],
        "cases": [],
    }


def default_run_id(kind: str | None = None) -> str:
    """`<date>-<time>-<machine kind>`: the id of a run not given a name."""
    from bench.machine import machine_kind

    return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind or machine_kind()}"


def plan_of(doc: dict[str, Any]) -> list[Case]:
    return [Case.from_dict({k: v for k, v in c.items() if k != "id"}) for c in doc["plan"]]


def run_sweep(
    doc: dict[str, Any],
    path: str | Path,
    progress: bool = True,
    on_case_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every planned case of `doc` not yet finished, writing `path` after each case.

    Finished cases (status `ok` or `unsupported`) are skipped, so calling this on an
    interrupted run resumes it; failed cases run again. On Ctrl-C the document is
    written with status `interrupted` and `KeyboardInterrupt` propagates.
    `on_case_done(record)` is called after each case is written (tests use it).
    """
    path = Path(path)
    opts = RunOptions.from_dict(doc["settings"])
    plan = plan_of(doc)
    done = {c["id"] for c in doc["cases"] if c.get("status") in ("ok", "unsupported")}
    todo = [c for c in plan if c.id not in done]
    # reference settings first: the other cases are compared with their output
    todo.sort(key=lambda c: not is_reference(c))
    outputs = path.parent / f"{path.stem}.outputs"
    doc["status"] = "running"
    here = machine_info()  # recorded with each case: a merged run's may come from several
    # the target whose weights the run records: the run's first (a part's: its whole run's)
    main = (doc.get("shard", {}).get("plan") or doc["plan"] or [{}])[0].get("target")

    def save() -> None:
        # atomic (temporary file, then rename): a run killed at any moment, even with
        # SIGKILL, leaves the previous complete document, which `--resume` continues
        doc["updated"] = now()
        order = {c.id: i for i, c in enumerate(plan)}
        doc["cases"].sort(key=lambda r: order.get(r["id"], len(order)))
        write_json_atomic(path, doc)

    # the temporary files of a save cut short by a killed run
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    save()  # the file exists (status running) before the first worker starts
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), initial=len(plan) - len(todo), unit="case", desc="bench")
    try:
        prepared: dict[str, tuple[BenchTarget, Prepared, dict[str, str]]] = {}
        for name in dict.fromkeys(c.target for c in todo):
            if bar is not None:
                bar.set_postfix_str(f"preparing {name} weights")
            cases = [c for c in plan if c.target == name]
            # with fidelity, the reference setting's model dir too (fp32 for an 8-bit sweep)
            if opts.fidelity:
                cases += [r for r in map(reference_case, cases) if r.target == name]
            target, prep, env = prepare_target(name, list(dict.fromkeys(cases)), opts)
            prepared[name] = (target, prep, env)
            doc["targets"][name] = {
                "weights": prep.weights,
                "versions": prep.versions,
                "env": {
                    "openblas_preloaded": "openblas" in env.get("LD_PRELOAD", ""),
                    "blas": preloaded_blas(env),
                },
            }
            if name == main:
                doc["weights"] = prep.weights
        if opts.fidelity and any(hasattr(prepared[c.target][0], "fidelity") for c in todo):
            label = doc["weights"].get("label", "unknown")
            doc["fidelity"] = {
                "reference": dict(REFERENCE_SETTINGS),
                "reference_streaming": "the official schedule",
                "weights": label,
                "note": FIDELITY_NOTES.get(label, FIDELITY_NOTES["unknown"]),
            }
        save()
        for case in todo:
            if bar is not None:
                bar.set_postfix_str(case.id)
            target, prep, env = prepared[case.target]
            work = Work.for_case(case, opts.prompt_seconds, opts.seed, opts.fixed_length)
            status = _bar_status(bar, case.id) if bar is not None else None
            reference = None
            if opts.fidelity and hasattr(target, "fidelity") and target.supports(case) is None:
                reference = reference_path(outputs, case, work)
                if not reference.exists() and not is_reference(case):
                    if bar is not None:
                        bar.set_postfix_str(f"reference output for {case.text}")
                    try:
                        make_reference(
                            target, prep, env, reference_case(case), work, opts, reference
                        )
                    except Exception as e:  # the case is timed without fidelity figures
                        reference = None
                        bar_write(bar, f"no reference output for {case.id}: {_summary(str(e))}")
            record = execute_case(target, prep, env, case, work, opts, status, reference)
            record["machine"] = here
            doc["cases"] = [c for c in doc["cases"] if c["id"] != case.id] + [record]
            save()
            if bar is not None:
                bar.update(1)
                if record["status"] == "ok":
                    bar.write(_one_line(record))
                else:
                    bar.write(f"{case.id}: {record['status']}: {_first_line(record)}")
            if on_case_done is not None:
                on_case_done(record)
        doc["status"] = "complete"
        save()
    except KeyboardInterrupt:
        doc["status"] = "interrupted"
        save()
        raise
    finally:
        if bar is not None:
            bar.close()
    return doc


def make_reference(
    target: BenchTarget,
    prepared: Prepared,
    env: dict[str, str],
    case: Case,
    work: Work,
    opts: RunOptions,
    path: Path,
) -> None:
    """Write the reference output for `work` (a worker when isolating) before a case needs it."""
    if opts.isolate:
        spec = {
            "target": target.name,
            "case": case.to_dict(),
            "work": work.to_dict(),
            "prepared": dataclasses.asdict(prepared),
            "reference": str(path),
        }
        _call_worker(
            "reference", spec, env, opts.case_timeout, None, prepared.options.get("python")
        )
    else:
        write_reference(target, prepared, case, work, str(path))


def bar_write(bar: Any, line: str) -> None:
    if bar is not None:
        bar.write(line)
    else:
        print(line, file=sys.stderr)


def _summary(text: str) -> str:
    """An error in one line: its first line and, where it has more (a worker's log, whose
    last line is the exception), its last."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1:
        return f"{lines[0]} ... {lines[-1]}"
    return lines[0] if lines else ""


def _bar_status(bar: Any, case_id: str) -> Callable[[str], None]:
    """Show a worker's last log line (e.g. `call 2/4 (timed): ...`) beside the progress bar."""

    def status(line: str) -> None:
        bar.set_postfix_str(f"{case_id}: {line}" if line else case_id)

    return status


def _first_line(record: dict[str, Any]) -> str:
    """The last line of a failed case's error (the exception), for the progress log."""
    lines = (record.get("error") or record.get("reason") or "").strip().splitlines()
    return lines[-1] if lines else ""


def _one_line(record: dict[str, Any]) -> str:
    f = record["figures"]
    parts = [record["id"]]
    for name, fmt in (
        ("rtf", "RTF {:.2f}"),
        ("first_chunk_s", "first chunk {:.2f} s"),
        ("decode_tok_s", "decode {:.1f} tok/s"),
        ("mlx_peak_mb", "peak {:.0f} MB"),
    ):
        if name in f:
            parts.append(fmt.format(f[name]["median"]))
    return "  ".join(parts)
