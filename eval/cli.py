"""`python -m eval`: synthesise a test set, score it, convert Whisper models.

Subcommands:

    run              synthesis, then scoring (the usual entry point)
    synth            synthesis only (cached per utterance, resumable)
    score            ASR round trip and SIM of a synthesis folder
    merge            the parts of a run split with --shard i/n, into one result
    convert-whisper  CTranslate2 Whisper -> mlx-whisper folder

Examples:

    python -m eval run --set seedtts_testset/en/meta.lst --model-dir models/cv2-mlx \\
        --precision 8bit --steps 10 --asr mlx-community/whisper-large-v3-mlx
    python -m eval run --set my_set.csv --tts copy --asr offline:tiny.en --limit 20
    python -m eval run --set my_set.csv --model-dir models/cv2-mlx --dtype bf16 \\
        --flow-bits 8 --inference-cfg-rate 0.5

Outputs go to `eval/results/<set>/<tag>/` unless `--out` is given: `manifest.json` and
`wavs/` (synthesis), `results.json`, `utterances.csv`, `summary.csv` (scores).

Split over ranks (`eval.shards`): `mlx.launch -n 2 -- python -m eval run ...` (rank 0
merges), or `--shard 0/2` and `--shard 1/2` as separate jobs, then `python -m eval merge OUT`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from eval.datasets import TestSet, load_test_set, subset

DEFAULT_RESULTS = Path("eval") / "results"


def _add_set_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--set", required=True, type=Path, help="meta.lst, a .csv, or a folder")
    ap.add_argument("--lang", choices=("auto", "en", "zh"), default="auto")
    ap.add_argument("--limit", type=int, help="only the first N utterances")
    ap.add_argument("--name", help="set name in results (default: from the path)")


def _add_synth_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tts", choices=("cosyvoice2", "copy"), default="cosyvoice2")
    ap.add_argument(
        "--model-dir",
        help="MLX model dir, or a Hugging Face hub id of one or of an official repo"
        " (for --tts cosyvoice2)",
    )
    ap.add_argument("--precision", help="LLM precision of the model (e.g. fp32, bf16, 8bit, 4bit)")
    ap.add_argument("--steps", type=int, default=10, help="flow-matching steps (n_timesteps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), help="flow/HiFT dtype (default: the dir's own)"
    )
    ap.add_argument(
        "--flow-bits", type=int, choices=(8, 4), help="quantise the flow's linear layers"
    )
    ap.add_argument(
        "--inference-cfg-rate",
        type=_cfg_rate,
        metavar="X",
        help="the flow's classifier-free guidance rate (default: the model's)",
    )
    ap.add_argument("--overwrite", action="store_true", help="discard a cached synthesis")


def _cfg_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _add_score_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--asr",
        default="offline:tiny.en",
        help="mlx-whisper model: offline:tiny.en, offline:base, a folder, or a hub repo id",
    )
    ap.add_argument("--sim", choices=("auto", "resemblyzer", "wavlm-ecapa", "none"), default="auto")
    ap.add_argument("--sim-checkpoint", type=Path, help="wavlm_large_finetune.pth")
    ap.add_argument("--unispeech-dir", type=Path, help="UniSpeech/downstreams/speaker_verification")


def _load_set(args: argparse.Namespace) -> TestSet:
    ts = load_test_set(args.set, lang=None if args.lang == "auto" else args.lang, name=args.name)
    return subset(ts, limit=args.limit) if args.limit else ts


def _make_synth(args: argparse.Namespace):
    from eval.synth import CopySynthesizer, CosyVoice2Synthesizer

    if args.tts == "copy":
        return CopySynthesizer()
    if args.model_dir is None:
        raise SystemExit("--model-dir is required with --tts cosyvoice2")
    return CosyVoice2Synthesizer(
        _model_dir(args.model_dir),
        args.precision,
        args.steps,
        args.seed,
        dtype=args.dtype,
        flow_bits=args.flow_bits,
        inference_cfg_rate=args.inference_cfg_rate,
    )


def _model_dir(model: str) -> Path:
    """`--model-dir` as a local dir: a hub id is downloaded (and converted once) here."""
    if Path(model).exists():
        return Path(model)  # the package is not even imported (see tests/test_eval_cli.py)
    from cosyvoice2.errors import CosyVoiceError
    from cosyvoice2.hub import resolve

    try:
        return resolve(model)
    except CosyVoiceError as e:
        raise SystemExit(f"--model-dir: {e}") from None


def _tag(settings: dict[str, Any]) -> str:
    from eval.synth import settings_tag

    return settings_tag(settings)


def _synth(args: argparse.Namespace, ts: TestSet):
    from eval.synth import synthesize_set

    synth = _make_synth(args)
    out = args.out or DEFAULT_RESULTS / ts.name / _tag(synth.describe())
    run = synthesize_set(ts, synth, out, overwrite=args.overwrite)
    failed = run.failed()
    print(f"synthesis: {len(run.entries) - len(failed)} ok, {len(failed)} failed -> {out}")
    for e in failed:
        print(f"  failed {e.id}: {e.error}", file=sys.stderr)
    return run


def _scorers(args: argparse.Namespace, ts: TestSet):
    """The ASR model and speaker encoder of `--asr` / `--sim` (SystemExit when the ASR
    model cannot transcribe a language of the set), and their description for results."""
    from eval.asr import MLXWhisper
    from eval.similarity import make_encoder

    langs = {u.lang for u in ts}
    transcriber = MLXWhisper(args.asr)
    unsupported = sorted(lang for lang in langs if not transcriber.supports(lang))
    if unsupported:
        raise SystemExit(f"ASR model {args.asr!r} cannot transcribe {unsupported}; pass --asr")
    encoder = (
        None
        if args.sim == "none"
        else make_encoder(args.sim, args.sim_checkpoint, args.unispeech_dir)
    )
    return transcriber, encoder


def _models(run, transcriber, encoder) -> dict[str, Any]:
    return {
        "tts": run.settings,
        "asr": transcriber.describe(),
        "sim": encoder.describe() if encoder is not None else None,
    }


def _audio_source(run):
    def audio_for(utt_id: str):
        e = run.entries.get(utt_id)
        if e is None:
            return None, "not synthesised"
        return (run.out_dir / e.wav, None) if e.ok else (None, e.error)

    return audio_for


def _score(args: argparse.Namespace, ts: TestSet, run) -> dict[str, Any]:
    from eval.results_io import build_results
    from eval.score import score_set

    transcriber, encoder = _scorers(args, ts)
    rows = score_set(ts, _audio_source(run), transcriber, encoder)
    doc = build_results(
        rows,
        ts.describe(),
        run.settings,
        _models(run, transcriber, encoder),
        run.settings.get("weights", "unknown"),
    )
    _write_and_print(doc, run.out_dir)
    return doc


def _write_and_print(doc: dict[str, Any], out: Path) -> None:
    from eval.results_io import write_results

    paths = write_results(doc, out)
    s = doc["summary"]
    rate = s["mean_error_rate_x100"]
    print(
        f"{s['metric']} {rate:.2f} (mean of {s['n_scored']} utterances, x100), "
        f"corpus {s['corpus_error_rate']}, SIM {s['sim_mean']} [{s['sim_encoder']}], "
        f"{s['n_failed']} failed -> {paths['json']}"
        if rate is not None
        else f"nothing scored; {s['n_failed']} failed -> {paths['json']}"
    )
    for uid, why in s["failures"].items():
        print(f"  failed {uid}: {why}", file=sys.stderr)


# --------------------------------------------------------------------------- sharded runs


def _sharded(args: argparse.Namespace, ts: TestSet, shard) -> int:
    """This rank's share of a `run` or `synth` (`eval.shards`); rank 0 of an `mlx.launch`
    group then merges every rank's part into the output folder."""
    from dataclasses import asdict

    from eval.datasets import subset
    from eval.score import score_set
    from eval.shards import new_part, part_dir, read_part, reusable_rows, write_part
    from eval.synth import synthesize_set
    from sharding import ShardError

    synth = _make_synth(args)
    out = args.out or DEFAULT_RESULTS / ts.name / _tag(synth.describe())
    mine = subset(ts, ids=[u.id for u in shard.take(list(ts))])
    pdir = part_dir(out, shard)
    run = synthesize_set(mine, synth, pdir, overwrite=args.overwrite)
    failed = run.failed()
    print(
        f"rank {shard.name}: synthesis of {len(mine)} of {len(ts)} utterances: "
        f"{len(run.entries) - len(failed)} ok, {len(failed)} failed -> {pdir}"
    )
    part_text = ""
    if args.cmd == "run":
        transcriber, encoder = _scorers(args, ts)
        part = new_part(
            shard,
            ts.describe(),
            [u.id for u in ts],
            run.settings,
            _models(run, transcriber, encoder),
            run.settings.get("weights", "unknown"),
        )
        path = pdir / "part.json"
        old = None
        if args.resume and path.is_file():
            try:
                old = read_part(path)
            except ShardError as e:
                print(f"rank {shard.name}: scoring again: {e}", file=sys.stderr)
        scored = reusable_rows(old, part, run.entries)
        if args.resume:
            print(f"rank {shard.name}: {len(scored)} scored rows kept from the earlier part")

        def save(row=None) -> None:
            if row is not None:
                scored[row.id] = row
            part["rows"] = [scored[u.id].to_dict() for u in mine if u.id in scored]
            part["scored_from"] = {u: asdict(run.entries[u]) for u in scored}
            write_part(path, part)

        save()
        score_set(mine, _audio_source(run), transcriber, encoder, done=dict(scored), on_row=save)
        part["status"] = "complete"
        save()
        part_text = path.read_text(encoding="utf-8")
    manifest_text = run.manifest_path.read_text(encoding="utf-8")
    if not shard.connected:
        print(
            f"part {shard.name} written to {pdir}; once every part is in {out / 'parts'}, "
            f"merge them with: python -m eval merge {out}"
        )
        return 0 if args.cmd == "run" or not failed else 1
    parts = shard.gather_bytes(part_text.encode("utf-8"))
    manifests = shard.gather_bytes(manifest_text.encode("utf-8"))
    if shard.rank != 0:
        return 0 if args.cmd == "run" or not failed else 1
    import json

    return _merge_into(
        out,
        [json.loads(p) for p in parts if p],
        {f"{r}-of-{shard.size}": json.loads(m) for r, m in enumerate(manifests)},
    )


def _merge_into(out: Path, parts: list[dict], manifests: dict[str, dict]) -> int:
    """Write the merged results (when there are parts) and manifest into `out`; a merge
    that cannot be made is one line on stderr and status 1, nothing written."""
    from eval.shards import interleaved_order, merge_manifests, merge_parts
    from sharding import ShardError

    try:
        doc = merge_parts(parts) if parts else None
        if manifests:
            order = (
                [u["id"] for u in doc["utterances"]]
                if doc is not None
                else interleaved_order(manifests)
            )
            merge_manifests(out, manifests, order)
    except ShardError as e:
        print(f"merge: {e}", file=sys.stderr)
        return 1
    except (KeyError, TypeError, ValueError) as e:
        print(f"merge: a part is malformed ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    if doc is None:
        print(f"merged synthesis manifest -> {out / 'manifest.json'}")
        return 0
    _write_and_print(doc, out)
    return 0 if doc["summary"]["n_scored"] else 1


def _merge(args: argparse.Namespace) -> int:
    """`python -m eval merge OUT`: the parts under `OUT/parts/` into one result."""
    from eval.shards import local_parts
    from sharding import ShardError

    try:
        parts, manifests = local_parts(args.out)
    except ShardError as e:
        print(f"merge: {e}", file=sys.stderr)
        return 1
    return _merge_into(args.out, parts, manifests)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert-whisper":
        from eval.whisper_convert import main as convert_main

        return convert_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="synthesise and score a set")
    p_synth = sub.add_parser("synth", help="synthesise a set (cached, resumable)")
    p_score = sub.add_parser("score", help="score a synthesis folder")
    p_merge = sub.add_parser("merge", help="merge the parts of a sharded run (--shard i/n)")
    sub.add_parser("convert-whisper", help="CTranslate2 Whisper -> mlx-whisper (see its --help)")
    for p in (p_run, p_synth, p_score):
        _add_set_args(p)
    for p in (p_run, p_synth):
        _add_synth_args(p)
        p.add_argument("--out", type=Path, help="output folder")
        p.add_argument(
            "--shard",
            metavar="I/N",
            help="run shard I of N (0-based; utterances I, I+N, ...) and write its part (see"
            " `merge`); under mlx.launch each rank takes its shard by itself",
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="sharded runs: keep the rows each part has scored (synthesis is always reused)",
        )
    p_merge.add_argument("out", type=Path, help="the run's output folder (with parts/)")
    for p in (p_run, p_score):
        _add_score_args(p)
    p_score.add_argument("--synth-dir", required=True, type=Path, help="folder with manifest.json")
    args = ap.parse_args(argv)

    if args.cmd == "merge":
        return _merge(args)
    ts = _load_set(args)
    if args.cmd in ("run", "synth"):
        from sharding import ShardError, from_args

        try:
            shard = from_args(args.shard)
        except ShardError as e:
            print(f"eval {args.cmd}: {e}", file=sys.stderr)
            return 2
        if shard.size > 1:
            return _sharded(args, ts, shard)
    if args.cmd == "synth":
        run = _synth(args, ts)
        return 1 if run.failed() else 0
    if args.cmd == "run":
        run = _synth(args, ts)
    else:
        from eval.synth import SynthRun

        run = SynthRun.load(args.synth_dir)
    doc = _score(args, ts, run)
    return 0 if doc["summary"]["n_scored"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
