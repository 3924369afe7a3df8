"""CosyVoice2 in MLX: load a converted model dir and synthesise in every official mode.

The official `CosyVoice2` (cli/cosyvoice.py), its frontend and `CosyVoice2Model`
(cli/model.py) in one object without their side effects: no threads polling a
token list, no per-request state keyed by uuid on the model, no reseeding. A
request is a pipeline of generators: text segments -> speech tokens (LLM) ->
mel (flow) -> waveform (HiFT). The modes here build the prompt and the LLM's
inputs and run the LLM; the engine (`cosyvoice2.engine`) turns the speech tokens
into audio. Every random draw comes from the request's `seed`, so the same seed
gives the same audio. Keyword options are `cosyvoice2.options.SynthesisOptions`
fields; an unknown one raises `OptionError`.

Each mode yields `{"tts_speech": mx.array (1, samples)}` at 24 kHz, one item
per text segment (or per chunk with `stream=True`), like the official generators.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from cosyvoice2 import backend, model_dir
from cosyvoice2.config import ModelConfig
from cosyvoice2.engine import Engine, Prompt, source_noise_key
from cosyvoice2.errors import InputError
from cosyvoice2.files import recover_dir
from cosyvoice2.flow.quantize import (
    BF16_BITS,
    check_flow_quantization,
    flow_precision,
    quantize_flow,
)
from cosyvoice2.model_dir import ModelDirError as ModelDirError  # raised by `load`
from cosyvoice2.options import OptionError, SynthesisOptions
from cosyvoice2.speakers import Speaker
from cosyvoice2.streaming import StreamSchedule, Timings, fade_in_out

__all__ = [
    "CosyVoice2",
    "OptionError",
    "Prompt",
    "StreamSchedule",
    "SynthesisOptions",
    "Timings",
    "fade_in_out",
    "load",
    "source_noise_key",
]

ENDOFPROMPT = "<|endofprompt|>"


def _on_backend(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a model method, and every step of the generator it returns, on the model's backend."""

    @functools.wraps(method)
    def run(self: CosyVoice2, *args: Any, **kwargs: Any) -> Any:
        with backend.active(self.backend):
            out = method(self, *args, **kwargs)
        return backend.iterate(self.backend, out) if inspect.isgenerator(out) else out

    return run


def _empty_tokens() -> mx.array:
    return mx.zeros((1, 0), dtype=mx.int32)


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
        on: backend.Backend | None = None,
    ):
        self.config = config
        # the kernels every call runs on, chosen once (`cosyvoice2.backend`)
        self.backend = on or backend.current()
        self.llm = llm
        self.engine = Engine(flow, hift)  # tokens -> audio; keeps saved speakers' flow states
        # the prompt side: `model_dir.Deferred` until a new prompt wav needs it
        self._campplus, self._speech_tokenizer = campplus, speech_tokenizer
        self.frontend = frontend
        self.path = path
        self.meta = meta or {}
        self.sample_rate = config.sample_rate
        self.speakers = model_dir.speaker_store(path) if path is not None else None
        self._prefixes: dict[str, Any] = {}  # saved speakers' LLM prompt prefixes

    @property
    def campplus(self) -> Any:
        """The CAM++ speaker encoder, its weights read on first use (`model_dir.Deferred`)."""
        return model_dir.ready(self._campplus)

    @property
    def speech_tokenizer(self) -> Any:
        """The S3 speech tokenizer v2, its weights read on first use (`model_dir.Deferred`)."""
        return model_dir.ready(self._speech_tokenizer)

    @property
    def flow(self) -> Any:
        """The flow (`CausalMaskedDiffWithXvec`), held by the engine."""
        return self.engine.flow

    @property
    def hift(self) -> Any:
        """HiFT (`HiFTGenerator`), held by the engine."""
        return self.engine.hift

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
        route: str | None = None,
        revision: str | None = None,
        flow_bits: int | None = None,
        flow_group_size: int = 64,
        inference_cfg_rate: float | None = None,
        flow_dtype: str | None = None,
    ) -> CosyVoice2:
        """Load an MLX model dir written by `cosyvoice2 convert` (format: `cosyvoice2.model_dir`).

        `path` may also be a Hugging Face hub id (`owner/name`, at `revision`): an MLX
        model dir repo is downloaded, an official CosyVoice2 repo downloaded and
        converted once, both into the hub cache (`cosyvoice2.hub.resolve`). A local
        path is used as is and never imports huggingface_hub.

        `llm_dtype`/`llm_bits` change the speech LM's precision at load time (from a
        float dir); the dir's own setting is used otherwise. The compute backend is
        chosen here, once (`cosyvoice2.backend.choose`: the fastest route available,
        or `route`: `extension`, `plain` or `composed`). `llm_kernels="auto"` runs the
        speech LM's decoder layers (and its bf16 or 8-bit projections) on the optional
        CPU kernels when the backend has them (`cosyvoice2.kernel_layers`;
        `COSYVOICE2_KERNELS=0` disables them); `"off"` keeps MLX's own ops.
        `meta["llm_kernels"]` records what is used, `meta["backend"]` the route.

        `flow_bits` (8 or 4) quantises the flow's `nn.Linear` layers (encoder and CFM
        estimator) with MLX's `nn.quantize` at `flow_group_size` (32, 64 or 128) once its
        weights are loaded (`cosyvoice2.flow.quantize`): a layer whose input dimension
        is not a multiple of `flow_group_size` stays float; embeddings, convolutions and
        HiFT stay float. `flow_bits=16` instead holds the CFM estimator's transformer-block
        projections in bfloat16, multiplied (and their attention's products computed) with
        operands rounded to bfloat16 and float32 sums (AMX or AVX-512 BF16 on CPUs that
        have them; `cosyvoice2.flow.quantize.bf16_linears`).
        `inference_cfg_rate` (a finite float >= 0) replaces the CFM's
        classifier-free guidance rate (the config's, 0.7 in the released model) for this
        model. `flow_dtype` (`float32`, `bfloat16` or `float16`) holds the flow and HiFT in
        that dtype, cast tensor by tensor as they are read (never the whole float32 flow in
        memory), before any `flow_bits` quantisation. `meta["flow_precision"]` records what load applied (`flow_precision`
        describes the flow as it is now), `meta["inference_cfg_rate"]` the rate in use.
        """
        if llm_kernels not in ("auto", "off"):
            raise ValueError(f"llm_kernels must be 'auto' or 'off', got {llm_kernels!r}")
        _check_flow_options(flow_bits, flow_group_size, inference_cfg_rate)
        if flow_dtype is not None and flow_dtype not in FLOW_DTYPES:
            raise OptionError(
                f"flow_dtype must be one of {', '.join(FLOW_DTYPES)}, got {flow_dtype!r}",
                "flow_dtype",
            )
        if flow_bits == BF16_BITS and flow_dtype not in (None, "float32"):
            raise OptionError(
                f"flow_bits 16 (bf16 products in a float32 flow) needs flow_dtype float32, "
                f"got {flow_dtype!r}",
                "flow_bits",
            )
        from cosyvoice2.hub import resolve

        path = resolve(path, revision)
        on = backend.choose(route)
        recover_dir(path)  # a dir a killed `convert` left mid-swap comes back whole
        meta, config = model_dir.read_config(path)
        llm, precision = model_dir.load_llm(path, meta, config, llm_dtype, llm_bits, group_size)
        kernels = "off"
        if llm_kernels == "auto":
            from cosyvoice2 import kernel_layers

            if kernel_layers.use_kernels(llm, on):
                kernels = on.describe()
        flow = model_dir.load_flow(path, config)
        if inference_cfg_rate is not None:
            flow.decoder.config = dataclasses.replace(
                flow.decoder.config, inference_cfg_rate=float(inference_cfg_rate)
            )
        if flow_dtype is not None:  # cast while read: each tensor read, cast, then dropped
            flow.set_dtype(getattr(mx, flow_dtype))
        flow_record = None
        if flow_bits is not None:
            flow_record = quantize_flow(flow, flow_bits, flow_group_size)
        hift = model_dir.load_hift(path, config)
        if flow_dtype is not None:
            hift.set_dtype(getattr(mx, flow_dtype))
        mx.eval(flow.parameters(), hift.parameters())
        with backend.active(on):  # the forms this backend's calls read: made once, not copied
            flow.pack_weights()  # (their weights are views of them now: not evaluated again)
            hift.pack_weights()
        campplus = model_dir.load_campplus(path, meta)
        speech_tokenizer = model_dir.load_speech_tokenizer(path, meta)
        frontend = model_dir.load_text_frontend(path, text_backend)
        meta = {
            **meta,
            "llm_precision": precision,
            "llm_kernels": kernels,
            "backend": on.route,
            "flow_precision": {**flow_precision(flow), "quantization": flow_record},
            "inference_cfg_rate": flow.decoder.config.inference_cfg_rate,
        }
        return cls(config, llm, flow, hift, campplus, speech_tokenizer, frontend, path, meta, on)

    @property
    def flow_precision(self) -> dict[str, Any]:
        """The flow's precision now (`cosyvoice2.flow.quantize.flow_precision`: dtype, bits,
        group size, quantised and float linear layers) and its CFG rate, for a caller to print."""
        return {
            **flow_precision(self.flow),
            "inference_cfg_rate": self.flow.decoder.config.inference_cfg_rate,
        }

    @property
    def weights_label(self) -> str:
        """`synthetic`, `real` or `unknown`: the `weights` the model dir's config records (the
        converter writes it), `unknown` when it records none or another value. Never assumed."""
        label = self.meta.get("weights")
        return label if label in ("synthetic", "real", "unknown") else "unknown"

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

    @_on_backend
    def speech_tokens(self, speech_16k: np.ndarray) -> mx.array:
        """Prompt speech tokens (1, T) at 25 Hz (S3 tokenizer v2)."""
        from cosyvoice2.frontend.speech_tokenizer import speech_tokens

        return speech_tokens(self.speech_tokenizer, speech_16k).astype(mx.int32)

    @_on_backend
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

    @_on_backend
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
        self.engine.forget(zero_shot_spk_id)
        return True

    @_on_backend
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
            self.engine.prompt_state(prompt, n_timesteps, zero_shot_spk_id)

    def list_available_spks(self) -> list[str]:
        return self.speakers.list() if self.speakers is not None else []

    # ------------------------------------------------------------------ the modes

    @_on_backend
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
        opts = SynthesisOptions.of(speed=speed, **options)
        if zero_shot_spk_id:
            prompt, _ = self._speaker_prompt(zero_shot_spk_id)
        else:
            text = self.frontend.normalize_prompt_text(prompt_text, text_frontend)
            prompt = self.prompt_from_wav(self._need_wav(prompt_wav), text)
        speaker = zero_shot_spk_id or None
        yield from self._synthesise(tts_text, prompt, stream, text_frontend, opts, speaker)

    @_on_backend
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
        the engine's stream as they are sampled: audio chunks come out while text
        still arrives. Options as the other modes (`progress` is not called: the
        segments are not known in advance).
        """
        opts = SynthesisOptions.of(**options)
        if zero_shot_spk_id:
            prompt, _ = self._speaker_prompt(zero_shot_spk_id)
        else:
            norm = self.frontend.normalize_prompt_text(prompt_text, text_frontend)
            prompt = self.prompt_from_wav(self._need_wav(prompt_wav), norm)
        tokens = self.bistream_token_stream(text, prompt, text_frontend, options=opts)
        yield from self.token2wav_stream(
            tokens, prompt, stream, opts.speed, spk_id=zero_shot_spk_id or None, options=opts
        )

    @_on_backend
    def bistream_token_stream(
        self,
        text: Iterable[str],
        prompt: Prompt,
        text_frontend: bool = True,
        options: SynthesisOptions | None = None,
        **kwargs: Any,
    ) -> Iterator[int]:
        """Speech tokens while text pieces arrive (see `inference_bistream`).

        `options` (or keyword options on top of it): `seed`, the sampling fields and
        `timings` (a `text` event per sentence).
        """
        from cosyvoice2.frontend.text import normalize_stream

        opts = SynthesisOptions.of(options, **kwargs)
        if isinstance(text, str):
            text = [text]

        def text_tokens() -> Iterator[list[int]]:
            for sentence in normalize_stream(self.frontend, text, text_frontend):
                ids = self.frontend.text_tokens(sentence)
                if ids:
                    if opts.timings is not None:
                        opts.timings.mark("text", tokens=len(ids))
                    yield ids

        key = mx.random.key(opts.seed)
        mx.eval(key, prompt.prompt_text, prompt.llm_speech_token)  # may be pulled by another thread
        return self.llm.inference_bistream(
            text_tokens(),
            prompt.prompt_text,
            prompt.llm_speech_token,
            sampling=opts.sampling,
            max_token_text_ratio=opts.max_token_text_ratio,
            key=key,
            max_tokens=opts.max_tokens,
        )

    @_on_backend
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
        opts = SynthesisOptions.of(speed=speed, **options)
        prompt = self._voice_prompt(prompt_wav, zero_shot_spk_id)
        prompt.prompt_text, prompt.llm_speech_token = _empty_tokens(), _empty_tokens()
        yield from self._synthesise(tts_text, prompt, stream, text_frontend, opts)

    @_on_backend
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
        opts = SynthesisOptions.of(speed=speed, **options)
        if not isinstance(instruct_text, str) or not instruct_text.strip():
            raise InputError("instruct text is empty")
        if ENDOFPROMPT not in instruct_text:
            instruct_text = instruct_text + ENDOFPROMPT
        prompt = self._voice_prompt(prompt_wav, zero_shot_spk_id)
        prompt.prompt_text = self._text_tokens(instruct_text)
        prompt.llm_speech_token = _empty_tokens()
        yield from self._synthesise(tts_text, prompt, stream, text_frontend, opts)

    @_on_backend
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
        opts = SynthesisOptions.of(speed=speed, **options)
        prompt, _ = self._speaker_prompt(spk_id)
        prompt = Prompt(
            prompt.embedding,
            _empty_tokens(),
            _empty_tokens(),
            _empty_tokens(),
            mx.zeros((1, 0, 80)),
        )
        yield from self._synthesise(tts_text, prompt, stream, text_frontend, opts)

    @_on_backend
    def inference_vc(
        self,
        source_wav: str | Path | tuple[np.ndarray, int],
        prompt_wav: str | Path | tuple[np.ndarray, int],
        stream: bool = False,
        speed: float = 1.0,
        **options: Any,
    ) -> Iterator[dict[str, mx.array]]:
        """Voice conversion: the source's speech tokens rendered in the prompt's voice (no LLM)."""
        from cosyvoice2.frontend.audio import load_wav, resample

        opts = SynthesisOptions.of(speed=speed, **options)
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
        yield from self.token2wav_stream(iter(tokens), prompt, stream, opts.speed, options=opts)

    @_on_backend
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
        `options`: the modes' `stream`, `speed`, `text_frontend` and the synthesis
        options (`SynthesisOptions`); an unknown one raises `OptionError`.
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

    def _voice_prompt(self, prompt_wav: Any, spk_id: str) -> Prompt:
        """The prompt of a saved speaker, or of a prompt wav without a transcript."""
        if spk_id:
            return self._speaker_prompt(spk_id)[0]
        return self.prompt_from_wav(self._need_wav(prompt_wav))

    def _segments(self, tts_text: str | Iterable[str], text_frontend: bool) -> list[str]:
        return self.frontend.normalize_tts_text(tts_text, text_frontend)

    def _synthesise(
        self,
        tts_text: str,
        prompt: Prompt,
        stream: bool,
        text_frontend: bool,
        options: SynthesisOptions,
        spk_id: str | None = None,
    ) -> Iterator[dict[str, mx.array]]:
        """Each text segment through the LLM (segment `i` seeded `seed + i`) and the engine.

        `spk_id`: the saved speaker the prompt is from; its LLM prefix and flow prompt
        state are kept.
        """
        segments = self._segments(tts_text, text_frontend)
        for i, segment in enumerate(segments):
            if options.progress is not None:
                options.progress(i, len(segments), segment)
            opts = dataclasses.replace(options, seed=options.seed + i)
            tokens = self.speech_token_stream(
                self._text_tokens(segment), prompt, prefix_id=spk_id, options=opts
            )
            yield from self.token2wav_stream(
                tokens, prompt, stream, opts.speed, spk_id=spk_id, options=opts
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

    @_on_backend
    def speech_token_stream(
        self,
        text: mx.array,
        prompt: Prompt,
        prefix_id: str | None = None,
        options: SynthesisOptions | None = None,
        **kwargs: Any,
    ) -> Iterator[int]:
        """Speech tokens of one text segment, as the LLM samples them.

        `prefix_id`: the saved speaker whose LLM prompt prefix is kept; `options` (or
        keyword options on top of it): `seed`, `sampling`, the token/text ratios and
        `max_tokens`.
        """
        opts = SynthesisOptions.of(options, **kwargs)
        prefix = self._llm_prefix(prefix_id, prompt) if prefix_id is not None else None
        key = mx.random.key(opts.seed)
        # the generator may be pulled by another thread (`streaming.prefetch`): no lazy inputs
        mx.eval(key, text, prompt.prompt_text, prompt.llm_speech_token)
        tokens = self.llm.inference(
            text,
            None if prefix is not None else prompt.prompt_text,
            prompt.llm_speech_token,
            sampling=opts.sampling,
            max_token_text_ratio=opts.max_token_text_ratio,
            min_token_text_ratio=opts.min_token_text_ratio,
            key=key,
            prefix=prefix,
        )
        return tokens if opts.max_tokens is None else _at_most(tokens, opts.max_tokens)

    @_on_backend
    def token2wav_stream(
        self,
        tokens: Iterator[int],
        prompt: Prompt,
        stream: bool,
        speed: float = 1.0,
        spk_id: str | None = None,
        options: SynthesisOptions | None = None,
        **kwargs: Any,
    ) -> Iterator[dict[str, mx.array]]:
        """Tokens -> audio by the engine, whole (stream=False) or in chunks (see `cosyvoice2.streaming`).

        `options` (or keyword options on top of it): `seed` (HiFT's source noise),
        `n_timesteps`, `schedule` (the streaming schedule, official by default),
        `timings` (a `streaming.TimingHook`); `spk_id`: a saved speaker whose prompt
        flow state is kept in memory.
        """
        opts = SynthesisOptions.of(options, speed=speed, **kwargs)
        yield from self.engine.audio(tokens, prompt, stream, opts, spk_id)


def _at_most(tokens: Iterator[int], n: int) -> Iterator[int]:
    """The first `n` items of `tokens`; the generator is closed after them."""
    try:
        for i, t in enumerate(tokens):
            if i >= n:
                return
            yield t
            if i + 1 == n:
                return
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()


FLOW_DTYPES = ("float32", "bfloat16", "float16")


def _check_flow_options(bits: Any, group_size: Any, cfg_rate: Any) -> None:
    """`flow_bits`, `flow_group_size` and `inference_cfg_rate` of `load`, before anything is
    read: an `OptionError` naming the argument."""
    if bits is not None:
        try:
            check_flow_quantization(bits, group_size)
        except InputError as e:
            raise OptionError(str(e), str(e).split(" ", 1)[0]) from None
    if cfg_rate is not None and (
        isinstance(cfg_rate, bool)
        or not isinstance(cfg_rate, numbers.Real)
        or not math.isfinite(cfg_rate)
        or cfg_rate < 0
    ):
        raise OptionError(
            f"inference_cfg_rate must be a finite number >= 0, got {cfg_rate!r}",
            "inference_cfg_rate",
        )


def load(path: str | Path, **kwargs: Any) -> CosyVoice2:
    """Load an MLX model dir (see `CosyVoice2.load`)."""
    return CosyVoice2.load(path, **kwargs)
