"""Speaker similarity (SIM): cosine of speaker embeddings of the prompt and the synthesis.

Two encoders, and every result names the one used, because their numbers are not
comparable (the paper's SIM values are only comparable to `wavlm-ecapa`):

- `wavlm-ecapa`: the protocol's encoder (Seed-TTS-eval): WavLM-large fine-tuned for
  speaker verification with an ECAPA-TDNN head, the `wavlm_large_finetune.pth`
  checkpoint and the model code of UniSpeech's `downstreams/speaker_verification`. Its
  code loads WavLM through `torch.hub` (s3prl) and needs torchaudio, so it runs only where
  the user has that setup (its hub cache for offline use); when it cannot be imported the
  encoder is reported as unavailable with the reason, never replaced silently.
- `resemblyzer`: Resemblyzer's GE2E voice encoder, which ships its weights in the PyPI
  package, so it runs offline anywhere. Runs torch with one thread (with two threads on a
  loaded 2-core machine its spinning threads slowed it many-fold).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from eval.audio import resample

SIM_SAMPLE_RATE = 16000


class EncoderUnavailable(RuntimeError):
    """The requested speaker encoder cannot run here; the message says why."""


@runtime_checkable
class SpeakerEncoder(Protocol):
    """Maps mono float32 audio to a speaker embedding."""

    name: str

    def embed(self, wav: np.ndarray, sample_rate: int) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embedding vectors."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    if den == 0.0:
        raise ValueError("zero embedding")
    return float(a @ b / den)


def similarity(
    encoder: SpeakerEncoder, wav_a: np.ndarray, sr_a: int, wav_b: np.ndarray, sr_b: int
) -> float:
    """SIM of two recordings under `encoder`."""
    return cosine(encoder.embed(wav_a, sr_a), encoder.embed(wav_b, sr_b))


class ResemblyzerEncoder:
    """Resemblyzer's voice encoder (256-d, L2-normalised), with its own preprocessing.

    The audio is resampled to 16 kHz here (Resemblyzer's own resampling call does not
    match current librosa), then volume-normalised and trimmed of long silences by
    `resemblyzer.preprocess_wav`.
    """

    name = "resemblyzer"

    def __init__(self, threads: int = 1) -> None:
        try:
            import torch
            from resemblyzer import VoiceEncoder
        except ImportError as e:
            raise EncoderUnavailable(
                f"resemblyzer is not installed ({e}); pip install --no-deps resemblyzer "
                "webrtcvad-wheels (and torch)"
            ) from e
        torch.set_num_threads(threads)
        self._torch = torch
        self._encoder = VoiceEncoder(device="cpu", verbose=False)
        self.fallback_reason: str | None = None  # set by make_encoder("auto")

    def embed(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        from resemblyzer import preprocess_wav

        x = resample(np.asarray(wav, dtype=np.float32), sample_rate, SIM_SAMPLE_RATE)
        x = preprocess_wav(x)
        if x.size == 0:
            raise ValueError("no speech left after Resemblyzer's silence trimming")
        with self._torch.inference_mode():
            return np.asarray(self._encoder.embed_utterance(x), dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        info: dict[str, Any] = {
            "encoder": self.name,
            "version": version("resemblyzer"),
            "comparable_to_paper": False,
            "note": "GE2E encoder from the resemblyzer package; not the protocol's WavLM-large+ECAPA",
        }
        if self.fallback_reason:
            info["wavlm_ecapa_unavailable"] = self.fallback_reason
        return info


class WavLMECAPAEncoder:
    """The protocol's encoder through UniSpeech's speaker-verification code.

    `checkpoint` is `wavlm_large_finetune.pth`; `unispeech_dir` is the folder
    `UniSpeech/downstreams/speaker_verification` (it holds `models/ecapa_tdnn.py`).
    Built as Seed-TTS-eval builds it: `ECAPA_TDNN_SMALL(feat_dim=1024,
    feat_type="wavlm_large")`, the checkpoint's `model` state loaded non-strictly,
    16 kHz input, cosine of the two embeddings.
    """

    name = "wavlm-ecapa"

    def __init__(self, checkpoint: str | Path, unispeech_dir: str | Path | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        if not self.checkpoint.is_file():
            raise EncoderUnavailable(f"WavLM-ECAPA checkpoint not found: {self.checkpoint}")
        try:
            import torch

            if unispeech_dir is not None:
                d = str(Path(unispeech_dir).resolve())
                if d not in sys.path:
                    sys.path.insert(0, d)
            from models.ecapa_tdnn import ECAPA_TDNN_SMALL  # UniSpeech's module

            model = ECAPA_TDNN_SMALL(feat_dim=1024, feat_type="wavlm_large", config_path=None)
            state = torch.load(str(self.checkpoint), map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"], strict=False)
            model.eval()
        except Exception as e:  # import errors, hub access, torchaudio, a bad checkpoint
            raise EncoderUnavailable(
                "WavLM-large+ECAPA is not available: UniSpeech's speaker_verification code "
                "(pass its folder), torchaudio and s3prl's WavLM through torch.hub (network "
                f"or a filled hub cache) are needed. Cause: {type(e).__name__}: {e}"
            ) from e
        self._torch = torch
        self._model = model

    def embed(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        x = resample(np.asarray(wav, dtype=np.float32), sample_rate, SIM_SAMPLE_RATE)
        with self._torch.no_grad():
            emb = self._model(self._torch.from_numpy(x)[None, :])
        return emb.reshape(-1).numpy().astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            "encoder": self.name,
            "checkpoint": str(self.checkpoint),
            "comparable_to_paper": True,
        }


def make_encoder(
    name: str = "auto",
    checkpoint: str | Path | None = None,
    unispeech_dir: str | Path | None = None,
) -> SpeakerEncoder:
    """Build an encoder by name: `resemblyzer`, `wavlm-ecapa` or `auto`.

    `auto` takes WavLM-ECAPA when a checkpoint is given and it loads, else Resemblyzer;
    the returned encoder's `describe()` says which, and why when it fell back.
    """
    if name == "resemblyzer":
        return ResemblyzerEncoder()
    if name == "wavlm-ecapa":
        if checkpoint is None:
            raise EncoderUnavailable("wavlm-ecapa needs --sim-checkpoint wavlm_large_finetune.pth")
        return WavLMECAPAEncoder(checkpoint, unispeech_dir)
    if name == "auto":
        reason = "no WavLM-ECAPA checkpoint given"
        if checkpoint is not None:
            try:
                return WavLMECAPAEncoder(checkpoint, unispeech_dir)
            except EncoderUnavailable as e:
                reason = str(e)
        enc = ResemblyzerEncoder()
        enc.fallback_reason = reason
        return enc
    raise ValueError(f"unknown speaker encoder {name!r}; use resemblyzer, wavlm-ecapa or auto")
