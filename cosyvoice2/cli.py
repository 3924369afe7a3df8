"""The `cosyvoice2` command: convert, synth, speakers.

Every error a user can cause (bad files, bad text, bad audio, bad option values,
unwritable output) ends in one line on stderr naming the problem and exit code 2,
with no traceback and no partial output file: audio is written to a temporary
file beside the target and renamed into place only when complete. What can be
checked without the model (option values, command-line text, the output path)
is checked before the model is loaded.
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
# A text file larger than this is refused before it is read (the text frontend takes
# at most 20,000 characters, at most 80 kB of UTF-8).
MAX_TEXT_FILE_BYTES = 4 * 2**20
# The command-line flag of each synthesis option the command sets.
OPTION_FLAGS = {"n_timesteps": "--steps", "seed": "--seed", "speed": "--speed"}


def _writable_target(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if out.exists() and out.is_dir():
        raise InputError(f"output path is a directory: {out}")
    if not parent.is_dir():
        raise InputError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder is not writable: {parent}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AudioWriter:
    """Write float32 audio to `out` atomically, appending chunks as they come (for `--stream`).

    The chunks go to a temporary file beside `out`; `commit` renames it into place,
    `abort` removes it, so `out` is either the whole result or left as it was. A
    failed write (a full disk) is an `InputError` naming `out`.
    """

    def __init__(self, out: Path, sample_rate: int):
        import soundfile as sf

        _writable_target(out)
        self.out = out
        self.file = None
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".wav", dir=out.parent or ".")
        os.close(fd)
        self.tmp = Path(tmp)
        try:
            os.chmod(self.tmp, 0o666 & ~_umask())  # as a plainly created file (mkstemp: 0600)
            self.file = sf.SoundFile(
                str(self.tmp), "w", samplerate=sample_rate, channels=1, subtype="PCM_16"
            )
        except BaseException as e:
            self.tmp.unlink(missing_ok=True)
            if isinstance(e, Exception):
                raise InputError(f"cannot write {out}: {_first_line(e)}") from None
            raise
        self.samples = 0

    def write(self, audio: np.ndarray) -> None:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        try:
            self.file.write(audio)
            self.file.flush()
        except Exception as e:  # soundfile's LibsndfileError (a RuntimeError), OSError
            raise InputError(f"cannot write {self.out}: {_first_line(e)}") from None
        self.samples += audio.shape[0]

    def commit(self) -> None:
        try:
            self.file.close()
            os.replace(self.tmp, self.out)
        except OSError as e:
            raise InputError(f"cannot write {self.out}: {_first_line(e)}") from None

    def abort(self) -> None:
        try:
            if self.file is not None and not self.file.closed:
                self.file.close()
        except Exception:  # noqa: BLE001 - the file is discarded anyway
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_utf8(value: str | None, flag: str) -> None:
    """Refuse an argument holding bytes that are not UTF-8 (Python passes them on as
    lone surrogates, which no text encoder accepts)."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"{flag} is not valid UTF-8 text (undecodable byte at character {e.start})"
        ) from None


def _read_text_file(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_FILE_BYTES + 1)
    except OSError as e:
        reason = e.strerror or _first_line(e)
        raise InputError(f"cannot read text file {path}: {reason}") from None
    if len(data) > MAX_TEXT_FILE_BYTES:
        raise InputError(f"text file {path} is too large: over {MAX_TEXT_FILE_BYTES // 2**20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"text file {path} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


def _synth_options(args: argparse.Namespace) -> dict:
    """The synthesis options of the command line, checked (an error names the flag)."""
    from cosyvoice2.options import OptionError, SynthesisOptions

    options = {"n_timesteps": args.steps, "seed": args.seed, "speed": args.speed}
    try:
        SynthesisOptions.of(**options)
    except OptionError as e:
        flag = OPTION_FLAGS.get(e.option)
        raise InputError(f"{flag}: {e}" if flag else str(e)) from None
    return options


def _synth(args: argparse.Namespace) -> int:
    import cosyvoice2

    for flag in ("text", "prompt_text", "speaker", "instruct"):
        _check_utf8(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.text is not None and args.text_file is not None:
        raise InputError("give --text or --text-file, not both")
    text = args.text
    if args.text_file is not None:
        text = _read_text_file(args.text_file)
    if text is None:
        raise InputError("give --text or --text-file")
    options = {**_synth_options(args), "stream": args.stream}
    _writable_target(args.out)
    model = cosyvoice2.load(args.model)
    model.frontend.check_text(text)
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
    label = {"real": "", "synthetic": ", synthetic weights: not speech"}.get(
        model.weights_label, f", {model.weights_label} weights: not recorded as the real model"
    )
    print(f"wrote {args.out} ({writer.samples / model.sample_rate:.2f} s{label})", file=sys.stderr)
    return 0


def _speakers(args: argparse.Namespace) -> int:
    import cosyvoice2

    _check_utf8(args.id, "--id")
    _check_utf8(args.prompt_text, "--prompt-text")
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
    s.add_argument("--steps", type=int, default=10, help="flow-matching steps, 1-1000 (default 10)")
    s.add_argument("--seed", type=int, default=0, help="random seed, 0 to 2**62 (default 0)")
    s.add_argument("--speed", type=float, default=1.0, help="tempo, 0.25-4 (default 1)")
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
    try:
        return args.func(args)
    except CosyVoiceError as e:
        message = " ".join(str(e).split("\n"))  # one line, whatever the message holds
        print(f"cosyvoice2: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cosyvoice2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

    v = sub.add_parser("serve", help="OpenAI-compatible speech server (needs the [serve] extra)")
    v.set_defaults(func=_serve, serve_parser=v)
    _serve_arguments(v)
def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from cosyvoice2 import server

    server.add_arguments(parser)


def _serve(args: argparse.Namespace) -> int:
    from cosyvoice2 import server

    return server.main(args)


