"""`python -m reports build [--eval PATH...] [--bench PATH...] [--history DIR...] [--out DIR]`.

`--eval` takes eval results files or folders searched for `*.json` (default
`eval/results`); `--bench` takes bench results files or folders (default
`bench/results`; a default folder that does not exist is skipped). When only `--bench`
is given, the default eval folder is not read. JSON files in a searched folder that are
not results of that kind (manifests, the other kind) are skipped and counted; files
named directly must be valid.

`--sections` picks the parts of the report: `eval` (the eval report, bench results used
for the RTF of the eval settings), `bench` (bench plots and recommendations, see
`reports.bench_plots`), `all`, or `auto` (the default: `bench` when there are no eval
results, else `eval`). The bench part's history plot reads the stored runs under
`--history` (default `bench/runs` and `bench/baselines`, skipped when missing; `--history` with no
folder: none).

Exit status: 0 with the report's path printed; 1 when no results are found; 2 for a
missing or invalid file named on the command line (one line on stderr, no report written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports.build import build_report
from reports.formats import find_files, read_bench, read_eval

HISTORY_DIRS = (Path("bench") / "runs", Path("bench") / "baselines")


class _BadInput(Exception):
    """A file named on the command line is missing or not valid."""


def _collect(paths: list[Path], reader, name: str | None, default: bool):
    items, skipped = [], []
    for p in paths:
        if not p.exists() and default:
            continue
        direct = p.is_file()
        try:
            files = find_files([p], name)
        except FileNotFoundError as e:
            raise _BadInput(str(e)) from None
        for f in files:
            try:
                items.append(reader(f))
            except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                msg = msg if msg.startswith(str(f)) else f"{f}: {msg}"
                if direct:
                    raise _BadInput(msg) from None
                skipped.append(msg)
    return items, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m reports",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a markdown report with plots")
    b.add_argument(
        "--eval", nargs="*", type=Path, default=None, help="eval results files or folders"
    )
    b.add_argument(
        "--bench", nargs="*", type=Path, default=None, help="bench results files or folders"
    )
    b.add_argument(
        "--history",
        nargs="*",
        type=Path,
        default=None,
        help="folders (or files) of stored bench runs for the history plot "
        "(default: bench/runs bench/baselines)",
    )
    b.add_argument(
        "--sections",
        choices=("auto", "eval", "bench", "all"),
        default="auto",
        help="report parts (auto: bench when there are no eval results, else eval)",
    )
    b.add_argument("--out", type=Path, default=Path("reports") / "latest")
    b.add_argument("--title", default="cosyvoice2-mlx quality report")
    args = ap.parse_args(argv)

    try:
        if args.eval is None and args.bench is not None:
            evals, skipped_e = [], []
        else:
            evals, skipped_e = _collect(
                args.eval or [Path("eval") / "results"], read_eval, None, args.eval is None
            )
        benches, skipped_b = _collect(
            args.bench or [Path("bench") / "results"], read_bench, None, args.bench is None
        )
        sections = args.sections
        if sections == "auto":
            sections = "bench" if not evals else "eval"
        history, skipped_h = [], []
        if sections in ("bench", "all"):
            # `--history` with no folder: no history plot
            history, skipped_h = _collect(
                list(HISTORY_DIRS) if args.history is None else args.history,
                read_bench,
                None,
                args.history is None,
            )
    except _BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for kind, skipped in (("eval", skipped_e), ("bench", skipped_b), ("bench", skipped_h)):
        if skipped:
            print(
                f"skipped {len(skipped)} JSON file(s) that are not {kind} results", file=sys.stderr
            )
    if not evals and not benches:
        print("no eval or bench results found", file=sys.stderr)
        return 1
    if sections == "bench" and evals:
        evals = []
    try:
        path = build_report(
            evals,
            benches,
            args.out,
            title=args.title,
            bench_sections=sections in ("bench", "all"),
            history=history,
        )
    except OSError as e:  # the out folder cannot be written
        print(f"error: {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(path)
    return 0
