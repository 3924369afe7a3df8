"""`python -m eval`: synthesise a test set, score it, convert Whisper models.

Subcommands:

    run              synthesis, then scoring (the usual entry point)
    synth            synthesis only (cached per utterance, resumable)
    score            ASR round trip and SIM of a synthesis folder
    convert-whisper  CTranslate2 Whisper -> mlx-whisper folder

Examples:

    python -m eval run --set seedtts_testset/en/meta.lst --model-dir models/cv2-mlx \\
        --precision 8bit --steps 10 --asr mlx-community/whisper-large-v3-mlx
    python -m eval run --set my_set.csv --tts copy --asr offline:tiny.en --limit 20
    python -m eval run --set my_set.csv --model-dir models/cv2-mlx --dtype bf16 \\
        --flow-bits 8 --inference-cfg-rate 0.5

Outputs go to `eval/results/<set>/<tag>/` unless `--out` is given: `manifest.json` and
`wavs/` (synthesis), `results.json`, `utterances.csv`, `summary.csv` (scores).
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


def _score(args: argparse.Namespace, ts: TestSet, run) -> dict[str, Any]:
    from eval.asr import MLXWhisper
    from eval.results_io import build_results, write_results
    from eval.score import score_set
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

    def audio_for(utt_id: str):
        e = run.entries.get(utt_id)
        if e is None:
            return None, "not synthesised"
        return (run.out_dir / e.wav, None) if e.ok else (None, e.error)

    rows = score_set(ts, audio_for, transcriber, encoder)
    models = {
        "tts": run.settings,
        "asr": transcriber.describe(),
        "sim": encoder.describe() if encoder is not None else None,
    }
    doc = build_results(
        rows, ts.describe(), run.settings, models, run.settings.get("weights", "unknown")
    )
    paths = write_results(doc, run.out_dir)
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
    return doc


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
    sub.add_parser("convert-whisper", help="CTranslate2 Whisper -> mlx-whisper (see its --help)")
    for p in (p_run, p_synth, p_score):
        _add_set_args(p)
    for p in (p_run, p_synth):
        _add_synth_args(p)
        p.add_argument("--out", type=Path, help="output folder")
    for p in (p_run, p_score):
        _add_score_args(p)
    p_score.add_argument("--synth-dir", required=True, type=Path, help="folder with manifest.json")
    args = ap.parse_args(argv)

    ts = _load_set(args)
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
