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
# The command-line flag of each load argument whose value `cosyvoice2.load` checks.
LOAD_FLAGS = {
    "flow_bits": "--flow-bits",
    "inference_cfg_rate": "--inference-cfg-rate",
    "flow_dtype": "--flow-dtype",
}


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


class StdoutWavWriter:
    """Write 16-bit WAV to standard output (`--out -`), for a pipe.

    Whole-utterance output is held until the end and written as one WAV whose header
    gives its length. With `--stream` each chunk is written as it comes, after a header
    whose lengths are the largest a WAV can state (0xFFFFFFFF, the convention for a
    stream of unknown length, which sox, ffmpeg and libsndfile read to the end of the
    data). Nothing is written when the synthesis fails before its first chunk.
    """

    def __init__(self, sample_rate: int, streamed: bool):
        self.sample_rate = sample_rate
        self.streamed = streamed
        self.held: list[np.ndarray] = []
        self.samples = 0
        self.started = False
        self.stdout = sys.stdout.buffer

    def _header(self, data_bytes: int) -> bytes:
        import struct

        riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
        return (
            b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, self.sample_rate, self.sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data_bytes)
        )  # fmt: skip

    @staticmethod
    def _pcm16(audio: np.ndarray) -> bytes:
        # as libsndfile writes PCM_16 (the file output): float32 scaled by 32768, floored, clipped
        pcm = np.floor(audio.astype(np.float32) * np.float32(32768.0))
        return np.clip(pcm, -32768, 32767).astype("<i2").tobytes()

    def _put(self, data: bytes) -> None:
        try:
            self.stdout.write(data)
            self.stdout.flush()
        except BrokenPipeError:
            raise InputError("standard output was closed (broken pipe)") from None
        except OSError as e:
            raise InputError(f"cannot write standard output: {_first_line(e)}") from None

    def write(self, audio: np.ndarray) -> None:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        self.samples += audio.shape[0]
        if not self.streamed:
            self.held.append(audio)
            return
        if not self.started:
            self._put(self._header(0xFFFFFFFF))
            self.started = True
        self._put(self._pcm16(audio))

    def commit(self) -> None:
        if self.streamed:
            if not self.started:
                self._put(self._header(0xFFFFFFFF))
            return
        pcm = self._pcm16(np.concatenate(self.held) if self.held else np.zeros(0, np.float32))
        self._put(self._header(len(pcm)) + pcm)

    def abort(self) -> None:
        self.held = []


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


def _stream_options(args: argparse.Namespace) -> dict:
    """`schedule` from the stream settings (`--first-hop`, `--token-hop`), which need `--stream`."""
    given = {"first_hop_len": args.first_hop, "token_hop_len": args.token_hop}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return {}
    if not args.stream:
        raise InputError("--first-hop and --token-hop need --stream")
    for name, flag in (("first_hop_len", "--first-hop"), ("token_hop_len", "--token-hop")):
        if name in given and not 1 <= given[name] <= 1000:
            raise InputError(f"{flag} must be 1 to 1000 speech tokens, got {given[name]}")
    from cosyvoice2.streaming import StreamSchedule

    return {"schedule": StreamSchedule(**given)}


def _load_model(args: argparse.Namespace):
    """The model `--model` names (a dir or a hub id), at the precision the flags ask for."""
    import cosyvoice2

    _check_utf8(args.model, "--model")
    kwargs = {}
    if getattr(args, "revision", None) is not None:
        kwargs["revision"] = args.revision
    if getattr(args, "llm_dtype", None) is not None:
        kwargs["llm_dtype"] = args.llm_dtype
    if getattr(args, "llm_bits", None) is not None:
        kwargs["llm_bits"] = args.llm_bits
    if getattr(args, "route", None) is not None:
        kwargs["route"] = args.route
    if getattr(args, "flow_bits", None) is not None:
        kwargs["flow_bits"] = args.flow_bits
    if getattr(args, "inference_cfg_rate", None) is not None:
        kwargs["inference_cfg_rate"] = args.inference_cfg_rate
    if getattr(args, "flow_dtype", None) is not None:
        kwargs["flow_dtype"] = args.flow_dtype
    from cosyvoice2.options import OptionError

    try:
        return cosyvoice2.load(args.model, **kwargs)
    except OptionError as e:  # checked before the model is read
        flag = LOAD_FLAGS.get(e.option)
        raise InputError(f"{flag}: {e}" if flag else str(e)) from None


def _text_of(args: argparse.Namespace) -> str:
    if args.text is not None and args.text_file is not None:
        raise InputError("give --text or --text-file, not both")
    text = args.text
    if args.text_file is not None:
        text = _read_text_file(args.text_file)
    if text is None:
        raise InputError("give --text or --text-file")
    return text


def _transcribe_prompt(args: argparse.Namespace) -> str:
    """The prompt's transcript by the eval's Whisper (`--stt-model`), said on stderr."""
    try:
        from eval.asr import MLXWhisper
    except ImportError as e:
        raise InputError(
            f"--stt-model needs the eval extra (pip install 'cosyvoice2-mlx[eval]'): {e}"
        ) from None
    from cosyvoice2.frontend.audio import load_wav

    audio = load_wav(args.prompt_wav, 16000)
    text = MLXWhisper(args.stt_model)(audio, args.stt_lang).strip()
    if not text:
        raise InputError(f"{args.stt_model} heard no words in {args.prompt_wav}")
    if not args.quiet:
        print(f"cosyvoice2: prompt transcript ({args.stt_model}): {text}", file=sys.stderr)
    return text


def _synth(args: argparse.Namespace) -> int:
    for flag in ("text", "prompt_text", "speaker", "instruct"):
        _check_utf8(getattr(args, flag), "--" + flag.replace("_", "-"))
    text = _text_of(args)
    options = {**_synth_options(args), **_stream_options(args), "stream": args.stream}
    if args.prompt_text and args.stt_model:
        raise InputError("give --prompt-text or --stt-model, not both")
    if args.speaker is not None and args.prompt_wav is not None and args.instruct is None:
        raise InputError("give --speaker or --prompt-wav, not both")
    target = _output(args.out)
    model = _load_model(args)
    model.frontend.check_text(text)
    if args.instruct is not None:
        make = lambda **o: model.inference_instruct2(  # noqa: E731
            text, args.instruct, args.prompt_wav, args.speaker or "", **o
        )
    elif args.speaker is not None and args.prompt_wav is None:
        make = lambda **o: model.inference_zero_shot(text, "", None, args.speaker, **o)  # noqa: E731
    elif args.prompt_wav is not None:
        prompt_text = args.prompt_text
        if not prompt_text and args.stt_model:
            prompt_text = _transcribe_prompt(args)
        if prompt_text:
            make = lambda **o: model.inference_zero_shot(text, prompt_text, args.prompt_wav, **o)  # noqa: E731
        else:
            print(
                "cosyvoice2: notice: no --prompt-text: cross-lingual mode (the prompt's voice, not its"
                " words, guides the speech); give --prompt-text or --stt-model for zero-shot",
                file=sys.stderr,
            )
            make = lambda **o: model.inference_cross_lingual(text, args.prompt_wav, **o)  # noqa: E731
    else:
        raise InputError(
            "give --prompt-wav (with --prompt-text for zero-shot), --speaker or --instruct"
        )
    return _render(args, model, make, options, target, segments=text)


def _sft(args: argparse.Namespace) -> int:
    for flag in ("text", "speaker"):
        _check_utf8(getattr(args, flag), "--" + flag)
    text = _text_of(args)
    options = {**_synth_options(args), **_stream_options(args), "stream": args.stream}
    target = _output(args.out)
    model = _load_model(args)
    model.frontend.check_text(text)
    make = lambda **o: model.inference_sft(text, args.speaker, **o)  # noqa: E731
    return _render(args, model, make, options, target, segments=text)


def _vc(args: argparse.Namespace) -> int:
    options = {**_synth_options(args), **_stream_options(args), "stream": args.stream}
    target = _output(args.out)
    model = _load_model(args)
    make = lambda **o: model.inference_vc(args.source_wav, args.prompt_wav, **o)  # noqa: E731
    return _render(args, model, make, options, target, segments=None)


def _output(out: Path) -> Path | None:
    """`out` checked for writing before the model loads; None for `-` (stdout)."""
    if str(out) == "-":
        if sys.stdout.isatty():
            raise InputError(
                "--out -: standard output is a terminal; redirect it to a file or pipe"
            )
        return None
    _writable_target(out)
    return out


def _render(args, model, make, options: dict, target: Path | None, segments: str | None) -> int:
    """Run the mode (`make(**options)`), writing its chunks to `target` (or stdout) as they come."""
    bar = None
    if segments is not None:
        n = len(model.frontend.normalize_tts_text(segments))
        if n > 1 and not args.quiet:
            from tqdm import tqdm

            bar = tqdm(total=n, unit="segment", file=sys.stderr)
            options["progress"] = lambda i, n, s: bar.update(1) if i else None
    writer = (
        AudioWriter(target, model.sample_rate)
        if target is not None
        else StdoutWavWriter(model.sample_rate, streamed=args.stream)
    )
    try:
        for out in make(**options):
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
    where = args.out if target is not None else "standard output"
    print(f"wrote {where} ({writer.samples / model.sample_rate:.2f} s{label})", file=sys.stderr)
    return 0


def _speakers(args: argparse.Namespace) -> int:
    _check_utf8(args.id, "--id")
    _check_utf8(args.prompt_text, "--prompt-text")
    model = _load_model(args)
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


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="MLX model dir, or a Hugging Face id (downloaded, cached)"
    )
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of a hub id")
    p.add_argument(
        "--llm-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="speech LM precision at load (default: the dir's)",
    )
    p.add_argument(
        "--llm-bits", type=int, choices=(4, 8), help="quantise the speech LM at load (4 or 8 bits)"
    )
    p.add_argument(
        "--route",
        choices=("extension", "plain", "composed"),
        help="compute backend (default: the fastest available)",
    )


def _text_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="text to speak")
    p.add_argument("--text-file", type=Path, help="read the text from a UTF-8 file")


def _synthesis_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", type=Path, required=True, help="output wav (24 kHz); '-' for standard output"
    )
    p.add_argument("--steps", type=int, default=10, help="flow-matching steps, 1-1000 (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed, 0 to 2**62 (default 0)")
    p.add_argument("--speed", type=float, default=1.0, help="tempo, 0.25-4 (default 1)")
    p.add_argument(
        "--stream", action="store_true", help="synthesise in chunks, writing each as it comes"
    )
    p.add_argument(
        "--first-hop",
        type=int,
        help="speech tokens in the first streamed chunk (default: the official schedule's)",
    )
    p.add_argument(
        "--token-hop", type=int, help="speech tokens per later streamed chunk (default 25)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or notices")
    p.add_argument(
        "--flow-bits",
        type=int,
        choices=(4, 8, 16),
        help="quantise the flow's linear layers at load (4 or 8 bits), or 16: the flow "
        "estimator's transformer projections in bfloat16",
    )
    p.add_argument(
        "--inference-cfg-rate",
        type=float,
        help="the flow's classifier-free guidance rate, >= 0 (default: the model's, 0.7)",
    )
    p.add_argument(
        "--flow-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="hold the flow and HiFT in this dtype, cast as they are read (default float32)",
    )


def build_parser() -> argparse.ArgumentParser:
    from cosyvoice2 import convert

    p = argparse.ArgumentParser(
        prog="cosyvoice2", description="CosyVoice2-0.5B text-to-speech in MLX"
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="official model dir -> MLX model dir")
    convert.add_arguments(c)
    c.set_defaults(func=convert.main)

    s = sub.add_parser(
        "synth", help="speech from text: zero-shot, cross-lingual, instruct or a saved speaker"
    )
    _model_arguments(s)
    _text_arguments(s)
    s.add_argument(
        "--prompt-wav",
        "--ref-audio",
        "--ref_audio",
        type=Path,
        dest="prompt_wav",
        help="voice prompt (any rate and channel count, 0.5-30 s)",
    )
    s.add_argument(
        "--prompt-text",
        "--ref-text",
        "--ref_text",
        dest="prompt_text",
        help="transcript of the prompt (zero-shot); without it (and --stt-model): cross-lingual",
    )
    s.add_argument(
        "--stt-model",
        help="transcribe the prompt with this Whisper (the eval's names: offline:tiny.en,"
        " a local mlx-whisper dir or hub id) when no --prompt-text is given",
    )
    s.add_argument("--stt-lang", default="en", choices=("en", "zh"), help="the prompt's language")
    s.add_argument("--speaker", help="a saved speaker id instead of a prompt")
    s.add_argument(
        "--instruct", help="an instruction (instruct2 mode), e.g. 'Speak slowly.<|endofprompt|>'"
    )
    _synthesis_arguments(s)
    s.set_defaults(func=_synth)

    f = sub.add_parser("sft", help="speech from text in a saved speaker's voice (SFT mode)")
    _model_arguments(f)
    _text_arguments(f)
    f.add_argument("--speaker", required=True, help="a saved speaker id")
    _synthesis_arguments(f)
    f.set_defaults(func=_sft)

    c = sub.add_parser("vc", help="voice conversion: the source speech in the prompt's voice")
    _model_arguments(c)
    c.add_argument(
        "--source-wav", type=Path, required=True, help="speech to convert (at most 30 s)"
    )
    c.add_argument(
        "--prompt-wav",
        "--ref-audio",
        "--ref_audio",
        type=Path,
        dest="prompt_wav",
        required=True,
        help="the target voice (0.5-30 s)",
    )
    _synthesis_arguments(c)
    c.set_defaults(func=_vc)

    k = sub.add_parser("speakers", help="saved speakers of a model dir")
    k.add_argument("action", choices=("add", "list", "remove"))
    _model_arguments(k)
    k.add_argument("--id", help="speaker id (add, remove)")
    k.add_argument("--prompt-wav", type=Path, help="voice prompt (add)")
    k.add_argument("--prompt-text", default="", help="its transcript (add)")
    k.set_defaults(func=_speakers)

    v = sub.add_parser("serve", help="OpenAI-compatible speech server (needs the [serve] extra)")
    v.set_defaults(func=_serve, serve_parser=v)
    _serve_arguments(v)
    return p


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from cosyvoice2 import server

    server.add_arguments(parser)


def _serve(args: argparse.Namespace) -> int:
    from cosyvoice2 import server

    return server.main(args)


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
