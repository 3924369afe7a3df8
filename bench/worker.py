"""Worker process of the harness: `python -m bench.worker prepare|case SPEC OUT`.

`prepare` makes a target's weights and writes the `Prepared` record; `case` loads a
model, runs one case's calls and writes the case record; `reference` runs the
reference setting once and writes its output (`bench.drift`). The parent (`bench.runner`)
reads OUT after the worker exits. Ctrl-C exits with status 130 and writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from bench.cases import Case, Work
from bench.interface import Prepared, get_target
from bench.results import write_json_atomic
from bench.runner import INTERRUPTED, measure_case, write_reference


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("prepare", "case", "reference"):
        print("usage: python -m bench.worker prepare|case|reference SPEC OUT", file=sys.stderr)
        return 2
    mode, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    target = get_target(spec["target"])
    try:
        if mode == "prepare":
            cases = [Case.from_dict(c) for c in spec["cases"]]
            prepared = target.prepare(cases, spec.get("options", {}))
            write_json_atomic(out_path, dataclasses.asdict(prepared))
        elif mode == "reference":
            write_reference(
                target,
                Prepared(**spec["prepared"]),
                Case.from_dict(spec["case"]),
                Work.from_dict(spec["work"]),
                spec["reference"],
            )
            write_json_atomic(out_path, {"reference": spec["reference"]})
        else:
            record = measure_case(
                target,
                Prepared(**spec["prepared"]),
                Case.from_dict(spec["case"]),
                Work.from_dict(spec["work"]),
                spec["repeats"],
                spec["warmup"],
                progress=lambda line: print(line, file=sys.stderr, flush=True),
                reference=spec.get("reference"),
            )
            write_json_atomic(out_path, record)
    except KeyboardInterrupt:
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
