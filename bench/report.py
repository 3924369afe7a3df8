"""Terminal and markdown summaries of a results file.

- `summary_table`: one row per case with its main figures (medians).
- `side_by_side`: our cases against a reference's on the same work (the official code,
  or the mlx-audio-plus peer), as ratios of our time to theirs per stage (below 1: ours
  is faster). Decode speed is compared as time per token, so every ratio reads the same way.
- `streaming_ratios`: per streaming case, first-chunk latency and total time as
  fractions of the non-streaming wall time of the same settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bench.cases import REFERENCES, Case
from bench.figures import FIDELITY, FIGURES, SUMMARY

# Stage figures compared side by side, with how to turn each into a time (lower is faster).
STAGES: list[tuple[str, str]] = [
    ("wall_s", "end to end"),
    ("rtf", "RTF"),
    ("first_chunk_s", "first chunk"),
    ("prefill_s", "LLM prefill"),
    ("decode_tok_s", "LLM decode (time per token)"),
    ("llm_s", "LLM total"),
    ("flow_s", "flow"),
    ("hift_s", "HiFT"),
    ("cpu_s", "CPU time"),
    ("rss_peak_mb", "peak RSS"),
    ("load_s", "load"),
]


def _median(case: dict[str, Any], name: str) -> float | None:
    f = case.get("figures", {}).get(name)
    return None if f is None else float(f["median"])


def _case(rec: dict[str, Any]) -> Case:
    return Case.from_dict(rec["settings"])


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def summary_table(doc: dict[str, Any], markdown: bool = False) -> str:
    """Main figures (medians) per case; failed cases show their status."""
    present = [n for n in SUMMARY if any(n in c.get("figures", {}) for c in doc["cases"])]
    head = ["case"] + [f"{n} ({FIGURES[n].unit})" for n in present]
    rows = []
    for c in doc["cases"]:
        if c["status"] != "ok":
            rows.append([c["id"], c["status"]] + [""] * (len(present) - 1))
            continue
        rows.append([c["id"]] + [_fmt(_median(c, n)) for n in present])
    return _table(head, rows, markdown)


def fidelity_table(doc: dict[str, Any], markdown: bool = False) -> str:
    """Each case's fidelity figures (distance from the reference setting) and, where `--quality`
    ran, its WER/CER/SIM, with what they mean on these weights; empty when the run has none."""
    names = (*FIDELITY, "wer", "cer", "sim")
    present = [n for n in names if any(n in c.get("figures", {}) for c in doc["cases"])]
    if not present:
        return ""
    head = ["case"] + [f"{n} ({FIGURES[n].unit})" if FIGURES[n].unit else n for n in present]
    rows = [
        [c["id"]] + [_fmt(_median(c, n)) for n in present]
        for c in doc["cases"]
        if c["status"] == "ok" and any(n in c["figures"] for n in present)
    ]
    note = doc.get("fidelity", {}).get("note", "")
    title = f"fidelity against the reference setting: {note}" if note else "fidelity"
    return (f"**{title}**\n\n" if markdown else f"{title}\n") + _table(head, rows, markdown)


def side_by_side(doc: dict[str, Any], reference: str = "official") -> list[dict[str, Any]]:
    """Ours/reference ratios per stage for every pair of cases doing the same work (ours:
    any case whose target is not a reference)."""
    ok = [c for c in doc["cases"] if c["status"] == "ok"]
    twins = {_case(c).without_target(): c for c in ok if _case(c).target == reference}
    out = []
    for c in ok:
        case = _case(c)
        if case.target in REFERENCES or case.without_target() not in twins:
            continue
        ref = twins[case.without_target()]
        ratios = {}
        for name, _label in STAGES:
            a, b = _median(c, name), _median(ref, name)
            if a is None or b is None or a == 0 or b == 0:
                continue
            ratios[name] = b / a if FIGURES[name].better == "higher" else a / b
        out.append({"case": c["id"], reference: ref["id"], "ratios": ratios})
    return out


def side_by_side_table(
    doc: dict[str, Any], markdown: bool = False, reference: str = "official"
) -> str:
    pairs = side_by_side(doc, reference)
    if not pairs:
        return ""
    head = ["case"] + [label for _, label in STAGES]
    rows = [[p["case"]] + [_fmt(p["ratios"].get(name)) for name, _ in STAGES] for p in pairs]
    title = f"ours / {reference} (time ratios; < 1: ours faster)"
    if markdown:  # the official table keeps its bare form (older reports); others are titled
        return ("" if reference == "official" else f"{title}\n\n") + _table(head, rows, markdown)
    return f"{title}\n" + _table(head, rows, markdown)


def streaming_ratios(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """For streaming cases with a non-streaming sibling: first chunk and total as fractions of it."""
    ok = [c for c in doc["cases"] if c["status"] == "ok"]
    by_id = {c["id"]: c for c in ok}
    out = []
    for c in ok:
        case = _case(c)
        if not case.stream:
            continue
        sib = by_id.get(
            dataclasses.replace(case, stream=False, first_hop=None, saved=False, final="full").id
        )
        if sib is None:
            continue
        base = _median(sib, "wall_s")
        if not base:
            continue
        row = {"case": c["id"], "nonstream_wall_s": base}
        for name, key in (
            ("first_chunk_s", "first_chunk_frac"),
            ("cold_first_chunk_s", "cold_first_chunk_frac"),
            ("wall_s", "stream_total_ratio"),
        ):
            v = _median(c, name)
            if v is not None:
                row[key] = v / base
        out.append(row)
    return out


def streaming_table(doc: dict[str, Any], markdown: bool = False) -> str:
    rows = streaming_ratios(doc)
    if not rows:
        return ""
    head = [
        "streaming case",
        "non-stream wall (s)",
        "first chunk / non-stream",
        "cold first chunk / non-stream",
        "stream total / non-stream",
    ]
    body = [
        [
            r["case"],
            _fmt(r["nonstream_wall_s"]),
            _fmt(r.get("first_chunk_frac")),
            _fmt(r.get("cold_first_chunk_frac")),
            _fmt(r.get("stream_total_ratio")),
        ]
        for r in rows
    ]
    return _table(head, body, markdown)


def describe(doc: dict[str, Any], markdown: bool = False) -> str:
    """Everything about a run: header, per-case figures, streaming and side-by-side ratios;
    a run with cases from several machine kinds (merged from ranks, `bench.shards`) one
    kind at a time, so no table or ratio mixes machines."""
    from bench.results import by_machine

    kinds = by_machine(doc)
    notes = _shard_notes(doc)
    if len(kinds) == 1:
        return _describe_one(doc, markdown, notes)
    lead = [
        f"run {doc['run_id']} [{doc['status']}]  {doc['created']}",
        f"cases from {len(kinds)} machine kinds: each kind is shown, and its ratios taken, apart",
        *notes,
    ]
    parts = ["\n".join(f"- {x}" for x in lead) if markdown else "\n".join(lead)]
    for kind, sub in kinds:
        title = f"machine kind {kind}: {len(sub['cases'])} cases"
        parts.append(f"### {title}" if markdown else f"=== {title}")
        parts.append(_describe_one(sub, markdown, []))
    return "\n\n".join(parts)


def _shard_notes(doc: dict[str, Any]) -> list[str]:
    """The ranks of a merged sharded run, and hosts that ran several at once."""
    from bench.shards import shared_hosts

    shards = doc.get("shards")
    if not shards:
        return []
    hosts = sorted({str(s.get("hostname")) for s in shards})
    out = [f"sharded: {len(shards)} ranks on {len(hosts)} host(s) ({', '.join(hosts)})"]
    for host, ranks in shared_hosts(doc).items():
        out.append(
            f"warning: ranks {ranks} ran at once on {host}: their cases' timings overlap"
            " (compare them with care; a timing run wants one rank per machine)"
        )
    return out


def _describe_one(doc: dict[str, Any], markdown: bool, notes: list[str]) -> str:
    m, v, w = doc["machine"], doc["versions"], doc["weights"]
    dirty = " (uncommitted changes)" if v.get("git_dirty") else ""
    header = [
        f"run {doc['run_id']} [{doc['status']}]  {doc['created']}",
        f"machine: {m['kind']} ({m['cpu']}, {m['cores']} cores, {m.get('memory_gb')} GB)",
        f"versions: mlx {v.get('mlx')}, mlx-lm {v.get('mlx_lm')}, commit {str(v.get('git_commit'))[:10]}{dirty}",
        f"weights: {w.get('label').upper()} ({', '.join(f'{k}={x}' for k, x in w.items() if k != 'label')})",
        f"settings: repeats {doc['settings']['repeats']}, warm-up {doc['settings']['warmup']},"
        f" prompt {doc['settings']['prompt_seconds']} s, fixed length {doc['settings']['fixed_length']}",
    ]
    header += notes
    if markdown:
        header = [f"- {h}" for h in header]
    parts = ["\n".join(header), summary_table(doc, markdown)]
    for table in (streaming_table, fidelity_table):
        s = table(doc, markdown)
        if s:
            parts.append(s)
    for reference in REFERENCES:
        s = side_by_side_table(doc, markdown, reference)
        if s:
            parts.append(s)
    return "\n\n".join(parts)
