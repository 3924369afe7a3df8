"""Command line: `python -m bench run|compare|merge|list|show|keep|baseline|micro`.

python -m bench run                       # default sweep, synthetic full-size weights
python -m bench run --reference official  # plus the official PyTorch code on the same work
python -m bench run --reference mlx-audio-plus  # plus the mlx-audio-plus peer (its own venv)
python -m bench run --full                # every axis
python -m bench run --steps 1,10 --llm fp32,8bit --stream off,on
python -m bench run --sweep my.toml
python -m bench run --model DIR           # weights on disk (labelled from the dir's record)
python -m bench run --resume              # continue the last interrupted run
python -m bench run --keep ...            # also keep the results file in bench/runs/
python -m bench compare RUN BASELINE      # exit 1 on regressions
python -m bench list [--dir bench/runs]
python -m bench show bench/runs/RUN.json  # a file, or a run id (bench/results/, bench/runs/)
python -m bench keep RUN                  # copy a finished run into bench/runs/
mlx.launch -n 2 -- python -m bench run ... # split over ranks (bench/shards.py); rank 0 merges
python -m bench run --shard 0/2 --name R  # one shard of a run (e.g. a CI matrix job) ...
python -m bench merge bench/results/R.parts  # ... and the merge of its parts
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from bench.cases import (
    AXES,
    DEFAULT_SWEEP_REPEATS,
    DTYPES,
    FINALS,
    KERNELS,
    LLM_PRECISIONS,
    REFERENCES,
    STEPS,
    TEXT_LENGTHS,
    Case,
    dedupe,
    default_cases,
    full_cases,
    load_sweep_file,
    parse_bool,
    product,
    quick_cases,
    reference_cases,
)
from bench.figures import DEFAULT_TOLERANCE, summarize
from bench.machine import machine_kind
from bench.quality import quality_mode
from bench.results import (
    BASELINES,
    RESULTS,
    RUNS,
    keep_run,
    list_runs,
    load,
    resolve_run,
    write_json_atomic,
)
from bench.runner import INTERRUPTED, RunOptions, default_run_id, new_run, run_sweep
from sharding import Shard, ShardError, from_args

REPORT = RESULTS / "report"
"""Where `run` builds the report of the run it made (with the kept runs as history)."""


def _csv(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]


def _axis(values: str | None, allowed, name: str, convert=str) -> list | None:
    if values is None:
        return None
    out = []
    for v in _csv(values):
        x = convert(v)
        if allowed is not None and x not in allowed:
            raise ValueError(f"--{name}: {v!r} is not one of {', '.join(map(str, allowed))}")
        out.append(x)
    return out


def _hop(value: str) -> int | None:
    if value.lower() in ("official", "none"):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"first-hop: expected official or a number of tokens, got {value!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a sweep and write a results file")
    g = r.add_argument_group("cases")
    g.add_argument("--full", action="store_true", help="sweep every axis (hours)")
    g.add_argument("--quick", action="store_true", help="headline case only, streaming off/on (CI)")
    g.add_argument("--sweep", metavar="FILE", help="TOML or JSON sweep file")
    g.add_argument("--llm", help=f"LLM precisions, comma separated ({','.join(LLM_PRECISIONS)})")
    g.add_argument("--dtype", help=f"flow/HiFT dtypes ({','.join(DTYPES)})")
    g.add_argument("--steps", help=f"diffusion steps ({','.join(map(str, STEPS))}, or any)")
    g.add_argument("--text", help=f"text lengths ({','.join(TEXT_LENGTHS)})")
    g.add_argument("--stream", help="streaming: off, on or off,on")
    g.add_argument("--kernels", help="the speech LM's CPU kernels: auto, off or auto,off")
    g.add_argument(
        "--first-hop",
        help="streaming: tokens in the first chunk, e.g. official,10 (official: 25, padded)",
    )
    g.add_argument(
        "--saved",
        help="a saved speaker (LLM prefix and flow prompt state reused): off, on or off,on",
    )
    g.add_argument(
        "--final",
        help="streaming: last chunk full (official) or chunked (O(n) cache), e.g. full,chunked",
    )
    g.add_argument(
        "--flow-bits",
        help="the flow's linear layers quantised: none, 8, 4, or 16 (the estimator's transformer "
        "projections in bfloat16), comma separated",
    )
    g.add_argument(
        "--cfg", help="classifier-free guidance strength (inference_cfg_rate), e.g. default,0.5,0"
    )
    g.add_argument(
        "--target",
        default="cosyvoice2",
        choices=["cosyvoice2", *REFERENCES, "toy"],
        help="what the sweep measures (toy: a small MLX workload that tests the harness)",
    )
    g.add_argument(
        "--reference",
        help="also time a reference on the same weights and work, comma separated:"
        " official (the official PyTorch code), mlx-audio-plus (another MLX port, its own venv)",
    )
    g.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    g = r.add_argument_group("weights and work")
    g.add_argument(
        "--model",
        metavar="DIR|ID",
        help="weights on disk: a converted MLX dir or an official dir (its own record labels"
        " them synthetic, real or unknown), or a Hugging Face hub id of either (downloaded,"
        " and converted once if official, before the workers start)",
    )
    g.add_argument("--revision", help="branch, tag or commit of a hub id --model (default main)")
    g.add_argument(
        "--size",
        default="full",
        choices=["full", "tiny"],
        help="synthetic weights' size (default: full, the real 0.5B shapes)",
    )
    g.add_argument("--prompt-seconds", type=float, default=None, help="prompt length (default 3)")
    g.add_argument(
        "--seed", type=int, default=None, help="seed of the inputs and sampling (default 0)"
    )
    g.add_argument(
        "--natural-length",
        action="store_true",
        help="let the LLM stop on its own (default: fixed number of speech tokens)",
    )
    g = r.add_argument_group("measurement")
    g.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed calls per case (default {DEFAULT_SWEEP_REPEATS} for the default sweep, else 3)",
    )
    g.add_argument(
        "--no-fidelity",
        action="store_true",
        help="do not compare each case's output with the reference setting's (bench/drift.py)",
    )
    g.add_argument(
        "--quality",
        choices=["auto", "on", "off"],
        default="auto",
        help="the eval harness (WER/CER, SIM) on a small fixed set per setting (bench/quality.py):"
        " auto runs it on real weights only (default auto)",
    )
    g.add_argument("--quality-asr", default="offline:tiny.en", help="ASR model of --quality")
    g.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls first, the cold one included (default 1)",
    )
    g.add_argument(
        "--in-process",
        action="store_true",
        help="run cases in this process (debugging; cold and RSS figures are then not per case)",
    )
    g.add_argument(
        "--blas",
        default="auto",
        help="BLAS for MLX workers on Linux: auto (the system's OpenBLAS, else the"
        " scipy-openblas32 wheel's), system, scipy-openblas32, off (MLX's bundled"
        " reference BLAS) or a library path (default auto)",
    )
    g.add_argument("--no-openblas", action="store_true", help="the same as --blas off")
    g.add_argument("--device", choices=["cpu", "gpu"], help="MLX device (default: MLX's default)")
    g.add_argument(
        "--case-timeout", type=float, default=None, help="seconds before a case is abandoned"
    )
    g = r.add_argument_group("output")
    g.add_argument("--out", default=str(RESULTS), help=f"results directory (default {RESULTS})")
    g.add_argument("--name", help="run id (default: date-time-machine kind)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest-interrupted",
        metavar="RUN",
        help="continue an interrupted run (default: the latest interrupted one)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--shard",
        metavar="I/N",
        help="run shard I of N (0-based) of the plan and write its part (bench/shards.py;"
        " merge the parts with `merge`); under mlx.launch each rank takes its shard by itself",
    )
    g.add_argument(
        "--report",
        default=str(REPORT),
        help=f"build the report with plots here when the run ends (default {REPORT}; none: no report)",
    )
    g.add_argument(
        "--keep",
        action="store_true",
        help=f"when complete, also copy the results file into {RUNS} (kept in git)",
    )
    g.add_argument(
        "--micro", action="store_true", help="also run tests/benchmarks with pytest-benchmark"
    )
    g.add_argument(
        "--compare",
        nargs="?",
        const="auto",
        metavar="BASELINE",
        help="compare with a baseline afterwards (default: bench/baselines/<machine kind>.json)",
    )
    g.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)

    c = sub.add_parser("compare", help="compare a run with a baseline; exit 1 on regressions")
    c.add_argument("run", help="results file or run id (or `latest`)")
    c.add_argument(
        "baseline",
        nargs="?",
        default="auto",
        help="results file or run id (default: bench/baselines/<machine kind>.json)",
    )
    c.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="default relative tolerance (0.25 = 25%%)",
    )
    c.add_argument(
        "--tol",
        action="append",
        default=[],
        metavar="FIGURE=TOL",
        help="tolerance for one figure, e.g. --tol mlx_peak_mb=0.1",
    )
    c.add_argument(
        "--no-floors", action="store_true", help="judge figures even below their noise floor"
    )
    c.add_argument("--strict", action="store_true", help="cases missing from the run also fail")
    c.add_argument("--changes", action="store_true", help="only print regressions and improvements")
    c.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    c.add_argument("--dir", default=str(RESULTS), help="results directory for run ids")

    mg = sub.add_parser("merge", help="merge the parts of a sharded run into one results file")
    mg.add_argument("parts", nargs="+", help="a run's parts folder (<run>.parts) or part files")
    mg.add_argument("--out", default=str(RESULTS), help=f"where to write it (default {RESULTS})")

    ls = sub.add_parser("list", help="list runs")
    ls.add_argument("--dir", default=str(RESULTS))

    s = sub.add_parser("show", help="print a run's figures, streaming and side-by-side ratios")
    s.add_argument(
        "run",
        nargs="?",
        default="latest",
        help="results file (e.g. bench/runs/X.json), run id or `latest`",
    )
    s.add_argument("--markdown", action="store_true")
    s.add_argument("--dir", default=str(RESULTS))

    k = sub.add_parser("keep", help=f"copy a complete run into {RUNS} (runs documents quote)")
    k.add_argument("run", help="results file, run id or `latest`")
    k.add_argument("--dir", default=str(RESULTS), help="results directory for run ids")
    k.add_argument("--to", default=str(RUNS), help="directory to keep it in")

    b = sub.add_parser("baseline", help="store a run as the baseline for its machine kind")
    b.add_argument("run")
    b.add_argument("--kind", help="machine kind (default: the run's)")
    b.add_argument("--to", metavar="FILE", help="write here instead of bench/baselines/<kind>.json")
    b.add_argument(
        "--partial",
        action="store_true",
        help="an interrupted run: store its finished cases only (the plan is cut to them)",
    )
    b.add_argument("--dir", default=str(RESULTS))

    m = sub.add_parser("micro", help="run the component micro-benchmarks (tests/benchmarks)")
    m.add_argument("--out", default=str(RESULTS))
    m.add_argument("pytest_args", nargs="*")
    return p


def plan_from_args(args: argparse.Namespace) -> tuple[list[Case], dict]:
    """The cases a `run` invocation asks for, and run options from a sweep file."""
    target = args.target
    options: dict = {}
    axes = {
        "llm": _axis(args.llm, LLM_PRECISIONS, "llm"),
        "dtype": _axis(args.dtype, DTYPES, "dtype"),
        "steps": _axis(args.steps, None, "steps", int),
        "text": _axis(args.text, list(TEXT_LENGTHS), "text"),
        "stream": _axis(args.stream, None, "stream", parse_bool),
        "kernels": _axis(args.kernels, list(KERNELS), "kernels"),
        "first_hop": _axis(args.first_hop, None, "first-hop", _hop),
        "saved": _axis(args.saved, None, "saved", parse_bool),
        "final": _axis(args.final, list(FINALS), "final"),
        "flow_bits": _axis(args.flow_bits, None, "flow-bits", _flow_bits),
        "cfg": _axis(args.cfg, None, "cfg", _cfg),
    }
    given = {k: v for k, v in axes.items() if v is not None}
    if args.sweep:
        sweep = load_sweep_file(args.sweep, target)
        options = sweep.options
        cases = sweep.cases
        if given:  # flags narrow or replace the file's axes
            cases = product(target, **{**_axes_of(cases), **given})
    elif args.full:
        cases = full_cases(target)
    elif given:
        cases = product(target, **given)
    elif args.quick:
        cases = quick_cases(target)
    else:
        cases = default_cases(target)
    references = _axis(args.reference, REFERENCES, "reference") or []
    cases = cases + [c for ref in references for c in reference_cases(cases, ref)]
    return dedupe(cases), options


def _flow_bits(value: str) -> int | None:
    v = value.strip().lower().removesuffix("bit")
    if v in ("none", "off", "float"):
        return None
    if v not in ("8", "4", "16"):
        raise ValueError(f"flow-bits: expected none, 8, 4 or 16, got {value!r}")
    return int(v)


def _cfg(value: str) -> float | None:
    v = value.strip().lower()
    if v in ("default", "none"):
        return None
    try:
        rate = float(v)
    except ValueError:
        raise ValueError(f"cfg: expected a number or default, got {value!r}") from None
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"cfg: expected a finite number >= 0, got {value!r}")
    return rate


def _axes_of(cases: list[Case]) -> dict:
    axes: dict[str, list] = {}
    for c in cases:
        for k in AXES:
            v = getattr(c, k)
            axes.setdefault(k, [])
            if v not in axes[k]:
                axes[k].append(v)
    return axes


def cmd_run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    try:
        shard = from_args(args.shard)
    except ShardError as e:
        print(f"bench run: {e}", file=sys.stderr)
        return 2
    if shard.size > 1:
        return cmd_run_shard(args, shard)
    if args.resume:
        if args.resume == "latest-interrupted":
            runs = [
                p
                for p, d in list_runs(out_dir)
                if d is not None and d.get("status") in ("interrupted", "running")
            ]
            if not runs:
                print(f"no interrupted run in {out_dir}", file=sys.stderr)
                return 2
            path = runs[0]
        else:
            path = resolve_run(args.resume, out_dir)
        doc = load(path)
        if doc["status"] == "complete":
            print(f"{path}: already complete")
            return 0
        done = sum(c["status"] in ("ok", "unsupported") for c in doc["cases"])
        print(f"resuming {doc['run_id']}: {done} of {len(doc['plan'])} cases done")
    else:
        try:
            cases, file_opts, opts = _plan_and_options(args)
        except (ValueError, OSError) as e:
            print(f"bench run: {e}", file=sys.stderr)
            return 2
        if args.dry_run:
            for c in cases:
                print(c.id)
            print(f"{len(cases)} cases; repeats {opts.repeats}, warm-up {opts.warmup}")
            return 0
        doc = new_run(
            cases, opts, run_id=args.name, command=["python", "-m", "bench", *sys.argv[1:]]
        )
        path = out_dir / f"{doc['run_id']}.json"
        if path.exists():
            print(f"{path} exists: pick another --name or --resume it", file=sys.stderr)
            return 2
    print(f"results: {path}")
    done = sum(c["status"] in ("ok", "unsupported") for c in doc["cases"])
    stopped = (
        f"\ninterrupted: {done} of {len(doc['plan'])} cases kept in {path}\n"
        f"continue with: python -m bench run --resume {doc['run_id']}"
        + (f" --out {args.out}" if Path(args.out) != RESULTS else "")
    )
    if not _sweep(args, doc, path, stopped):
        return INTERRUPTED
    return _after_run(args, doc, path, out_dir)


def _sweep(args: argparse.Namespace, doc: dict[str, Any], path: Path, stopped: str) -> bool:
    """Run the sweep of `doc` into `path`; False (after printing `stopped`) on Ctrl-C or
    SIGTERM (e.g. a cancelled CI job, or mlx.launch stopping the ranks), which stop it alike."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_sweep(doc, path, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(stopped, file=sys.stderr)
        return False
    return True


def _shard_run_id(args: argparse.Namespace, shard: Shard, out_dir: Path) -> str:
    """The run id every rank shares: `--resume RUN` or `--name`; under mlx.launch rank 0's
    new id (or, for a bare `--resume`, its latest unfinished sharded run), sent to the others.
    ShardError where no rank can know it (`--shard` without a name)."""
    if args.resume not in (None, "latest-interrupted"):
        if args.name is not None and args.name != args.resume:
            raise ShardError(f"--name {args.name} and --resume {args.resume} name two runs")
        return args.resume
    if args.name is not None:
        return args.name
    if not shard.connected:
        raise ShardError(
            "--shard needs the run id every shard shares: --name RUN_ID (or --resume RUN_ID)"
        )
    run_id = None
    if shard.rank == 0:
        if args.resume:
            found = unfinished_sharded_runs(out_dir)
            run_id = found[0] if found else ""
        else:
            run_id = default_run_id()
    run_id = shard.share_text(run_id)
    if not run_id:
        raise ShardError(f"no unfinished sharded run in {out_dir} on rank 0")
    return run_id


def unfinished_sharded_runs(out_dir: Path) -> list[str]:
    """Run ids of the sharded runs in `out_dir` with an unfinished part, newest first."""
    found = []
    for d in sorted(out_dir.glob("*.parts"), key=lambda q: q.stat().st_mtime, reverse=True):
        for _, doc in list_runs(d):
            if doc is not None and doc.get("status") != "complete":
                found.append(d.name.removesuffix(".parts"))
                break
    return found


def cmd_run_shard(args: argparse.Namespace, shard: Shard) -> int:
    """This rank's cases of a sharded run (`bench.shards`), then, under mlx.launch, rank 0
    merges every rank's part and goes on as after a single run."""
    from bench.shards import check_part, merge_parts, part_path, shard_cases, shard_record

    try:
        cases, _, opts = _plan_and_options(args)
        mine = shard_cases(cases, shard)
        if args.dry_run:
            for c in mine:
                print(c.id)
            print(f"{len(mine)} of {len(cases)} cases on rank {shard.name}")
            return 0
        run_id = _shard_run_id(args, shard, out_dir := Path(args.out))
        plan_text = json.dumps([[c.id for c in cases], opts.to_dict()], sort_keys=True)
        shard.check_same("plan or settings", plan_text)
        path = part_path(out_dir, run_id, shard)
        if path.exists():
            if not args.resume:
                raise ShardError(f"{path} exists: --resume {run_id} it or pick another --name")
            doc = load(path)
            check_part(doc, cases, opts.to_dict())
            done = sum(c["status"] in ("ok", "unsupported") for c in doc["cases"])
            print(f"rank {shard.name}: resuming {run_id}: {done} of {len(mine)} cases done")
        else:
            doc = new_run(
                mine, opts, run_id=run_id, command=["python", "-m", "bench", *sys.argv[1:]]
            )
            doc["shard"] = shard_record(shard, cases)
    except (ValueError, OSError) as e:  # ShardError is a ValueError
        print(f"bench run: {e}", file=sys.stderr)
        return 2
    print(f"rank {shard.name}: {len(mine)} of {len(cases)} cases -> {path}")
    stopped = (
        f"\nrank {shard.name} interrupted; its finished cases are kept in {path}\n"
        f"continue with the same command and --resume {run_id}"
    )
    if not _sweep(args, doc, path, stopped):
        return INTERRUPTED
    own = 0 if all(c["status"] != "error" for c in doc["cases"]) else 1
    if not shard.connected:
        print(
            f"part {shard.name} done: {path}\nonce every part is there, merge them with: "
            f"python -m bench merge {path.parent}"
        )
        return own
    parts = shard.gather_bytes(path.read_bytes())
    if shard.rank != 0:
        return own
    try:
        merged = merge_parts([json.loads(p) for p in parts])
    except ShardError as e:
        print(f"bench run: merge: {e}", file=sys.stderr)
        return 1
    path = out_dir / f"{run_id}.json"
    write_json_atomic(path, merged)
    print(f"merged {shard.size} parts: {path}")
    return _after_run(args, merged, path, out_dir)


def _after_run(args: argparse.Namespace, doc: dict[str, Any], path: Path, out_dir: Path) -> int:
    """What follows a finished run (or a merged sharded one): the quality step, the micro
    benchmarks, the summary, keep, compare, report; the exit status."""
    from bench.report import describe

    if quality_mode(doc.get("weights", {}).get("label", "unknown"), args.quality):
        run_quality_step(doc, path, args.quality_asr)
    if args.micro:
        from bench.micro import run_micro

        micro = run_micro(out_dir, doc["run_id"])
        doc["micro"] = micro
        write_json_atomic(path, doc)
    print()
    print(describe(doc))
    status = 0 if all(c["status"] != "error" for c in doc["cases"]) else 1
    if args.keep:
        try:
            print(f"kept: {keep_run(path)}")
        except (FileExistsError, ValueError) as e:
            print(f"not kept: {e}", file=sys.stderr)
            status = status or 2
    if args.compare:
        cmp_status = _compare_paths(
            path, args.compare, args.tolerance, {}, True, False, False, None, out_dir
        )
        status = status or cmp_status
    if args.report.lower() != "none":
        report = build_bench_report(path, Path(args.report))
        if report is not None:
            print(f"\nreport with plots: {report}")
    return status


def _plan_and_options(args: argparse.Namespace) -> tuple[list[Case], dict, RunOptions]:
    """The cases and run options of a new `run` (ValueError on a bad value)."""
    cases, file_opts = plan_from_args(args)
    file_opts = dict(file_opts)
    fixed_length = bool(file_opts.pop("fixed_length", True)) and not args.natural_length
    default_sweep = not (args.sweep or args.full or args.quick or _given_axes(args))
    opts = RunOptions(
        repeats=_pick(
            args.repeats,
            file_opts.pop("repeats", None),
            DEFAULT_SWEEP_REPEATS if default_sweep else 3,
        ),
        warmup=_pick(args.warmup, file_opts.pop("warmup", None), 1),
        prompt_seconds=_pick(args.prompt_seconds, file_opts.pop("prompt_seconds", None), 3.0),
        seed=_pick(args.seed, file_opts.pop("seed", None), 0),
        fixed_length=fixed_length,
        isolate=not args.in_process,
        blas="off" if args.no_openblas else args.blas,
        case_timeout=args.case_timeout,
        device=args.device,
        target_options={"size": args.size, **_model_options(args.model, args.revision)},
        fidelity=not args.no_fidelity,
    )
    if file_opts:
        print(f"sweep file: ignoring unknown run options {sorted(file_opts)}", file=sys.stderr)
    return cases, file_opts, opts


def _given_axes(args: argparse.Namespace) -> bool:
    names = ("llm", "dtype", "steps", "text", "stream", "kernels", "first_hop", "saved", "final")
    return any(getattr(args, n) is not None for n in (*names, "flow_bits", "cfg"))


def run_quality_step(doc: dict[str, Any], path: Path, asr: str) -> None:
    """The eval harness on the quality set per setting (`bench.quality`), into the run's cases."""
    from bench.quality import QualityError, run_quality

    model = doc["settings"]["target_options"].get("model") or doc["weights"].get("path")
    records = [c for c in doc["cases"] if c.get("status") == "ok"]
    print(f"quality: the eval harness per setting ({asr}) ...")
    try:
        found = run_quality(
            str(model),
            records,
            path.parent / f"{path.stem}.quality",
            asr=asr,
            seed=doc["settings"]["seed"],
            progress=lambda line: print(f"  {line}", file=sys.stderr),
        )
    except QualityError as e:
        print(f"quality: not measured: {e}", file=sys.stderr)
        return
    for rec in records:
        q = found.get(rec["id"])
        if q is None:
            continue
        rec["quality"] = q
        for name in ("wer", "cer", "sim"):
            if isinstance(q.get(name), (int, float)):
                rec["figures"][name] = summarize([float(q[name])])
    write_json_atomic(path, doc)


def build_bench_report(path: Path, out: Path) -> Path | None:
    """`python -m reports build --bench PATH --out OUT` with the kept runs as history; a report
    that cannot be built (matplotlib missing, a bad file) is a message, not a failed run."""
    try:
        from reports.cli import main as reports_main
    except ImportError as e:
        print(f"no report: {e} (install the report extra)", file=sys.stderr)
        return None
    history = [str(p) for p in (RUNS, BASELINES) if p.is_dir()]
    argv = ["build", "--bench", str(path), "--out", str(out), "--sections", "bench"]
    argv += ["--history", *history] if history else []
    try:
        rc = reports_main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    if rc != 0:
        print(f"no report: reports build exited {rc}", file=sys.stderr)
        return None
    return out / "report.md"


def _model_options(model: str | None, revision: str | None) -> dict[str, Any]:
    """The target options of `--model`: a local dir as given; a hub id resolved here, once,
    before any worker starts (the workers get the local dir), with the id, revision and
    commit recorded beside it (and an official repo's snapshot for the official reference)."""
    if model is None:
        if revision is not None:
            raise SystemExit("--revision needs --model ID")
        return {}
    if revision is None and Path(model).exists():
        return {"model": model}  # a local dir: the harness imports nothing of the package
    from cosyvoice2.errors import CosyVoiceError
    from cosyvoice2.hub import locate

    try:
        where = locate(model, revision)
    except CosyVoiceError as e:
        raise SystemExit(f"--model: {e}") from None
    if where.repo_id is None:
        return {"model": model}  # a missing local dir: the target says so, as before
    out: dict[str, Any] = {"model": str(where.path), "model_hub": where.record()}
    if where.source is not None:
        out["official_model"] = str(where.source)
    return out


def _pick(*values):
    for v in values:
        if v is not None:
            return v
    return None


def baseline_path(kind: str | None = None) -> Path:
    return BASELINES / f"{kind or machine_kind()}.json"


def _compare_paths(run, baseline, tolerance, overrides, floors, strict, changes, markdown, dir_):
    from bench.compare import compare, format_table
    from bench.results import by_machine

    run_path = resolve_run(run, dir_)
    run_doc = load(run_path)
    if baseline == "auto":  # each machine kind's cases against that kind's baseline
        pairs = []
        for kind, sub in by_machine(run_doc):
            base_path = baseline_path(kind)
            if base_path.exists():
                pairs.append((sub, base_path))
                continue
            print(f"no baseline for machine kind {kind!r} ({base_path})")
            print(f"store this run as the baseline with: python -m bench baseline {run_path}")
        if not pairs:
            return 3
    else:
        pairs = [(run_doc, resolve_run(baseline, dir_))]
    ok = True
    tables = []
    for doc, base_path in pairs:
        cmp = compare(doc, load(base_path), tolerance, overrides, floors=floors, strict=strict)
        print(f"run {run_path}\nbaseline {base_path}\n")
        print(format_table(cmp, only_changes=changes))
        ok = ok and cmp.ok
        tables.append(
            f"run `{run_path.name}` against baseline `{base_path.name}`\n\n"
            + format_table(cmp, markdown=True, only_changes=changes)
        )
    if markdown:
        Path(markdown).write_text(
            "# bench compare\n\n" + "\n\n".join(tables) + "\n", encoding="utf-8"
        )
    return 0 if ok else 1


def cmd_compare(args: argparse.Namespace) -> int:
    overrides = {}
    for item in args.tol:
        name, _, value = item.partition("=")
        try:
            overrides[name] = float(value)
        except ValueError:
            raise SystemExit(f"--tol {item!r}: expected FIGURE=NUMBER") from None
    try:
        return _compare_paths(
            args.run,
            args.baseline,
            args.tolerance,
            overrides,
            not args.no_floors,
            args.strict,
            args.changes,
            args.markdown,
            args.dir,
        )
    except (FileNotFoundError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2


def cmd_merge(args: argparse.Namespace) -> int:
    """`python -m bench merge PARTS...`: the parts of `--shard` jobs as one results file."""
    from bench.report import describe
    from bench.shards import merge_parts

    files: list[Path] = []
    for item in map(Path, args.parts):
        files += sorted(item.glob("*.json")) if item.is_dir() else [item]
    try:
        merged = merge_parts([load(f) for f in files])
    except (ValueError, OSError) as e:  # ShardError is a ValueError
        print(f"bench merge: {e}", file=sys.stderr)
        return 2
    path = Path(args.out) / f"{merged['run_id']}.json"
    write_json_atomic(path, merged)
    print(describe(merged))
    print(f"\nmerged {len(files)} parts: {path} [{merged['status']}]")
    return 0 if merged["status"] == "complete" else 1


def cmd_list(args: argparse.Namespace) -> int:
    runs = list_runs(args.dir)
    if not runs:
        print(f"no runs in {args.dir}")
        return 0
    for path, doc in runs:
        if doc is None:
            print(f"{path.name}: unreadable")
            continue
        ok = sum(c["status"] == "ok" for c in doc["cases"])
        err = sum(c["status"] == "error" for c in doc["cases"])
        commit = str(doc["versions"].get("git_commit"))[:8]
        print(
            f"{doc['run_id']:<48} {doc['status']:<11} {ok}/{len(doc['plan'])} ok"
            f"{f', {err} errors' if err else ''}  weights={doc['weights'].get('label')}"
            f"  commit={commit}  {doc['created']}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from bench.report import describe

    doc = load(resolve_run(args.run, args.dir))
    print(describe(doc, markdown=args.markdown))
    return 0


def cmd_keep(args: argparse.Namespace) -> int:
    try:
        dest = keep_run(resolve_run(args.run, args.dir), args.to)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    print(f"kept: {dest} (print it with: python -m bench show {dest})")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    path = resolve_run(args.run, args.dir)
    doc = load(path)
    dest = Path(args.to) if args.to else baseline_path(args.kind or doc["machine"]["kind"])
    if doc["status"] != "complete":
        if not args.partial:
            print(
                f"{path}: run is {doc['status']}; store its finished cases with --partial",
                file=sys.stderr,
            )
            return 2
        ok = [c for c in doc["cases"] if c["status"] == "ok"]
        if not ok:
            print(f"{path}: no finished case", file=sys.stderr)
            return 2
        done = {c["id"] for c in ok}
        doc["partial_of"] = {"status": doc["status"], "plan": [c["id"] for c in doc["plan"]]}
        doc["plan"] = [c for c in doc["plan"] if c["id"] in done]
        doc["cases"] = ok
        doc["status"] = "complete"
        write_json_atomic(dest, doc)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    print(f"baseline for {dest.stem}: {dest}")
    return 0


def cmd_micro(args: argparse.Namespace) -> int:
    from bench.micro import run_micro

    info = run_micro(Path(args.out), None, args.pytest_args)
    print(json.dumps(info, indent=1))
    return 0 if info.get("returncode", 1) == 0 else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {
        "run": cmd_run,
        "compare": cmd_compare,
        "merge": cmd_merge,
        "list": cmd_list,
        "show": cmd_show,
        "keep": cmd_keep,
        "baseline": cmd_baseline,
        "micro": cmd_micro,
    }[args.command](args)
