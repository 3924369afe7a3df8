"""The CosyVoice2 speech language model (`cosyvoice.llm.llm.Qwen2LM`) on mlx-lm's Qwen2.

Structure (parameter names as in the official `llm.pt`, so `sanitize` only
strips the Hugging Face wrapper prefix):

- `llm`: the Qwen2 backbone, `mlx_lm.models.qwen2.Qwen2Model` (imported, not
  copied). Only the inner model is used: the official code runs the whole
  `Qwen2ForCausalLM` and throws away its 151,936-word output layer, here it is
  never built. `llm.embed_tokens` is the text embedding.
- `llm_embedding`: 2 rows, sos (0) and task id (1).
- `speech_embedding`: 6561 speech tokens + 3 (eos 6561, 6562, fill 6563).
- `llm_decoder`: hidden -> 6564 speech-token logits.

Decoding input layout (as the official `inference`):
`[sos, prompt_text + text, task_id, prompt_speech_tokens]`, then one speech token
per step through a KV cache owned by the caller of the backbone
(`mlx_lm.models.cache.make_prompt_cache`). `min_len`/`max_len` are the target
text length times `min_token_text_ratio`/`max_token_text_ratio`.

Decoding rules: those of the latest upstream code, held by `TokenDecoder`:

1. End of speech below the minimum length: the eos log-probability is set to
   `-inf` before sampling.
2. Stop tokens in `inference`: any of 6561 (eos), 6562, 6563 ends decoding.
3. Repetition-aware sampling's fallback excludes the repeated token
   (`default_sampler`; see `cosyvoice2.sampling`).
4. `inference_bistream` forces the first fill token after `(P // 15 + 1) * 15 - P`
   tokens (P prompt speech tokens) and every 16 tokens after.

The older official code (the `cosyvoice-minicpmo` wheel the parity tests run)
decodes differently on each point; its rules are a `TokenDecoder` subclass in
the test-support package (`cosyvoice2_testing.legacy`), passed as `decoder=`.

Where the parts live: the step decoder (`TokenDecoder`, `DecodeStep`) is in
`cosyvoice2.decoding` and the bistream loop (`BistreamDecoder`) in
`cosyvoice2.bistream`, so that neither imports this module; both are
re-exported here.

Prompt prefix reuse: `[sos, prompt_text]` does not depend on the target text,
so its KV cache can be computed once per saved speaker (`make_prefix`) and
reused (`inference(..., prefix=...)`): each call copies it, so the saved one is
never modified. The prompt speech tokens come after the text in this layout and
cannot be cached. (`inference_bistream` interleaves prompt text and prompt
speech in a text-dependent way and takes no prefix.)

Decoding overlaps work as mlx-lm's `generate_step` does: step n+1 is built and
scheduled with `mx.async_eval` before token n is read on the host, so the only
host synchronisation per token is reading the token itself. When the host then
finds that token n ends decoding or changes the next input (stop token, fill
token), the speculative step is discarded by trimming the KV cache by one
position.

Precision and quantisation (`cast`, `quantize`, `from_weights`): fp32, bf16,
fp16, and 8- or 4-bit affine quantisation with `mlx.nn.quantize`. Rule: every
`Linear` of the Qwen2 backbone and its text embedding are quantised (together
about 98% of the parameters); `llm_embedding`, `speech_embedding` and
`llm_decoder` stay in float unless `include_speech_layers=True`, because they
are small (1.6%) and `llm_decoder` produces the speech-token distribution
itself. The quantisation is recorded the way mlx-lm records it
(`{"quantization": {"group_size": 64, "bits": 8}}`) and loading quantises only
the modules whose `scales` are present in the weights (mlx-lm's rule), so saved
quantised weights are loaded, never re-quantised.

Where the time goes (full-size shapes; measured times belong in the bench's
results files, `bench/README.md`):

- Decode reads about 1.45 GB of fp32 weights per token (from the shapes: 24 layers
  plus `llm_decoder`; the 545 MB text embedding is only read at prefill, a few dozen
  rows, and a model dir loads it as a `cosyvoice2.mapped_embedding.MappedEmbedding`
  that reads those rows from the file instead of holding the table). A decode
  step took about as long as the bare matrix-vector products over those weights:
  the step is memory-bandwidth bound, and the per-op overhead of mlx-lm's layers,
  the attention over the cache and the sampler are small beside it.
- Not computing the 151,936-word Qwen2 head saves 545 MB of reads per token and
  136 M multiply-adds per prefill position.
- The look-ahead (`mx.async_eval`) hides the building of the next step's graph
  behind the evaluation of the current one.
- Sampling: a full argsort of the 6564 scores was the largest part of a draw;
  a partition to the top 25 plus a compiled sampler replaces it.
- Prefill of 120 positions is bound by its matrix products (86 GFLOP from the
  shapes), i.e. by the machine's GEMM rate.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from cosyvoice2.bistream import BistreamDecoder
from cosyvoice2.config import LLMConfig
from cosyvoice2.decoding import (
    DecodeStep,
    TokenDecoder,
    TokenLike,
    _as_key,
    _check_behaviour,
    _length_limit,
    _tokens,
    decode_loop,
    log_softmax_f32,
)
from cosyvoice2.lm_models import (
    KVCache,
    load_prompt_cache,
    make_prompt_cache,
    qwen2,
    save_prompt_cache,
)
from cosyvoice2.sampling import Sampler

__all__ = [
    "LLM",
    "BistreamDecoder",
    "DecodeStep",
    "PromptPrefix",
    "Qwen2LM",
    "TokenDecoder",
    "TokenLike",
    "cast",
    "default_sampler",
    "quantize",
    "weights_of",
]

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class PromptPrefix:
    """The KV cache of `[sos, prompt_text]`, computed once for a saved speaker.

    `cache` is never modified; `fresh_cache()` gives a copy to decode with.
    """

    prompt_text: tuple[int, ...]
    cache: list[KVCache]

    @property
    def length(self) -> int:
        return self.cache[0].offset

    def fresh_cache(self) -> list[KVCache]:
        """New KV caches holding the prefix (new arrays, so decoding cannot alter this one)."""
        out = []
        for c in self.cache:
            n = c.offset
            copy = KVCache()
            copy.state = (c.keys[..., :n, :], c.values[..., :n, :], n)
            out.append(copy)
        return out

    def save(self, path: str | Path) -> None:
        """Write the prefix as a `.safetensors` file (mlx-lm's prompt-cache format)."""
        meta = {"prompt_text": json.dumps(list(self.prompt_text))}
        save_prompt_cache(str(path), self.cache, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> PromptPrefix:
        cache, meta = load_prompt_cache(str(path), return_metadata=True)
        return cls(tuple(json.loads(meta["prompt_text"])), cache)


def default_sampler(config: LLMConfig, behaviour: str = "upstream") -> Sampler:
    """The official repetition-aware sampler with the config's settings (`TokenDecoder`'s default)."""
    _check_behaviour(behaviour)
    return TokenDecoder.default_sampler(config)


class Qwen2LM(nn.Module):
    """CosyVoice2's speech LM: text and prompt in, speech tokens (0..6560) out."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.speech_token_size = config.speech_token_size
        self.sos = 0
        self.task_id = 1
        self.eos_token = config.speech_token_size
        self.fill_token = config.speech_token_size + 2
        self.mix_ratio = tuple(config.mix_ratio)
        args = qwen2.ModelArgs.from_dict(dataclasses.asdict(config.qwen))
        self.llm_embedding = nn.Embedding(2, config.llm_input_size)
        self.llm = qwen2.Qwen2Model(args)
        self.llm_decoder = nn.Linear(config.llm_output_size, config.speech_token_size + 3)
        self.speech_embedding = nn.Embedding(config.speech_token_size + 3, config.llm_input_size)

    # ----------------------------------------------------------------- loading

    @staticmethod
    def sanitize(weights: dict[str, Any]) -> dict[str, mx.array]:
        """Official `llm.pt` keys -> this module's: strip `llm.model.model.`, drop the unused head.

        `llm.model.lm_head.weight` (the Qwen2 output layer, tied to the text
        embedding) is never used for speech; rotary `inv_freq` buffers are
        recomputed. Keys already in MLX form pass through unchanged.
        """
        out: dict[str, mx.array] = {}
        for key, value in weights.items():
            if key.startswith("llm.model.lm_head.") or "rotary_emb.inv_freq" in key:
                continue
            if key.startswith("llm.model.model."):
                key = "llm." + key[len("llm.model.model.") :]
            out[key] = value if isinstance(value, mx.array) else mx.array(np.asarray(value))
        return out

    @classmethod
    def from_weights(
        cls,
        config: LLMConfig,
        weights: dict[str, mx.array],
        quantization: dict[str, Any] | None = None,
        strict: bool = True,
        text_embedding: nn.Module | None = None,
    ) -> Qwen2LM:
        """Build and load from (sanitized) weights, as saved by the converter.

        With `quantization` (`{"group_size": g, "bits": b}`, mlx-lm's record),
        the modules whose `<path>.scales` are in `weights` are turned into their
        quantised versions before loading: the stored quantised weights are
        loaded as they are. Float weights keep their stored dtype.

        `text_embedding`: a lookup that replaces the text embedding `llm.embed_tokens`
        (`cosyvoice2.mapped_embedding.MappedEmbedding`: read from the file row by row);
        `weights` then holds none of its tensors.
        """
        model = cls(config)
        if text_embedding is not None:
            want = model.llm.embed_tokens.weight.shape
            have = (text_embedding.num_embeddings, text_embedding.dims)
            if tuple(want) != have:
                raise ValueError(f"text embedding: expected shape {tuple(want)}, found {have}")
            model.llm.embed_tokens = text_embedding
        if quantization:
            nn.quantize(
                model,
                group_size=quantization["group_size"],
                bits=quantization["bits"],
                class_predicate=lambda p, m: (
                    hasattr(m, "to_quantized") and f"{p}.scales" in weights
                ),
            )
        model.load_weights(list(weights.items()), strict=strict)
        mx.eval(model.parameters())
        return model

    def make_cache(self) -> list[KVCache]:
        """A fresh, empty KV cache for the backbone (one `KVCache` per layer)."""
        return make_prompt_cache(self.llm)

    # ------------------------------------------------------------- forwarding

    def embed_text(self, tokens: TokenLike) -> mx.array:
        """Text token ids -> (1, T, D) with the Qwen2 text embedding."""
        return self.llm.embed_tokens(_tokens(tokens))

    def embed_speech(self, tokens: TokenLike) -> mx.array:
        """Speech token ids -> (1, T, D)."""
        return self.speech_embedding(_tokens(tokens))

    def special_embedding(self, index: int) -> mx.array:
        """Row `index` of `llm_embedding` (sos 0, task id 1) as (1, 1, D)."""
        return self.llm_embedding(mx.array([[index]], dtype=mx.int32))

    def forward_one_step(self, xs: mx.array, cache: list[KVCache]) -> mx.array:
        """Run input embeddings (1, L, D) through the backbone with `cache`; logits of the last position (1, V).

        Appends L positions to `cache` (`Qwen2Encoder.forward_one_step` plus `llm_decoder`).
        """
        hidden = self.llm(None, cache=cache, input_embeddings=xs)
        return self.llm_decoder(hidden[:, -1])

    def log_probs(self, xs: mx.array, cache: list[KVCache]) -> mx.array:
        """float32 log-softmax of the last position's logits, shape (V,)."""
        return log_softmax_f32(self.forward_one_step(xs, cache)[0])

    # -------------------------------------------------------------- prefixes

    def prompt_input(
        self,
        text: TokenLike,
        prompt_text: TokenLike | None = None,
        prompt_speech_token: TokenLike | None = None,
    ) -> mx.array:
        """The official input layout `[sos, prompt_text + text, task_id, prompt_speech]` as (1, L, D)."""
        parts = [
            self.special_embedding(self.sos),
            self.embed_text(mx.concatenate([_tokens(prompt_text), _tokens(text)], axis=1)),
            self.special_embedding(self.task_id),
        ]
        speech = _tokens(prompt_speech_token)
        if speech.shape[1]:
            parts.append(self.embed_speech(speech))
        return mx.concatenate(parts, axis=1)

    def make_prefix(self, prompt_text: TokenLike | None) -> PromptPrefix:
        """Compute the KV cache of `[sos, prompt_text]` once (for a saved speaker)."""
        tokens = _tokens(prompt_text)
        x = mx.concatenate([self.special_embedding(self.sos), self.embed_text(tokens)], axis=1)
        cache = self.make_cache()
        self.llm(None, cache=cache, input_embeddings=x)
        mx.eval([c.state for c in cache])
        return PromptPrefix(tuple(tokens[0].tolist()), cache)

    # -------------------------------------------------------------- decoding

    def inference(
        self,
        text: TokenLike,
        prompt_text: TokenLike | None = None,
        prompt_speech_token: TokenLike | None = None,
        embedding: Any = None,
        sampling: Sampler | None = None,
        max_token_text_ratio: float = 20,
        min_token_text_ratio: float = 2,
        *,
        key: mx.array | int | None = None,
        prefix: PromptPrefix | None = None,
        decoder: type[TokenDecoder] | None = None,
        behaviour: str = "upstream",
    ) -> Iterator[int]:
        """Yield speech tokens for `text` (the official `Qwen2LM.inference`).

        `embedding` (the speaker vector) is accepted for the official signature
        and ignored, as the official Qwen2LM ignores it. `sampling` defaults to
        the config's repetition-aware sampler; `key` (an MLX key or an int seed)
        drives every random draw. `prefix` is a `make_prefix` result for this
        `prompt_text` (then `prompt_text` may be omitted); the tokens are the
        same as without it. `decoder` holds the decoding rules (default
        `TokenDecoder`, the upstream ones); `behaviour` accepts only "upstream".
        """
        del embedding
        decoder = _decoder_class(decoder, behaviour)
        text_t = _tokens(text)
        if prefix is not None:
            if (
                prompt_text is not None
                and tuple(_tokens(prompt_text)[0].tolist()) != prefix.prompt_text
            ):
                raise ValueError("prefix was computed for a different prompt_text")
            cache = prefix.fresh_cache()
            parts = [self.embed_text(text_t), self.special_embedding(self.task_id)]
            speech = _tokens(prompt_speech_token)
            if speech.shape[1]:
                parts.append(self.embed_speech(speech))
            lm_input = mx.concatenate(parts, axis=1)
        else:
            cache = self.make_cache()
            lm_input = self.prompt_input(text_t, prompt_text, prompt_speech_token)
        n_text = text_t.shape[1]
        min_len = _length_limit(n_text, min_token_text_ratio)
        max_len = _length_limit(n_text, max_token_text_ratio)
        sampler = sampling if sampling is not None else decoder.default_sampler(self.config)
        dec = decoder(self, cache, sampler, _as_key(key))
        yield from self._decode(dec, lm_input, min_len, max_len)

    def _decode(
        self, dec: TokenDecoder, lm_input: mx.array, min_len: int, max_len: int
    ) -> Iterator[int]:
        """The official decode loop (`inference_wrapper`), one step scheduled ahead."""
        yield from decode_loop(dec, lm_input, min_len, max_len, self.eos_token)

    def inference_bistream(
        self,
        text: Iterable[TokenLike],
        prompt_text: TokenLike | None = None,
        prompt_speech_token: TokenLike | None = None,
        embedding: Any = None,
        sampling: Sampler | None = None,
        max_token_text_ratio: float = 20,
        min_token_text_ratio: float = 2,
        *,
        key: mx.array | int | None = None,
        max_tokens: int | None = None,
        decoder: type[TokenDecoder] | None = None,
        behaviour: str = "upstream",
    ) -> Iterator[int]:
        """Yield speech tokens while text tokens arrive in chunks (the official `inference_bistream`).

        Text and speech are interleaved `mix_ratio` (5 text : 15 speech): the
        prompt text and prompt speech tokens first, then 5 text tokens, up to 15
        speech tokens and a fill token (6563), which hands over to the next 5
        text tokens; when the text stream ends, the remaining text and the task
        id are fed and decoding runs to eos. Fill tokens are not yielded but are
        part of the history the repetition check sees, as in the official code.
        Official quirks kept for parity: prompt speech tokens still unconsumed
        when the text ends are dropped, and after a fill token the last speech
        token is fed a second time with the final text.

        Unlike the official code, the stream cannot run forever (with random
        or badly matched weights the official loop can): the number of yielded
        tokens is kept to `max_token_text_ratio` times the number of target text
        tokens received so far. While text is still arriving, reaching that
        bound forces a fill token (decoding waits for more text); after the
        text ended, it ends the stream. `max_tokens`, if given, is a hard cap on
        the whole stream. `min_token_text_ratio` is unused, as in the official
        code. Sampling a 6562 (or a fill token after the text ended) raises
        `ValueError`, as in the official code. `decoder` and `behaviour` as in
        `inference`.
        """
        del embedding, min_token_text_ratio
        decoder = _decoder_class(decoder, behaviour)
        sampler = sampling if sampling is not None else decoder.default_sampler(self.config)
        dec = decoder(self, self.make_cache(), sampler, _as_key(key))
        bistream = BistreamDecoder(
            self, dec, prompt_text, prompt_speech_token, max_token_text_ratio, max_tokens
        )
        yield from bistream.tokens(text)


def _decoder_class(decoder: type[TokenDecoder] | None, behaviour: str) -> type[TokenDecoder]:
    _check_behaviour(behaviour)
    return TokenDecoder if decoder is None else decoder


LLM = Qwen2LM


# ------------------------------------------------------------------ precision


def cast(model: Qwen2LM, dtype: str | mx.Dtype) -> Qwen2LM:
    """Cast every float parameter to `dtype` ("float32", "bfloat16", "float16" or an mx.Dtype)."""
    model.set_dtype(_DTYPES[dtype] if isinstance(dtype, str) else dtype)
    return model


def quantize(
    model: Qwen2LM,
    bits: int = 8,
    group_size: int = 64,
    include_speech_layers: bool = False,
) -> dict[str, Any]:
    """Quantise the model in place (see the module docstring for the rule); returns mlx-lm's record.

    The returned `{"group_size": g, "bits": b}` goes under `"quantization"` in
    the MLX model dir's `config.json`; `from_weights(..., quantization=...)`
    loads the result without re-quantising.
    """
    speech_layers = ("llm_embedding", "speech_embedding", "llm_decoder")

    def predicate(path: str, module: nn.Module) -> bool:
        if not hasattr(module, "to_quantized"):
            return False
        if path in speech_layers and not include_speech_layers:
            return False
        weight = getattr(module, "weight", None)
        return weight is not None and weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    mx.eval(model.parameters())
    return {"group_size": group_size, "bits": bits}


def weights_of(model: Qwen2LM) -> dict[str, mx.array]:
    """The model's parameters as a flat dict (what the converter saves as safetensors)."""
    return dict(tree_flatten(model.parameters()))
