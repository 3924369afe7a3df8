"""`python -m reports build --eval PATH... [--bench PATH...] [--out DIR]`.

`--eval` takes eval results files or folders searched for `*.json` (default
`eval/results`); `--bench` takes bench results files or folders (default
`bench/results`; a default folder that does not exist is skipped). JSON files in a
searched folder that are not results of that kind (manifests, the other kind) are
skipped and counted; files named directly must be valid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports.build import build_report
from reports.formats import find_files, read_bench, read_eval


def _collect(paths: list[Path], reader, name: str | None, default: bool):
    items, skipped = [], []
    for p in paths:
        if not p.exists() and default:
            continue
        direct = p.is_file()
        try:
            files = find_files([p], name)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from e
        for f in files:
            try:
                items.append(reader(f))
            except (ValueError, KeyError) as e:
                if direct:
                    raise SystemExit(f"{f}: {e}") from e
                skipped.append(f"{f}: {e}")
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
    b.add_argument("--out", type=Path, default=Path("reports") / "latest")
    b.add_argument("--title", default="cosyvoice2-mlx quality report")
    args = ap.parse_args(argv)

    evals, skipped_e = _collect(
        args.eval or [Path("eval") / "results"], read_eval, None, args.eval is None
    )
    benches, skipped_b = _collect(
        args.bench or [Path("bench") / "results"], read_bench, None, args.bench is None
    )
    for kind, skipped in (("eval", skipped_e), ("bench", skipped_b)):
        if skipped:
            print(
                f"skipped {len(skipped)} JSON file(s) that are not {kind} results", file=sys.stderr
            )
    if not evals and not benches:
        print("no eval or bench results found", file=sys.stderr)
        return 1
    path = build_report(evals, benches, args.out, title=args.title)
    print(path)
    return 0
