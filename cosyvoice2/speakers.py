"""Saved speakers: what a voice prompt contributes, computed once and stored in the model dir.

A `Speaker` holds the official frontend's prompt-side `model_input`: the prompt
transcript's text tokens, the prompt speech tokens (25 Hz), the prompt mel
(50 Hz, 80 bins) and the CAM++ x-vector. Speakers imported from an official
`spk2info.pt` keep exactly the fields it has (an SFT speaker has only an
embedding). Each speaker is one safetensors file in `speakers/`; the index maps
ids to file names, so any id (including `/` or `..`) is safe.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from cosyvoice2.errors import InputError


def _row(x: Any, dtype: Any) -> mx.array:
    a = np.asarray(x)
    if a.ndim == 0:
        a = a.reshape(1)
    return mx.array(a.reshape(1, -1).astype(dtype))


@dataclass
class Speaker:
    """One saved voice (shapes with the leading batch axis of the official tensors)."""

    id: str
    embedding: mx.array  # (1, 192)
    prompt_text: mx.array  # (1, n) int32, may be empty
    speech_token: mx.array  # (1, m) int32, may be empty (SFT speakers)
    speech_feat: mx.array  # (1, 2m, 80) float32, may be empty
    prompt_text_str: str = ""

    @classmethod
    def from_official(cls, spk_id: str, info: dict[str, Any]) -> Speaker:
        """From an official `spk2info.pt` entry (zero-shot `model_input` or SFT `{'embedding': ...}`)."""
        emb = info.get("flow_embedding", info.get("embedding", info.get("llm_embedding")))
        if emb is None:
            raise InputError(f"speaker {spk_id!r}: no embedding in spk2info entry")
        feat = np.asarray(
            info.get("prompt_speech_feat", info.get("speech_feat", np.zeros((1, 0, 80))))
        )
        tokens = info.get("flow_prompt_speech_token", info.get("speech_token", np.zeros((1, 0))))
        return cls(
            id=spk_id,
            embedding=_row(emb, np.float32),
            prompt_text=_row(info.get("prompt_text", np.zeros((1, 0))), np.int32),
            speech_token=_row(tokens, np.int32),
            speech_feat=mx.array(feat.reshape(1, -1, 80).astype(np.float32)),
        )

    def arrays(self) -> dict[str, mx.array]:
        return {
            "embedding": self.embedding,
            "prompt_text": self.prompt_text,
            "speech_token": self.speech_token,
            "speech_feat": self.speech_feat,
        }


class SpeakerStore:
    """The `speakers/` folder of an MLX model dir."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _index(self) -> dict[str, str]:
        path = self.root / "index.json"
        if not path.is_file():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    def _write_index(self, index: dict[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True, ensure_ascii=False)
        os.replace(tmp, self.root / "index.json")

    def list(self) -> list[str]:
        return sorted(self._index())

    def __contains__(self, spk_id: str) -> bool:
        return spk_id in self._index()

    def save(self, speaker: Speaker) -> None:
        if not isinstance(speaker.id, str) or not speaker.id.strip():
            raise InputError("speaker id is empty")
        index = self._index()
        name = (
            index.get(speaker.id)
            or f"spk{len(index):05d}-{speaker.id.encode().hex()[:32]}.safetensors"
        )
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp.safetensors"
        mx.save_safetensors(
            str(tmp),
            speaker.arrays(),
            metadata={"id": speaker.id, "prompt_text": speaker.prompt_text_str},
        )
        os.replace(tmp, self.root / name)
        index[speaker.id] = name
        self._write_index(index)

    def load(self, spk_id: str) -> Speaker:
        index = self._index()
        if spk_id not in index:
            known = ", ".join(sorted(index)) or "none saved"
            raise InputError(f"unknown speaker {spk_id!r} (known: {known})")
        arrays, meta = mx.load(str(self.root / index[spk_id]), return_metadata=True)
        return Speaker(id=spk_id, prompt_text_str=meta.get("prompt_text", ""), **arrays)

    def remove(self, spk_id: str) -> None:
        index = self._index()
        if spk_id not in index:
            raise InputError(f"unknown speaker {spk_id!r}")
        name = index.pop(spk_id)
        self._write_index(index)
        (self.root / name).unlink(missing_ok=True)
