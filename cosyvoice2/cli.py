"""The `cosyvoice2` command: convert, synth, speakers.

Every error a user can cause (bad files, bad text, bad audio, unwritable output)
ends in one line on stderr naming the problem and exit code 2, with no traceback
and no partial output file: audio is written to a temporary file beside the
target and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from cosyvoice2.errors import CosyVoiceError, InputError

EXIT_USAGE = 2


def _writable_target(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if out.exists() and out.is_dir():
        raise InputError(f"output path is a directory: {out}")
    if not parent.is_dir():
        raise InputError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder is not writable: {parent}")


class AudioWriter:
    """Write float32 audio to `out` atomically, appending chunks as they come (for `--stream`)."""

    def __init__(self, out: Path, sample_rate: int):
        import soundfile as sf

        _writable_target(out)
        self.out = out
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".wav", dir=out.parent or ".")
        os.close(fd)
        self.tmp = Path(tmp)
        self.file = sf.SoundFile(
            str(self.tmp), "w", samplerate=sample_rate, channels=1, subtype="PCM_16"
        )
        self.samples = 0

    def write(self, audio: np.ndarray) -> None:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        self.file.write(audio)
        self.file.flush()
        self.samples += audio.shape[0]

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _synth(args: argparse.Namespace) -> int:
    import cosyvoice2

    text = args.text
    if args.text_file is not None:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read text file {args.text_file}: {e}") from None
    if text is None:
        raise InputError("give --text or --text-file")
    _writable_target(args.out)
    model = cosyvoice2.load(args.model)
    model.frontend.check_text(text)
    options = {
        "n_timesteps": args.steps,
        "seed": args.seed,
        "stream": args.stream,
        "speed": args.speed,
    }
    segments = model.frontend.normalize_tts_text(text)
    bar = None
    if len(segments) > 1 and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(segments), unit="segment", file=sys.stderr)
        options["progress"] = lambda i, n, s: bar.update(1) if i else None
    if args.instruct is not None:
        it = model.inference_instruct2(
            text, args.instruct, args.prompt_wav, args.speaker or "", **options
        )
    elif args.speaker is not None:
        it = model.inference_zero_shot(text, "", None, args.speaker, **options)
    elif args.prompt_wav is not None and args.prompt_text:
        it = model.inference_zero_shot(text, args.prompt_text, args.prompt_wav, **options)
    elif args.prompt_wav is not None:
        it = model.inference_cross_lingual(text, args.prompt_wav, **options)
    else:
        raise InputError(
            "give --prompt-wav (with --prompt-text for zero-shot), --speaker or --instruct"
        )
    writer = AudioWriter(args.out, model.sample_rate)
    try:
        for out in it:
            writer.write(np.asarray(out["tts_speech"]))
        writer.commit()
        if bar is not None:
            bar.update(bar.total - bar.n)
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    label = "" if model.weights_label == "real" else f", {model.weights_label} weights: not speech"
    print(f"wrote {args.out} ({writer.samples / model.sample_rate:.2f} s{label})", file=sys.stderr)
    return 0


def _speakers(args: argparse.Namespace) -> int:
    import cosyvoice2

    model = cosyvoice2.load(args.model)
    if args.action == "add":
        model.add_zero_shot_spk(args.prompt_text, args.prompt_wav, args.id)
        print(f"added speaker {args.id!r}", file=sys.stderr)
    elif args.action == "list":
        for spk in model.list_available_spks():
            print(spk)
    elif args.action == "remove":
        model.speakers.remove(args.id)
        print(f"removed speaker {args.id!r}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cosyvoice2 import convert

    p = argparse.ArgumentParser(
        prog="cosyvoice2", description="CosyVoice2-0.5B text-to-speech in MLX"
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="official model dir -> MLX model dir")
    convert.add_arguments(c)
    c.set_defaults(func=convert.main)

    s = sub.add_parser("synth", help="synthesise speech to a wav file")
    s.add_argument("--model", type=Path, required=True, help="MLX model dir")
    s.add_argument("--text", help="text to speak")
    s.add_argument("--text-file", type=Path, help="read the text from a UTF-8 file")
    s.add_argument(
        "--prompt-wav", type=Path, help="voice prompt (any rate and channel count, 0.5-30 s)"
    )
    s.add_argument(
        "--prompt-text", help="transcript of the prompt (zero-shot); omit for cross-lingual"
    )
    s.add_argument("--speaker", help="a saved speaker id instead of a prompt")
    s.add_argument(
        "--instruct", help="an instruction (instruct2 mode), e.g. 'Speak slowly.<|endofprompt|>'"
    )
    s.add_argument("--out", type=Path, required=True, help="output wav (24 kHz)")
    s.add_argument("--steps", type=int, default=10, help="flow-matching steps (default 10)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--speed", type=float, default=1.0)
    s.add_argument(
        "--stream", action="store_true", help="synthesise in chunks, writing each as it comes"
    )
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_synth)

    k = sub.add_parser("speakers", help="saved speakers of a model dir")
    k.add_argument("action", choices=("add", "list", "remove"))
    k.add_argument("--model", type=Path, required=True)
    k.add_argument("--id", help="speaker id (add, remove)")
    k.add_argument("--prompt-wav", type=Path, help="voice prompt (add)")
    k.add_argument("--prompt-text", default="", help="its transcript (add)")
    k.set_defaults(func=_speakers)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "speakers" and args.action in ("add", "remove") and not args.id:
        parser.error(f"speakers {args.action} needs --id")
    if args.command == "speakers" and args.action == "add" and args.prompt_wav is None:
        parser.error("speakers add needs --prompt-wav")
    if args.command == "synth" and args.steps < 1:
        parser.error("--steps must be at least 1")
    try:
        return args.func(args)
    except CosyVoiceError as e:
        print(f"cosyvoice2: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cosyvoice2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
