"""CosyVoice2 in MLX: load a converted model dir and synthesise in every official mode.

The official `CosyVoice2` (cli/cosyvoice.py), its frontend and `CosyVoice2Model`
(cli/model.py) in one object without their side effects: no threads polling a
token list, no per-request state keyed by uuid on the model, no reseeding. A
request is a pipeline of generators: text segments -> speech tokens (LLM) ->
mel (flow) -> waveform (HiFT). Every random draw comes from the request's
`seed`, so the same seed gives the same audio.

Each mode yields `{"tts_speech": mx.array (1, samples)}` at 24 kHz, one item
per text segment (or per chunk with `stream=True`), like the official generators.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from cosyvoice2.config import ModelConfig
from cosyvoice2.errors import CosyVoiceError, InputError
from cosyvoice2.speakers import Speaker, SpeakerStore
from cosyvoice2.streaming import StreamSchedule, Timings, fade_in_out, stream_chunks

__all__ = ["CosyVoice2", "Prompt", "StreamSchedule", "Timings", "fade_in_out", "load"]

ENDOFPROMPT = "<|endofprompt|>"
WEIGHT_FILES = (
    "llm.safetensors",
    "flow.safetensors",
    "hift.safetensors",
    "campplus.safetensors",
    "speech_tokenizer.safetensors",
)


def source_noise_key(seed: int) -> mx.array:
    """The key of HiFT's source noise for a request seed (independent of the LLM's draws)."""
    return mx.random.key(seed + 1_000_003)


class ModelDirError(CosyVoiceError):
    """The MLX model dir is missing, incomplete, of another model or of another format version."""


@dataclass
class Prompt:
    """The prompt side of a request (the official frontend's `model_input` minus the target text)."""

    embedding: mx.array  # (1, 192)
    prompt_text: mx.array  # (1, n) int32 text tokens for the LLM (transcript or instruction)
    llm_speech_token: (
        mx.array
    )  # (1, m) prompt speech tokens for the LLM (empty: cross-lingual, instruct2)
    flow_speech_token: mx.array  # (1, m) prompt speech tokens for the flow
    speech_feat: mx.array  # (1, 2m, 80) prompt mel for the flow


def _empty_tokens() -> mx.array:
    return mx.zeros((1, 0), dtype=mx.int32)


def interpolate_linear(x: mx.array, size: int) -> mx.array:
    """`F.interpolate(x, size, mode='linear', align_corners=False)` over the last axis of (B, C, T)."""
    t = x.shape[-1]
    pos = (mx.arange(size, dtype=mx.float32) + 0.5) * (t / size) - 0.5
    pos = mx.clip(pos, 0, t - 1)
    lo = mx.floor(pos).astype(mx.int32)
    hi = mx.minimum(lo + 1, t - 1)
    w = pos - lo.astype(mx.float32)
    return x[..., lo] * (1 - w) + x[..., hi] * w


class CosyVoice2:
    """A loaded CosyVoice2 model (see `load`)."""

    def __init__(
        self,
        config: ModelConfig,
        llm: Any,
        flow: Any,
        hift: Any,
        campplus: Any,
        speech_tokenizer: Any,
        frontend: Any,
        path: Path | None = None,
        meta: dict[str, Any] | None = None,
    ):
        self.config = config
        self.llm, self.flow, self.hift = llm, flow, hift
        self.campplus, self.speech_tokenizer = campplus, speech_tokenizer
        self.frontend = frontend
        self.path = path
        self.meta = meta or {}
        self.sample_rate = config.sample_rate
        self.speakers = SpeakerStore(path / "speakers") if path is not None else None
        self._prefixes: dict[str, Any] = {}
        self._flow_states: dict[tuple[str, int], Any] = {}  # saved speakers' prompt flow states

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        path: str | Path,
        llm_dtype: str | None = None,
        llm_bits: int | None = None,
        group_size: int = 64,
        text_backend: str = "auto",
        llm_kernels: str = "auto",
    ) -> CosyVoice2:
        """Load an MLX model dir written by `cosyvoice2 convert`.

        `llm_dtype`/`llm_bits` change the speech LM's precision at load time (from a
        float dir); the dir's own setting is used otherwise. `llm_kernels="auto"`
        runs the speech LM's decoder layers (and its bf16 or 8-bit projections) on
        the optional CPU kernels when they are installed (`cosyvoice2.fastlinear`;
        `COSYVOICE2_KERNELS=0` disables them); `"off"` keeps MLX's own ops.
        `meta["llm_kernels"]` records what is used.
        """
        from cosyvoice2 import llm as llm_mod
        from cosyvoice2.convert import FORMAT_VERSION, MODEL_TYPE
        from cosyvoice2.flow.flow import CausalMaskedDiffWithXvec
        from cosyvoice2.frontend.campplus import CAMPPlus, CAMPPlusConfig
        from cosyvoice2.frontend.speech_tokenizer import SpeechTokenizerConfig, SpeechTokenizerV2
        from cosyvoice2.frontend.text import TextFrontend
        from cosyvoice2.frontend.tokenizer import QwenTokenizer
        from cosyvoice2.hift import HiFTGenerator

        path = Path(path)
        if not path.is_dir():
            raise ModelDirError(f"model dir not found: {path}")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelDirError(f"{path}: no config.json (not an MLX model dir; convert it first)")
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelDirError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("model_type") != MODEL_TYPE:
            raise ModelDirError(
                f"{cfg_path}: model_type is {meta.get('model_type')!r}, not {MODEL_TYPE!r}"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise ModelDirError(
                f"{cfg_path}: format version {meta.get('format_version')!r}, this package reads {FORMAT_VERSION}"
            )
        missing = [f for f in WEIGHT_FILES if not (path / f).is_file()]
        if missing:
            raise ModelDirError(f"{path}: missing {', '.join(missing)}")
        config = ModelConfig.from_dict(meta)

        def weights(name: str) -> dict[str, mx.array]:
            try:
                return mx.load(str(path / name))
            except Exception as e:  # truncated or corrupt safetensors
                raise ModelDirError(f"{path / name}: cannot read ({e})") from None

        def load_into(model: Any, name: str) -> Any:
            try:
                model.load_weights(list(weights(name).items()), strict=True)
            except ValueError as e:
                raise ModelDirError(f"{path / name}: does not match config.json ({e})") from None
            return model

        record = meta.get("llm_precision", {"dtype": "float32"})
        try:
            llm = llm_mod.Qwen2LM.from_weights(
                config.llm, weights("llm.safetensors"), quantization=record.get("quantization")
            )
        except ValueError as e:
            raise ModelDirError(
                f"{path / 'llm.safetensors'}: does not match config.json ({e})"
            ) from None
        if llm_dtype is not None or llm_bits is not None:
            if record.get("quantization"):
                raise ModelDirError(
                    f"{path}: the speech LM is already quantised; convert a float dir"
                )
            if llm_dtype is not None:
                llm_mod.cast(llm, llm_dtype)
                record = {"dtype": llm_dtype}
            if llm_bits is not None:
                record = {
                    **record,
                    "quantization": llm_mod.quantize(llm, bits=llm_bits, group_size=group_size),
                }
        if llm_kernels not in ("auto", "off"):
            raise ValueError(f"llm_kernels must be 'auto' or 'off', got {llm_kernels!r}")
        kernels = "off"
        if llm_kernels == "auto":
            from cosyvoice2 import fastlinear

            if fastlinear.use_kernels(llm):
                kernels = fastlinear.describe()
        meta = {**meta, "llm_precision": record, "llm_kernels": kernels}
        flow = load_into(CausalMaskedDiffWithXvec(config.flow), "flow.safetensors")
        hift = load_into(HiFTGenerator(config.hift), "hift.safetensors")
        campplus = load_into(
            CAMPPlus(CAMPPlusConfig.from_dict(meta["campplus"])), "campplus.safetensors"
        )
        tokenizer_model = load_into(
            SpeechTokenizerV2(SpeechTokenizerConfig.from_dict(meta["speech_tokenizer"])),
            "speech_tokenizer.safetensors",
        )
        mx.eval(
            flow.parameters(),
            hift.parameters(),
            campplus.parameters(),
            tokenizer_model.parameters(),
        )
        try:
            tokenizer = QwenTokenizer.from_dir(path / "tokenizer")
        except (OSError, ValueError) as e:
            raise ModelDirError(f"{path / 'tokenizer'}: cannot load the tokenizer ({e})") from None
        frontend = TextFrontend(tokenizer, backend=text_backend)
        return cls(
            config, llm, flow, hift, campplus, tokenizer_model, frontend, path=path, meta=meta
        )

    @property
    def weights_label(self) -> str:
        """`synthetic` or `real`: synthetic weights are labelled in every result."""
        return self.meta.get("weights", "real")

    # ------------------------------------------------------------------ frontend

    def _text_tokens(self, text: str) -> mx.array:
        return mx.array([self.frontend.text_tokens(text)], dtype=mx.int32).reshape(1, -1)

    def _prompt_audio(
        self, prompt_wav: str | Path | tuple[np.ndarray, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(16 kHz, 24 kHz) mono float32 of a prompt (path, or (samples, rate)), checked."""
        from cosyvoice2.frontend.audio import check_prompt, load_prompt_wav, read_audio, resample

        if isinstance(prompt_wav, tuple):
            samples, sr = prompt_wav
            samples = np.asarray(samples, dtype=np.float32)
            if samples.ndim == 2:  # (channels, samples) or (samples, channels): mix down
                samples = samples.mean(axis=0 if samples.shape[0] < samples.shape[1] else 1)
            check_prompt(samples, int(sr))
            return resample(samples, int(sr), 16000), resample(samples, int(sr), self.sample_rate)
        speech_16k = load_prompt_wav(prompt_wav, 16000)
        raw, sr = read_audio(prompt_wav)
        return speech_16k, resample(raw, sr, self.sample_rate)

    def speech_tokens(self, speech_16k: np.ndarray) -> mx.array:
        """Prompt speech tokens (1, T) at 25 Hz (S3 tokenizer v2)."""
        from cosyvoice2.frontend.speech_tokenizer import speech_tokens

        return speech_tokens(self.speech_tokenizer, speech_16k).astype(mx.int32)

    def prompt_from_wav(
        self,
        prompt_wav: str | Path | tuple[np.ndarray, int],
        prompt_text: str = "",
        align: bool = True,
    ) -> Prompt:
        """The official `frontend_zero_shot` prompt side: tokens, mel, x-vector.

        `align`: cut the mel and the tokens to 2 mel frames per token, as the official
        `frontend_zero_shot` does; its `frontend_vc` does not (`align=False`), and the
        flow then takes the prompt mel as it is (one frame more or less than 2 per token).
        """
        from cosyvoice2.frontend.campplus import speaker_embedding
        from cosyvoice2.frontend.features import mel_spectrogram

        speech_16k, speech_24k = self._prompt_audio(prompt_wav)
        feat = mel_spectrogram(speech_24k[None]).transpose(0, 2, 1)  # (1, T, 80)
        tokens = self.speech_tokens(speech_16k)
        if align:
            n = min(feat.shape[1] // 2, tokens.shape[1])
            feat, tokens = feat[:, : 2 * n], tokens[:, :n]
        text = self._text_tokens(prompt_text) if prompt_text else _empty_tokens()
        return Prompt(
            embedding=speaker_embedding(self.campplus, speech_16k),
            prompt_text=text,
            llm_speech_token=tokens,
            flow_speech_token=tokens,
            speech_feat=feat,
        )

    def _speaker_prompt(self, spk_id: str) -> tuple[Prompt, Speaker]:
        if self.speakers is None:
            raise InputError("this model has no speaker store")
        spk = self.speakers.load(spk_id)
        return (
            Prompt(
                spk.embedding, spk.prompt_text, spk.speech_token, spk.speech_token, spk.speech_feat
            ),
            spk,
        )

    # ------------------------------------------------------------------ speakers

    def add_zero_shot_spk(
        self, prompt_text: str, prompt_wav: str | Path, zero_shot_spk_id: str
    ) -> bool:
        """Compute a prompt once and save it as a speaker (official `add_zero_shot_spk` + `save_spkinfo`)."""
        if not isinstance(zero_shot_spk_id, str) or not zero_shot_spk_id.strip():
            raise InputError("speaker id is empty")
        if self.speakers is None:
            raise InputError("this model has no speaker store")
        text = self.frontend.normalize_prompt_text(prompt_text)
        p = self.prompt_from_wav(prompt_wav, text)
        self.speakers.save(
            Speaker(
                zero_shot_spk_id,
                p.embedding,
                p.prompt_text,
                p.flow_speech_token,
                p.speech_feat,
                text,
            )
        )
        self._prefixes.pop(zero_shot_spk_id, None)
        for k in [k for k in self._flow_states if k[0] == zero_shot_spk_id]:
            del self._flow_states[k]
        return True

    def prepare_speaker(self, zero_shot_spk_id: str, n_timesteps: int = 10) -> None:
        """Compute a saved speaker's LLM prompt prefix and streaming flow prompt state now.

        Why: both are otherwise computed by the speaker's first request, which then
        pays for them in its first-chunk latency (the flow state of a prompt is a whole
        flow pass over the prompt's frames, a large part of a cold first chunk). A
        server calls this once per speaker after loading. The flow state is kept per
        `n_timesteps` (it depends on the steps), in memory only (keys and values of
        every estimator block and step, `cosyvoice2.flow.cache`: too large to save
        with the speaker).
        """
        prompt, _ = self._speaker_prompt(zero_shot_spk_id)
        self._llm_prefix(zero_shot_spk_id, prompt)
        if prompt.flow_speech_token.shape[1]:
            self.flow_prompt_state(prompt, n_timesteps, zero_shot_spk_id)

    def list_available_spks(self) -> list[str]:
        return self.speakers.list() if self.speakers is not None else []

    # ------------------------------------------------------------------ the modes

    def inference_zero_shot(
        self,
        tts_text: str,
        prompt_text: str,
        prompt_wav: str | Path | tuple[np.ndarray, int] | None,
        zero_shot_spk_id: str = "",
        stream: bool = False,
        speed: float = 1.0,
        text_frontend: bool = True,
        **options: Any,
    ) -> Iterator[dict[str, mx.array]]:
        """Clone the voice of a prompt (wav + its transcript), or of a saved speaker.

        `tts_text` may also be an iterable of text pieces (e.g. an LLM reply as it
        is generated): it then goes through `inference_bistream`, like the official
        CosyVoice2 given a generator.
        """
        if not isinstance(tts_text, str):
            yield from self.inference_bistream(
                tts_text, prompt_text, prompt_wav, zero_shot_spk_id, stream, text_frontend,
                **options,
            )  # fmt: skip
            return
        if zero_shot_spk_id:
            prompt, _ = self._speaker_prompt(zero_shot_spk_id)
            prefix_id = zero_shot_spk_id
        else:
            text = self.frontend.normalize_prompt_text(prompt_text, text_frontend)
            prompt = self.prompt_from_wav(self._need_wav(prompt_wav), text)
            prefix_id = None
        yield from self._synthesise(
            tts_text,
            prompt,
            stream,
            speed,
            text_frontend,
            prefix_id=prefix_id,
            spk_id=prefix_id,
            **options,
        )

    def inference_bistream(
        self,
        text: Iterable[str],
        prompt_text: str = "",
        prompt_wav: str | Path | tuple[np.ndarray, int] | None = None,
        zero_shot_spk_id: str = "",
        stream: bool = True,
        text_frontend: bool = True,
        **options: Any,
    ) -> Iterator[dict[str, mx.array]]:
        """Text in as a stream, audio out as a stream (zero-shot voice).

        `text` yields pieces of any size; they are normalised incrementally (whole
        sentences, as soon as their end is certain: `frontend.text.normalize_stream`),
        tokenised and fed to `Qwen2LM.inference_bistream`, whose speech tokens go to
        the streaming token2wav as they are sampled: audio chunks come out while
        text still arrives. Options as the other modes (`seed`, `sampling`,
        `n_timesteps`, `schedule`, `timings`, `max_token_text_ratio`, `max_tokens`).
        """
        if zero_shot_spk_id:
            prompt, _ = self._speaker_prompt(zero_shot_spk_id)
        else:
            norm = self.frontend.normalize_prompt_text(prompt_text, text_frontend)
            prompt = self.prompt_from_wav(self._need_wav(prompt_wav), norm)
        seed = int(options.pop("seed", 0))
        tokens = self.bistream_token_stream(text, prompt, text_frontend, seed=seed, **options)
        yield from self.token2wav_stream(
            tokens, prompt, stream, 1.0, seed=seed, spk_id=zero_shot_spk_id or None, **options
        )

    def bistream_token_stream(
        self,
        text: Iterable[str],
        prompt: Prompt,
        text_frontend: bool = True,
        seed: int = 0,
        sampling: Any = None,
        max_token_text_ratio: float = 20,
        max_tokens: int | None = None,
        timings: Timings | None = None,
        **_: Any,
    ) -> Iterator[int]:
        """Speech tokens while text pieces arrive (see `inference_bistream`)."""
        from cosyvoice2.frontend.text import normalize_stream

        if isinstance(text, str):
            text = [text]

        def text_tokens() -> Iterator[list[int]]:
            for sentence in normalize_stream(self.frontend, text, text_frontend):
                ids = self.frontend.text_tokens(sentence)
                if ids:
                    if timings is not None:
                        timings.mark("text", tokens=len(ids))
                    yield ids

        key = mx.random.key(seed)
        mx.eval(key, prompt.prompt_text, prompt.llm_speech_token)  # may be pulled by another thread
        return self.llm.inference_bistream(
            text_tokens(),
            prompt.prompt_text,
            prompt.llm_speech_token,
            sampling=sampling,
            max_token_text_ratio=max_token_text_ratio,
            key=key,
            max_tokens=max_tokens,
        )

    def inference_cross_lingual(
        self,
        tts_text: str,
        prompt_wav: str | Path | tuple[np.ndarray, int] | None,
        zero_shot_spk_id: str = "",
        stream: bool = False,
        speed: float = 1.0,
        text_frontend: bool = True,
        **options: Any,
    ) -> Iterator[dict[str, mx.array]]:
        """The prompt's voice without its transcript: the LLM sees no prompt text or prompt tokens."""
        prompt = (
            self._speaker_prompt(zero_shot_spk_id)[0]
            if zero_shot_spk_id
            else self.prompt_from_wav(self._need_wav(prompt_wav))
        )
        prompt.prompt_text, prompt.llm_speech_token = _empty_tokens(), _empty_tokens()
        yield from self._synthesise(tts_text, prompt, stream, speed, text_frontend, **options)

    def inference_instruct2(
        self,
        tts_text: str,
        instruct_text: str,
        prompt_wav: str | Path | tuple[np.ndarray, int] | None,
        zero_shot_spk_id: str = "",
        stream: bool = False,
        speed: float = 1.0,
        text_frontend: bool = True,
        **options: Any,
    ) -> Iterator[dict[str, mx.array]]:
        """Speak in the prompt's voice following an instruction (`... <|endofprompt|>`).

        As in the official examples the instruction ends with `<|endofprompt|>`; it is
        appended when missing. The LLM sees the instruction instead of a transcript and
        no prompt speech tokens.
        """
        if not isinstance(instruct_text, str) or not instruct_text.strip():
            raise InputError("instruct text is empty")
        if ENDOFPROMPT not in instruct_text:
            instruct_text = instruct_text + ENDOFPROMPT
        prompt = (
            self._speaker_prompt(zero_shot_spk_id)[0]
            if zero_shot_spk_id
            else self.prompt_from_wav(self._need_wav(prompt_wav))
        )
        prompt.prompt_text = self._text_tokens(instruct_text)
        prompt.llm_speech_token = _empty_tokens()
        yield from self._synthesise(tts_text, prompt, stream, speed, text_frontend, **options)

    def inference_sft(
        self,
        tts_text: str,
        spk_id: str,
        stream: bool = False,
        speed: float = 1.0,
        text_frontend: bool = True,
        **options: Any,
    ) -> Iterator[dict[str, mx.array]]:
        """A saved speaker as the official SFT mode uses it: its x-vector only (no prompt tokens or mel)."""
        prompt, _ = self._speaker_prompt(spk_id)
        prompt = Prompt(
            prompt.embedding,
            _empty_tokens(),
            _empty_tokens(),
            _empty_tokens(),
            mx.zeros((1, 0, 80)),
        )
        yield from self._synthesise(tts_text, prompt, stream, speed, text_frontend, **options)

    def inference_vc(
        self,
        source_wav: str | Path | tuple[np.ndarray, int],
        prompt_wav: str | Path | tuple[np.ndarray, int],
        stream: bool = False,
        speed: float = 1.0,
        **options: Any,
    ) -> Iterator[dict[str, mx.array]]:
        """Voice conversion: the source's speech tokens rendered in the prompt's voice."""
        from cosyvoice2.frontend.audio import load_wav, resample

        prompt = self.prompt_from_wav(prompt_wav, align=False)  # as the official `frontend_vc`
        if isinstance(source_wav, tuple):
            src = resample(
                np.asarray(source_wav[0], dtype=np.float32).reshape(-1), int(source_wav[1]), 16000
            )
        else:
            src = load_wav(source_wav, 16000)
        if src.shape[-1] / 16000 > 30:
            raise InputError(
                f"source audio is too long: {src.shape[-1] / 16000:.1f} s (at most 30 s)"
            )
        tokens = [int(t) for t in np.asarray(self.speech_tokens(src)).reshape(-1)]
        yield from self.token2wav_stream(iter(tokens), prompt, stream, speed, **options)

    def generate(
        self,
        text: str,
        ref_audio: str | Path | tuple[np.ndarray, int] | None = None,
        ref_text: str | None = None,
        speaker: str | None = None,
        instruct: str | None = None,
        **options: Any,
    ) -> np.ndarray:
        """Synthesise `text` in one call and return the whole waveform (float32, 24 kHz).

        Picks the mode from what is given: `instruct` -> instruct2, `ref_text` ->
        zero-shot, `ref_audio` only -> cross-lingual, `speaker` -> saved speaker.
        """
        if instruct is not None:
            it = self.inference_instruct2(text, instruct, ref_audio, speaker or "", **options)
        elif speaker is not None and ref_audio is None:
            it = self.inference_zero_shot(text, "", None, speaker, **options)
        elif ref_audio is not None and ref_text:
            it = self.inference_zero_shot(text, ref_text, ref_audio, **options)
        elif ref_audio is not None:
            it = self.inference_cross_lingual(text, ref_audio, **options)
        else:
            raise InputError("give ref_audio (with ref_text for zero-shot), speaker or instruct")
        parts = [np.asarray(out["tts_speech"]).reshape(-1) for out in it]
        return np.concatenate(parts).astype(np.float32)

    # ------------------------------------------------------------------ the pipeline

    @staticmethod
    def _need_wav(prompt_wav: Any) -> Any:
        if prompt_wav is None or prompt_wav == "":
            raise InputError("prompt audio is required (or a saved speaker id)")
        return prompt_wav

    def _segments(self, tts_text: str | Iterable[str], text_frontend: bool) -> list[str]:
        return self.frontend.normalize_tts_text(tts_text, text_frontend)

    def _synthesise(
        self,
        tts_text: str,
        prompt: Prompt,
        stream: bool,
        speed: float,
        text_frontend: bool,
        prefix_id: str | None = None,
        spk_id: str | None = None,
        **options: Any,
    ) -> Iterator[dict[str, mx.array]]:
        segments = self._segments(tts_text, text_frontend)
        progress = options.pop("progress", None)
        seed = int(options.pop("seed", 0))
        for i, segment in enumerate(segments):
            if progress is not None:
                progress(i, len(segments), segment)
            tokens = self.speech_token_stream(
                self._text_tokens(segment), prompt, seed=seed + i, prefix_id=prefix_id, **options
            )
            yield from self.token2wav_stream(
                tokens, prompt, stream, speed, seed=seed + i, spk_id=spk_id, **options
            )

    def _llm_prefix(self, spk_id: str, prompt: Prompt) -> Any:
        """The saved speaker's LLM prompt prefix (`Qwen2LM.make_prefix`), computed once and
        kept; None when the prompt has no text."""
        if not prompt.prompt_text.shape[1]:
            return None
        prefix = self._prefixes.get(spk_id)
        if prefix is None:
            prefix = self._prefixes[spk_id] = self.llm.make_prefix(prompt.prompt_text)
        return prefix

    def speech_token_stream(
        self,
        text: mx.array,
        prompt: Prompt,
        seed: int = 0,
        prefix_id: str | None = None,
        sampling: Any = None,
        max_token_text_ratio: float = 20,
        min_token_text_ratio: float = 2,
        **_: Any,
    ) -> Iterator[int]:
        """Speech tokens of one text segment, as the LLM samples them."""
        prefix = self._llm_prefix(prefix_id, prompt) if prefix_id is not None else None
        key = mx.random.key(seed)
        # the generator may be pulled by another thread (`streaming.prefetch`): no lazy inputs
        mx.eval(key, text, prompt.prompt_text, prompt.llm_speech_token)
        return self.llm.inference(
            text,
            None if prefix is not None else prompt.prompt_text,
            prompt.llm_speech_token,
            sampling=sampling,
            max_token_text_ratio=max_token_text_ratio,
            min_token_text_ratio=min_token_text_ratio,
            key=key,
            prefix=prefix,
        )

    def token2mel(
        self,
        tokens: mx.array,
        prompt: Prompt,
        n_timesteps: int = 10,
        streaming: bool = False,
        finalize: bool = True,
        start: int = 0,
        cache: Any = None,
        advance_only: bool = False,
    ) -> mx.array:
        """Mel (1, 80, T) of `tokens` (1, N) after the prompt (official `flow.inference`), from frame `start`.

        `cache`: a `streaming.FlowCursor`; the frames are then computed by the O(n)
        streaming flow from its committed state (same values as the recompute).
        `advance_only` (with `cache`): commit the whole blocks these tokens complete
        (`FlowCursor.advance`) and return no frames, `(1, 80, 0)`.
        """
        if cache is not None:
            if not streaming:
                raise ValueError("the flow cache is for the streaming (chunk-masked) flow")
            if advance_only:
                cache.advance(tokens)
                return mx.zeros((1, self.config.flow.output_size, 0))
            return cache.mel(tokens, finalize, start)
        mel = self.flow.inference(
            token=tokens,
            prompt_token=prompt.flow_speech_token,
            prompt_feat=prompt.speech_feat,
            embedding=prompt.embedding,
            streaming=streaming,
            finalize=finalize,
            n_timesteps=n_timesteps,
        )
        return mel.transpose(0, 2, 1)[:, :, start:]

    def flow_prompt_state(self, prompt: Prompt, n_timesteps: int, spk_id: str | None = None) -> Any:
        """The streaming flow's committed prompt state (`flow.cache.prompt_state`), kept per saved speaker."""
        from cosyvoice2.flow.cache import prompt_state

        if spk_id is None:
            return prompt_state(
                self.flow,
                prompt.flow_speech_token,
                prompt.speech_feat,
                prompt.embedding,
                n_timesteps,
            )
        key = (spk_id, n_timesteps)
        state = self._flow_states.get(key)
        if state is None:
            state = self._flow_states[key] = self.flow_prompt_state(prompt, n_timesteps)
        return state

    def token2wav_stream(
        self,
        tokens: Iterator[int],
        prompt: Prompt,
        stream: bool,
        speed: float,
        seed: int = 0,
        n_timesteps: int = 10,
        schedule: StreamSchedule | None = None,
        timings: Timings | None = None,
        spk_id: str | None = None,
        **_: Any,
    ) -> Iterator[dict[str, mx.array]]:
        """Tokens -> audio, whole (stream=False) or in chunks (see `cosyvoice2.streaming`).

        `schedule`: the streaming schedule (official by default); `timings`: a
        `streaming.Timings` that records first token / mel / audio times per chunk;
        `spk_id`: a saved speaker whose prompt flow state is kept in memory.
        """
        if not (0.25 <= speed <= 4.0):
            raise InputError(f"speed must be between 0.25 and 4, got {speed}")
        key = source_noise_key(seed)  # HiFT's source noise (independent of the LLM's draws)
        if not stream:
            all_tokens = list(tokens)
            if not all_tokens:
                raise CosyVoiceError("the speech LM produced no speech tokens")
            if timings is not None:
                timings.mark("first_token")
            mel = self.token2mel(mx.array([all_tokens], dtype=mx.int32), prompt, n_timesteps)
            if speed != 1.0:
                mel = interpolate_linear(mel, int(mel.shape[2] / speed))
            if timings is not None:
                mx.eval(mel)
                timings.mark("mel", chunk=0, frames=mel.shape[2])
            speech, _ = self.hift.inference(mel, key=key)
            mx.eval(speech)
            if timings is not None:
                timings.mark("audio", chunk=0, samples=speech.shape[1])
            yield {"tts_speech": speech}
            return
        if speed != 1.0:
            raise InputError(
                "speed change is only supported without streaming (as the official code)"
            )
        sched = schedule or StreamSchedule()
        state = None
        if sched.flow_cache and spk_id is not None and prompt.flow_speech_token.shape[1]:
            state = self.flow_prompt_state(prompt, n_timesteps, spk_id)
        yield from stream_chunks(self, tokens, prompt, n_timesteps, key, sched, state, timings)

    _token2wav_stream = token2wav_stream


def load(path: str | Path, **kwargs: Any) -> CosyVoice2:
    """Load an MLX model dir (see `CosyVoice2.load`)."""
    return CosyVoice2.load(path, **kwargs)
