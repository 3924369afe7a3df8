"""Convert an official CosyVoice2 model dir into an MLX model dir.

Input (as users download it): `cosyvoice2.yaml`, `llm.pt`, `flow.pt`, `hift.pt`,
`campplus.onnx`, `speech_tokenizer_v2.onnx`, `CosyVoice-BlankEN/`, optionally
`spk2info.pt`. Nothing from these files is executed: the yaml is read as data
(`official_yaml`), the `.pt` pickles through an allow-list unpickler that builds
tensors only (`checkpoint`), the ONNX files through the protobuf reader.

Output: an MLX model dir in the format of `cosyvoice2.model_dir` (which
`cosyvoice2.load` reads without torch): HiFT's weight norm and CAM++'s batch
norms are folded, the speech LM is stored at the requested precision, and
`spk2info.pt`, when present, becomes saved speakers.

The output dir is written beside its final place and renamed at the end, so a
failed conversion leaves no partial dir.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from cosyvoice2.config import OFFICIAL_FILES, ModelConfig, config_from_official_dir
from cosyvoice2.errors import CosyVoiceError
from cosyvoice2.files import recover_dir, staged_dir
from cosyvoice2.model_dir import (
    CONFIG_FILE,
    FORMAT_VERSION,
    LLM_DTYPES,
    MODEL_TYPE,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    speaker_store,
    weights_file,
)


class ConversionError(CosyVoiceError):
    """The official model dir cannot be converted (missing or invalid files)."""


def _check_official_dir(src: Path) -> None:
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    missing = [f for f in OFFICIAL_FILES if not (src / f).is_file()]
    if missing:
        raise ConversionError(f"{src}: not a CosyVoice2 model dir, missing {', '.join(missing)}")


def _strict_load(module: Any, weights: dict[str, mx.array], what: str) -> None:
    """Load weights strictly, turning shape/key mismatches into a ConversionError naming the file."""
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ConversionError(
            f"{what}: keys do not match the model (missing {missing[:3]}{'...' if len(missing) > 3 else ''},"
            f" unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); a checkpoint of another model?"
        )
    bad = [k for k, v in weights.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise ConversionError(
            f"{what}: {k} has shape {tuple(weights[k].shape)}, the config says {tuple(expected[k].shape)}"
        )
    module.load_weights(list(weights.items()), strict=True)


def _save(path: Path, weights: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def _convert_llm(
    src: Path, config: ModelConfig, dtype: str, bits: int | None, group_size: int
) -> tuple[dict[str, mx.array], dict[str, Any]]:
    from cosyvoice2 import llm as llm_mod
    from cosyvoice2.checkpoint import load_torch_checkpoint

    weights = llm_mod.Qwen2LM.sanitize(load_torch_checkpoint(src / "llm.pt"))
    model = llm_mod.Qwen2LM(config.llm)
    _strict_load(model, weights, str(src / "llm.pt"))
    del weights
    llm_mod.cast(model, dtype)
    record: dict[str, Any] = {"dtype": dtype}
    if bits is not None:
        record["quantization"] = llm_mod.quantize(model, bits=bits, group_size=group_size)
    out = llm_mod.weights_of(model)
    mx.eval(out)
    return out, record


def _convert_flow(src: Path, config: ModelConfig) -> dict[str, mx.array]:
    from cosyvoice2.checkpoint import load_torch_checkpoint
    from cosyvoice2.flow.flow import CausalMaskedDiffWithXvec

    model = CausalMaskedDiffWithXvec(config.flow)
    _strict_load(
        model, model.sanitize(load_torch_checkpoint(src / "flow.pt")), str(src / "flow.pt")
    )
    return dict(tree_flatten(model.parameters()))


def _convert_hift(src: Path, config: ModelConfig) -> dict[str, mx.array]:
    from cosyvoice2.checkpoint import load_torch_checkpoint
    from cosyvoice2.hift import HiFTGenerator

    model = HiFTGenerator(config.hift)
    _strict_load(
        model, HiFTGenerator.sanitize(load_torch_checkpoint(src / "hift.pt")), str(src / "hift.pt")
    )
    return dict(tree_flatten(model.parameters()))


def _convert_onnx(src: Path) -> tuple[dict[str, Any], dict[str, dict[str, mx.array]]]:
    from cosyvoice2.frontend.campplus import CAMPPlus
    from cosyvoice2.frontend.speech_tokenizer import SpeechTokenizerV2
    from cosyvoice2.onnx_weights import read_onnx_weights

    configs, weights = {}, {}
    for name, cls, fname in (
        ("campplus", CAMPPlus, "campplus.onnx"),
        ("speech_tokenizer", SpeechTokenizerV2, "speech_tokenizer_v2.onnx"),
    ):
        try:
            model = cls.from_weights(read_onnx_weights(src / fname))
        except CosyVoiceError:
            raise
        except Exception as e:  # a malformed or foreign ONNX file
            raise ConversionError(
                f"{src / fname}: cannot read as {name} ({type(e).__name__}: {e})"
            ) from None
        configs[name] = model.config.to_dict()
        weights[name] = dict(tree_flatten(model.parameters()))
    return configs, weights


def _convert_speakers(src: Path, dst: Path) -> list[str]:
    """Import `spk2info.pt` (speaker id -> embedding, speech tokens, mel) as saved speakers."""
    path = src / "spk2info.pt"
    if not path.is_file():
        return []
    from cosyvoice2.checkpoint import load_torch_checkpoint
    from cosyvoice2.speakers import Speaker

    store = speaker_store(dst)
    for spk_id, info in load_torch_checkpoint(path, mmap=False).items():
        if not isinstance(info, dict):
            raise ConversionError(f"{path}: entry {spk_id!r} is not a dict")
        store.save(Speaker.from_official(spk_id, info))
    return store.list()


def convert(
    src: str | Path,
    dst: str | Path,
    llm_dtype: str = "float32",
    llm_bits: int | None = None,
    group_size: int = 64,
    overwrite: bool = False,
) -> Path:
    """Convert the official dir `src` into the MLX model dir `dst` (atomically)."""
    src, dst = Path(src), Path(dst)
    if llm_dtype not in LLM_DTYPES:
        raise ConversionError(f"llm dtype must be one of {LLM_DTYPES}, got {llm_dtype!r}")
    if llm_bits not in (None, 4, 8):
        raise ConversionError(f"llm bits must be 4 or 8, got {llm_bits!r}")
    _check_official_dir(src)
    recover_dir(dst)  # a run killed mid-swap: its old dir counts as existing
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst}: already exists (pass overwrite=True / --overwrite)")
    try:
        config = config_from_official_dir(src)
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{src / 'cosyvoice2.yaml'}: {e}") from None

    with staged_dir(dst) as tmp:
        llm_weights, llm_record = _convert_llm(src, config, llm_dtype, llm_bits, group_size)
        _save(tmp / weights_file("llm"), llm_weights)
        del llm_weights
        _save(tmp / weights_file("flow"), _convert_flow(src, config))
        _save(tmp / weights_file("hift"), _convert_hift(src, config))
        onnx_configs, onnx_weights = _convert_onnx(src)
        for name, weights in onnx_weights.items():
            _save(tmp / weights_file(name), weights)
        (tmp / TOKENIZER_DIR).mkdir()
        for name in TOKENIZER_FILES:
            if (src / "CosyVoice-BlankEN" / name).is_file():
                shutil.copy2(src / "CosyVoice-BlankEN" / name, tmp / TOKENIZER_DIR / name)
        speakers = _convert_speakers(src, tmp)
        # The weights' own record: `synthetic.json` marks a synthetic official dir; the released
        # files carry no record that they are the release, so anything else is "unknown".
        label = "synthetic" if (src / "synthetic.json").is_file() else "unknown"
        meta = {
            "model_type": MODEL_TYPE,
            "format_version": FORMAT_VERSION,
            "weights": label,
            **config.to_dict(),
            "llm_precision": llm_record,
            **onnx_configs,
            "converted_from": str(src.resolve()),
            "speakers": speakers,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    return dst


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "official_dir",
        help="the official CosyVoice2-0.5B dir, or its Hugging Face hub id (OWNER/NAME)",
    )
    p.add_argument("mlx_dir", type=Path, help="where to write the MLX model dir")
    p.add_argument(
        "--llm-bits", type=int, choices=(4, 8), default=None, help="quantise the speech LM"
    )
    p.add_argument(
        "--group-size", type=int, default=64, help="quantisation group size (default 64)"
    )
    p.add_argument(
        "--dtype", choices=LLM_DTYPES, default="float32", help="speech LM float precision"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing MLX dir")
    p.add_argument(
        "--revision", help="branch, tag or commit of a hub id given as the source (default main)"
    )
    p.add_argument(
        "--upload-repo",
        metavar="ID",
        help="then upload the MLX dir, with a model card (README.md), to this hub repo"
        " (created if missing; token from HF_TOKEN or `huggingface-cli login`)",
    )
    p.add_argument("--private", action="store_true", help="create the upload repo private")
    p.add_argument("--commit-message", help="the upload's commit message")


def main(args: argparse.Namespace) -> int:
    from cosyvoice2 import hub

    src, base_model = args.official_dir, None
    upload_repo = getattr(args, "upload_repo", None)
    if upload_repo is not None and not hub.is_repo_id(upload_repo):
        raise ConversionError(f"--upload-repo must be a hub id OWNER/NAME, got {upload_repo!r}")
    revision = getattr(args, "revision", None)
    repo_id = hub.hub_id(src)
    if repo_id is not None:  # only the files the converter reads are downloaded
        src, base_model = hub.download_official(repo_id, revision).path, repo_id
    elif revision is not None:
        raise ConversionError(f"{src}: a local dir has no revision ({revision!r} is for hub ids)")
    out = convert(
        src,
        args.mlx_dir,
        llm_dtype=args.dtype,
        llm_bits=args.llm_bits,
        group_size=args.group_size,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}", file=sys.stderr)
    if upload_repo is not None:
        hub.write_model_card(out, base_model, upload_repo)
        url = hub.upload(out, upload_repo, private=args.private, commit_message=args.commit_message)
        print(f"uploaded {out} to {upload_repo}: {url}", file=sys.stderr)
    return 0
