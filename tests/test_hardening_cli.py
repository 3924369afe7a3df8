"""Bad inputs to the `cosyvoice2` command and to the Python API, each refused cleanly.

Every case goes through `tests.bad_inputs`: the command (`cli_refused`) must exit
non-zero with one line on stderr and no traceback, the API (`refused`) must raise a
one-line `CosyVoiceError`, and neither may leave a file behind: `--out` must not
exist afterwards, or be unchanged when it existed. Damaged model dirs are copies of
the `mlx_tiny_dir` fixture; bombs (huge declared sizes, deep nesting, huge counts)
go through `bounded`, which also caps the child's peak memory.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import cosyvoice2
from cosyvoice2.options import SynthesisOptions
from tests.bad_inputs import bounded, cli_refused, refused

TEXT = "Hello there."
PROMPT_TEXT = "This is a short prompt for the voice test."
# Peak memory allowed to a child that imports the package and refuses a bomb.
BOMB_LIMIT_MB = 1500


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def model(mlx_tiny_dir: Path) -> cosyvoice2.CosyVoice2:
    return cosyvoice2.load(mlx_tiny_dir)


def synth(model_dir: Path, out: Path, *extra: object, prompt: Path | None = None) -> list[str]:
    """`synth` argv: cross-lingual from `prompt` unless `extra` says otherwise, 1 step."""
    argv = ["synth", "--model", model_dir, "--out", out, "--steps", 1, "--quiet"]
    if prompt is not None:
        argv += ["--prompt-wav", prompt]
    if "--text" not in extra and "--text-file" not in extra:
        argv += ["--text", TEXT]
    return [str(a) for a in [*argv, *extra]]


def damaged(src: Path, tmp_path: Path, damage: Callable[[Path], object]) -> Path:
    """A copy of the model dir `src` under `tmp_path`, damaged by `damage(copy)`."""
    d = tmp_path / "model"
    shutil.copytree(src, d)
    damage(d)
    return d


def edit_config(d: Path, edit: Callable[[dict], object]) -> None:
    cfg = d / "config.json"
    meta = json.loads(cfg.read_text(encoding="utf-8"))
    edit(meta)
    cfg.write_text(json.dumps(meta), encoding="utf-8")


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def header_end(path: Path) -> int:
    """The offset where a safetensors file's tensor data starts."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def write_wav(path: Path, x: np.ndarray, sr: int = 16000) -> Path:
    sf.write(path, x.astype(np.float32), sr, subtype="FLOAT")
    return path


def tone(seconds: float = 2.0, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return 0.3 * np.sin(2 * np.pi * 150 * t)


# ------------------------------------------------------------------ text


def test_non_utf8_text_on_the_command_line(
    mlx_tiny_dir: Path, prompt_wav: Path, model, tmp_path: Path
) -> None:
    # Python hands undecodable argv bytes on as lone surrogates (here the byte 0xff).
    out = tmp_path / "out.wav"
    bad = "Hello \udcff there."
    cli_refused("cli", "--text with a byte that is not UTF-8 (0xff)",
                synth(mlx_tiny_dir, out, "--text", bad, prompt=prompt_wav),
                watch=tmp_path, match="--text is not valid UTF-8")  # fmt: skip
    cli_refused("cli", "--prompt-text with a byte that is not UTF-8 (0xff)",
                synth(mlx_tiny_dir, out, "--prompt-text", bad, prompt=prompt_wav),
                watch=tmp_path, match="--prompt-text is not valid UTF-8")  # fmt: skip
    refused("api", "text holding a lone surrogate (undecodable byte)",
            lambda: model.generate(bad, ref_audio=prompt_wav, n_timesteps=1),
            watch=tmp_path, match="not valid Unicode")  # fmt: skip
    refused("api", "prompt text holding a lone surrogate",
            lambda: model.generate(TEXT, ref_audio=prompt_wav, ref_text=bad, n_timesteps=1),
            watch=tmp_path, match="not valid Unicode")  # fmt: skip


def test_text_files(mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    cli_refused("cli", "--text-file that does not exist",
                synth(mlx_tiny_dir, out, "--text-file", tmp_path / "nope.txt", prompt=prompt_wav),
                watch=tmp_path, match="cannot read text file")  # fmt: skip
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 au lait.".encode("latin-1"))
    cli_refused("cli", "--text-file in Latin-1, not UTF-8",
                synth(mlx_tiny_dir, out, "--text-file", latin1, prompt=prompt_wav),
                watch=tmp_path, match="is not UTF-8 (byte 0xe9 at offset 3)")  # fmt: skip
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    cli_refused("cli", "--text-file that is empty",
                synth(mlx_tiny_dir, out, "--text-file", empty, prompt=prompt_wav),
                watch=tmp_path, match="text is empty")  # fmt: skip
    cli_refused("cli", "--text-file that is a directory",
                synth(mlx_tiny_dir, out, "--text-file", tmp_path, prompt=prompt_wav),
                watch=tmp_path, match="cannot read text file")  # fmt: skip
    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"word " * (5 * 2**20 // 5))
    cli_refused("cli", "--text-file of 5 MiB (over the 4 MiB cap)",
                synth(mlx_tiny_dir, out, "--text-file", huge, prompt=prompt_wav),
                watch=tmp_path, match="too large")  # fmt: skip
    cli_refused("cli", "both --text and --text-file",
                synth(mlx_tiny_dir, out, "--text", TEXT, "--text-file", empty, prompt=prompt_wav),
                watch=tmp_path, match="not both")  # fmt: skip


def test_empty_text(mlx_tiny_dir: Path, prompt_wav: Path, model, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    cli_refused("cli", "--text ''", synth(mlx_tiny_dir, out, "--text", "", prompt=prompt_wav),
                watch=tmp_path, match="text is empty")  # fmt: skip
    refused("api", "text ''", lambda: model.generate("", ref_audio=prompt_wav, n_timesteps=1),
            watch=tmp_path, match="text is empty")  # fmt: skip


# ------------------------------------------------------------------ option values


@pytest.mark.parametrize("speed", ["nan", "inf", "0", "-1"])
def test_bad_speed(speed: str, mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    cli_refused("cli", f"--speed {speed}",
                synth(mlx_tiny_dir, out, f"--speed={speed}", prompt=prompt_wav),
                watch=tmp_path, match="--speed: speed must be between 0.25 and 4")  # fmt: skip


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_bad_steps(steps: str, mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    cli_refused("cli", f"--steps {steps}",
                synth(mlx_tiny_dir, out, f"--steps={steps}", prompt=prompt_wav),
                watch=tmp_path, match="--steps: n_timesteps must be an integer")  # fmt: skip


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_bad_seed(seed: str, mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    cli_refused("cli", f"--seed {seed}",
                synth(mlx_tiny_dir, out, f"--seed={seed}", prompt=prompt_wav),
                watch=tmp_path, match="--seed: seed must be an integer")  # fmt: skip


BAD_OPTIONS = [
    ("speed", math.nan, "speed must be between"),
    ("speed", math.inf, "speed must be between"),
    ("speed", 0.0, "speed must be between"),
    ("speed", -1.0, "speed must be between"),
    ("speed", "fast", "speed must be between"),
    ("n_timesteps", 0, "n_timesteps must be an integer"),
    ("n_timesteps", -3, "n_timesteps must be an integer"),
    ("n_timesteps", 2.5, "n_timesteps must be an integer"),
    ("n_timesteps", 10**9, "n_timesteps must be an integer"),
    ("seed", -1, "seed must be an integer"),
    ("seed", 2**64, "seed must be an integer"),
    ("seed", math.nan, "seed must be an integer"),
    ("seed", 1.5, "seed must be an integer"),
    ("seed", "abc", "seed must be an integer"),
    ("max_token_text_ratio", math.nan, "max_token_text_ratio must be a finite number"),
    ("max_tokens", -1, "max_tokens must be an integer"),
]


@pytest.mark.parametrize("name, value, message", BAD_OPTIONS)
def test_bad_option_values(name: str, value: object, message: str) -> None:
    refused("api", f"SynthesisOptions({name}={value!r})",
            lambda: SynthesisOptions.of(**{name: value}), match=message)  # fmt: skip


@pytest.mark.parametrize("name, value", [("speed", math.nan), ("n_timesteps", 0), ("seed", -1)])
def test_bad_option_values_in_a_mode(
    name: str, value: object, model, prompt_wav: Path, tmp_path: Path
) -> None:
    refused("api", f"generate(..., {name}={value!r})",
            lambda: model.generate(TEXT, ref_audio=prompt_wav, **{name: value}),
            watch=tmp_path, match=name)  # fmt: skip


def test_good_option_values_still_pass() -> None:
    assert SynthesisOptions.of(seed=np.int64(3), speed=0.25, n_timesteps=1).seed == 3
    assert SynthesisOptions.of(seed=4.0, speed=4).seed == 4
    assert SynthesisOptions.of(seed=2**62, max_tokens=0, n_timesteps=1000).seed == 2**62


# ------------------------------------------------------------------ damaged model dirs


def _vocab(d: Path) -> Path:
    return d / "tokenizer" / "vocab.json"


TOKENIZER_DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {
    "vocab.json truncated to half": (
        lambda d: truncate(_vocab(d), _vocab(d).stat().st_size // 2),
        "vocab.json: not valid JSON",
    ),
    "vocab.json of random bytes": (
        lambda d: _vocab(d).write_bytes(np.random.default_rng(0).bytes(4096)),
        "vocab.json: not",
    ),
    "vocab.json a JSON list": (
        lambda d: _vocab(d).write_text("[1, 2, 3]"),
        "vocab.json: not a map of tokens to ids",
    ),
    "vocab.json with string ids": (
        lambda d: _vocab(d).write_text('{"a": "1", "b": 2}'),
        "vocab.json: not a map",
    ),
    "merges.txt with a line of three symbols": (
        lambda d: (d / "tokenizer" / "merges.txt").write_text("#version: 0.2\na b c\n"),
        "merges.txt: line 2 is not a merge of two symbols",
    ),
    "merges.txt merging symbols not in vocab.json": (
        lambda d: (d / "tokenizer" / "merges.txt").write_text("zzq\u0100 qqz\u0101\n"),
        "do not make a BPE model",
    ),
    "merges.txt of bytes that are not UTF-8": (
        lambda d: (d / "tokenizer" / "merges.txt").write_bytes(b"\xff\xfe a b\n"),
        "merges.txt: not UTF-8",
    ),
    "tokenizer_config.json not JSON": (
        lambda d: (d / "tokenizer" / "tokenizer_config.json").write_text("{added_tokens"),
        "tokenizer_config.json: not valid JSON",
    ),
    "tokenizer_config.json with added tokens as a list": (
        lambda d: (d / "tokenizer" / "tokenizer_config.json").write_text(
            '{"added_tokens_decoder": [1, 2]}'
        ),
        "tokenizer_config.json: not a tokenizer config",
    ),
    "tokenizer_config.json with an added token id that is not a number": (
        lambda d: (d / "tokenizer" / "tokenizer_config.json").write_text(
            '{"added_tokens_decoder": {"x": {"content": "<|endoftext|>"}}}'
        ),
        "tokenizer_config.json: bad added token 'x'",
    ),
    "tokenizer.json of garbage": (
        lambda d: (d / "tokenizer" / "tokenizer.json").write_text('{"model": 5}'),
        "tokenizer.json: not a tokenizers file",
    ),
}


@pytest.mark.parametrize("what", list(TOKENIZER_DAMAGE))
def test_corrupt_tokenizer_files(
    what: str, mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path
) -> None:
    damage, match = TOKENIZER_DAMAGE[what]
    d = damaged(mlx_tiny_dir, tmp_path, damage)
    refused("api", f"model dir: {what}", lambda: cosyvoice2.load(d), watch=tmp_path, match=match)
    if what in ("vocab.json truncated to half", "tokenizer.json of garbage"):
        cli_refused("cli", f"model dir: {what}",
                    synth(d, tmp_path / "out.wav", prompt=prompt_wav), watch=tmp_path,
                    match=match)  # fmt: skip


def _weights_tail_cut(d: Path) -> None:
    f = d / "llm.safetensors"
    truncate(f, f.stat().st_size - 100)


def _weights_header_cut(d: Path) -> None:
    f = d / "flow.safetensors"
    truncate(f, header_end(f) // 2)


WEIGHTS_DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {
    "campplus.safetensors missing": (
        lambda d: (d / "campplus.safetensors").unlink(),
        "missing campplus.safetensors",
    ),
    "speech_tokenizer.safetensors missing": (
        lambda d: (d / "speech_tokenizer.safetensors").unlink(),
        "missing speech_tokenizer.safetensors",
    ),
    "llm.safetensors without its last 100 bytes": (
        _weights_tail_cut,
        "llm.safetensors: cannot read (tensor",
    ),
    "flow.safetensors cut inside its header": (
        _weights_header_cut,
        "flow.safetensors: cannot read (the header declares",
    ),
    "hift.safetensors of 5 bytes": (
        lambda d: (d / "hift.safetensors").write_bytes(b"\x01\x02\x03\x04\x05"),
        "hift.safetensors: cannot read (5 bytes, too short",
    ),
}


@pytest.mark.parametrize("what", list(WEIGHTS_DAMAGE))
def test_missing_and_corrupt_weights(
    what: str, mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path
) -> None:
    damage, match = WEIGHTS_DAMAGE[what]
    d = damaged(mlx_tiny_dir, tmp_path, damage)
    refused("api", f"model dir: {what}", lambda: cosyvoice2.load(d), watch=tmp_path, match=match)
    cli_refused("cli", f"model dir: {what}", synth(d, tmp_path / "out.wav", prompt=prompt_wav),
                watch=tmp_path, match=match)  # fmt: skip


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        *parents, leaf = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[leaf] = value

    return edit


CONFIG_DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {
    "config.json not JSON": (
        lambda d: (d / "config.json").write_text("model_type: cosyvoice2\n"),
        "not valid JSON",
    ),
    "config.json of bytes that are not UTF-8": (
        lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00{"),
        "not valid JSON",
    ),
    "config.json: llm.qwen.num_hidden_layers 2.5": (
        lambda d: edit_config(d, _set("llm.qwen.num_hidden_layers", 2.5)),
        "bad llm settings (`llm.qwen.num_hidden_layers` must be an integer, got 2.5)",
    ),
    "config.json: flow.encoder.normalize_before 'yes'": (
        lambda d: edit_config(d, _set("flow.encoder.normalize_before", "yes")),
        "bad flow settings (`flow.encoder.normalize_before` must be true or false",
    ),
    "config.json: hift.upsample_rates 'abc'": (
        lambda d: edit_config(d, _set("hift.upsample_rates", "abc")),
        "bad hift settings (`hift.upsample_rates` must be a list",
    ),
    "config.json: llm.sampling.top_p NaN": (
        lambda d: edit_config(d, _set("llm.sampling.top_p", math.nan)),
        "bad llm settings (`llm.sampling.top_p` must be a finite number, got nan)",
    ),
    "config.json: sample_rate true": (
        lambda d: edit_config(d, _set("sample_rate", True)),
        "`sample_rate` must be an integer",
    ),
    "config.json: hift.base_channels -32": (
        lambda d: edit_config(d, _set("hift.base_channels", -32)),
        "bad hift settings (`hift.base_channels` is -32, outside 0..",
    ),
    "config.json: speech_tokenizer.n_head '2'": (
        lambda d: edit_config(d, _set("speech_tokenizer.n_head", "2")),
        "bad speech_tokenizer settings (`speech_tokenizer.n_head` must be an integer",
    ),
    "config.json: llm_precision.dtype 'int3'": (
        lambda d: edit_config(d, _set("llm_precision", {"dtype": "int3"})),
        "bad llm settings (`llm_precision.dtype` must be one of",
    ),
    "config.json: llm_precision quantised to 7 bits": (
        lambda d: edit_config(
            d, _set("llm_precision", {"quantization": {"bits": 7, "group_size": 64}})
        ),
        "`llm_precision.quantization.bits` must be one of 2, 3, 4, 5, 6, 8, got 7",
    ),
}


@pytest.mark.parametrize("what", list(CONFIG_DAMAGE))
def test_bad_config(what: str, mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path) -> None:
    damage, match = CONFIG_DAMAGE[what]
    d = damaged(mlx_tiny_dir, tmp_path, damage)
    refused("api", f"model dir: {what}", lambda: cosyvoice2.load(d), watch=tmp_path, match=match)
    if what in ("config.json not JSON", "config.json: hift.upsample_rates 'abc'"):
        cli_refused("cli", f"model dir: {what}",
                    synth(d, tmp_path / "out.wav", prompt=prompt_wav), watch=tmp_path,
                    match=match)  # fmt: skip


def _load_snippet(d: Path) -> str:
    return f"import cosyvoice2\ncosyvoice2.load({str(d)!r})\n"


def _huge_header(d: Path) -> None:
    f = d / "hift.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    f.write_bytes(bytes(data))


def _huge_tensor(d: Path) -> None:
    """hift.safetensors whose first tensor declares 2**40 floats at offsets past the end."""
    f = d / "hift.safetensors"
    raw = f.read_bytes()
    end = header_end(f)
    header = json.loads(raw[8:end])
    name = next(k for k in header if k != "__metadata__")
    header[name] = {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}
    text = json.dumps(header).encode()
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[end:])


BOMBS: dict[str, tuple[Callable[[Path], object], str]] = {
    "safetensors header length of 1 TiB": (_huge_header, "the header declares 1099511627776"),
    "safetensors tensor of 2**40 floats": (_huge_tensor, "not inside the file"),
    "config.json: llm.qwen.num_hidden_layers 10**9": (
        lambda d: edit_config(d, _set("llm.qwen.num_hidden_layers", 10**9)),
        "`llm.qwen.num_hidden_layers` is 1000000000, outside 0..4096",
    ),
    "config.json: flow.decoder.estimator.channels of 10**6 items": (
        lambda d: edit_config(d, _set("flow.decoder.estimator.channels", [64] * 10**6)),
        "must be a list of at most 64 items",
    ),
    "config.json: hift.base_channels 10**12": (
        lambda d: edit_config(d, _set("hift.base_channels", 10**12)),
        "outside 0..1048576",
    ),
    "config.json: campplus.num_layers [10**9]": (
        lambda d: edit_config(d, _set("campplus.num_layers", [10**9, 1, 1])),
        "`campplus.num_layers[0]` is 1000000000",
    ),
    "config.json nested 100000 lists deep": (
        lambda d: (d / "config.json").write_text("[" * 100_000 + "]" * 100_000),
        "nested too deeply",
    ),
    "config.json of 20 MiB": (
        lambda d: (d / "config.json").write_bytes(b" " * (20 * 2**20) + b"{}"),
        "more than a config file may hold",
    ),
    "vocab.json nested 100000 lists deep": (
        lambda d: _vocab(d).write_text("[" * 100_000 + "]" * 100_000),
        "nested too deeply",
    ),
    "merges.txt of 70 MiB": (
        lambda d: (d / "tokenizer" / "merges.txt").write_bytes(b"a b\n" * (70 * 2**18)),
        "more than a tokenizer file may hold",
    ),
}


@pytest.mark.parametrize("what", list(BOMBS))
def test_model_dir_bombs(what: str, mlx_tiny_dir: Path, tmp_path: Path) -> None:
    damage, match = BOMBS[what]
    d = damaged(mlx_tiny_dir, tmp_path, damage)
    bounded("api", f"model dir: {what}", _load_snippet(d), BOMB_LIMIT_MB, watch=tmp_path,
            match=match, timeout=180)  # fmt: skip


# ------------------------------------------------------------------ prompt audio


def test_bad_prompt_audio(mlx_tiny_dir: Path, model, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    nan = tone()
    nan[1000] = np.nan
    inf = tone()
    inf[5] = np.inf
    cases = {
        "prompt wav (float) holding a NaN": (write_wav(src / "nan.wav", nan), "NaN or infinite"),
        "prompt wav (float) holding an inf": (write_wav(src / "inf.wav", inf), "NaN or infinite"),
        "prompt 'wav' that is a text file": (src / "text.wav", "cannot read prompt audio"),
        "prompt wav that does not exist": (src / "nope.wav", "prompt audio not found"),
        "prompt wav that is a directory": (src, "prompt audio is not a file"),
    }
    (src / "text.wav").write_text("not audio at all\n")
    out = tmp_path / "out.wav"
    for what, (prompt, match) in cases.items():
        cli_refused("cli", what, synth(mlx_tiny_dir, out, prompt=prompt), watch=tmp_path,
                    match=match)  # fmt: skip
        refused("api", what, lambda p=prompt: model.generate(TEXT, ref_audio=p, n_timesteps=1),
                watch=tmp_path, match=match)  # fmt: skip
    refused("api", "prompt samples (array) holding a NaN",
            lambda: model.generate(TEXT, ref_audio=(nan, 16000), n_timesteps=1),
            watch=tmp_path, match="NaN or infinite")  # fmt: skip


# ------------------------------------------------------------------ the output file


def test_bad_out(mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path) -> None:
    cli_refused("cli", "--out in a folder that does not exist",
                synth(mlx_tiny_dir, tmp_path / "no" / "such" / "x.wav", prompt=prompt_wav),
                watch=tmp_path, match="output folder does not exist")  # fmt: skip
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    cli_refused("cli", "--out that is a directory",
                synth(mlx_tiny_dir, folder, prompt=prompt_wav),
                watch=tmp_path, match="output path is a directory")  # fmt: skip


def test_existing_out_is_kept_on_error(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    out.write_bytes(b"the previous result")
    bad = write_wav(tmp_path / "silent.wav", np.zeros(32000))
    cli_refused("cli", "silent prompt, --out already there",
                synth(mlx_tiny_dir, out, prompt=bad), watch=tmp_path, match="silent")  # fmt: skip
    assert out.read_bytes() == b"the previous result"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("failure", ["error", "interrupt"])
def test_output_is_atomic(
    failure: str, stream: bool, mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, monkeypatch
) -> None:
    """A synthesis that fails (or is interrupted) after its first chunk leaves no `--out`,
    or the old one, and no temporary file."""
    from cosyvoice2 import cli
    from cosyvoice2.errors import InputError
    from cosyvoice2.model import CosyVoice2

    def half_then_fail(self, *args, **kwargs):
        yield {"tts_speech": np.full((1, 4800), 0.1, dtype=np.float32)}
        raise KeyboardInterrupt if failure == "interrupt" else InputError("chunk 2 failed")

    monkeypatch.setattr(CosyVoice2, "inference_cross_lingual", half_then_fail)
    out = tmp_path / "out.wav"
    extra = ["--stream"] if stream else []
    assert cli.main(synth(mlx_tiny_dir, out, *extra, prompt=prompt_wav)) == (
        130 if failure == "interrupt" else 2
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    out.write_bytes(b"old")
    cli.main(synth(mlx_tiny_dir, out, *extra, prompt=prompt_wav))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]
    assert out.read_bytes() == b"old"


def test_a_written_wav_is_readable_by_all(
    mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path
) -> None:
    """The renamed temporary file gets a plain file's mode, not mkstemp's 0600."""
    import os

    from cosyvoice2 import cli

    out = tmp_path / "out.wav"
    assert cli.main(synth(mlx_tiny_dir, out, prompt=prompt_wav)) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
