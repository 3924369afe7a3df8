"""`TransformerLM`: the speech LM of the first generation (CosyVoice-300M, -SFT, -Instruct, -25Hz).

Port of the official `cosyvoice/llm/llm.py:TransformerLM` and the encoders it builds from
`cosyvoice/transformer/encoder.py`. Module and parameter names follow the official ones,
so `llm.pt` keys map one to one (`sanitize`). Where CosyVoice2 has a Qwen2 backbone fed
with text embeddings, this LM has two encoders of its own:

    text ids -> text_embedding -> text_encoder (ConformerEncoder, `cosyvoice2.flow.encoder`:
      `linear` input layer, rel-pos self-attention, SiLU feed-forward, causal through
      `static_chunk_size: 1`)
      -> text_encoder_affine_layer
    [sos_eos, spk_embed_affine_layer(normalize(x-vector)), text, task_id, prompt speech]
      -> llm (TransformerEncoder: `linear_legacy` input layer (Linear, LayerNorm, ReLU),
         rel-pos self-attention, ReLU feed-forward, causal) -> llm_decoder
         (speech_token_size + 1 outputs: the last is eos)

The layers are CosyVoice2's flow encoder's (`cosyvoice2.flow.encoder`: the same espnet
rel-pos attention, the same linear input layer and conformer layer), not copies. The LM
decodes with one KV cache per layer (mlx-lm's `KVCache`, as the Qwen2 backbone), and the
decode loop and step scheduler are CosyVoice2's (`cosyvoice2.decoding`): the official
`inference` is the same loop with the eos index `speech_token_size`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from cosyvoice2.config import TransformerLMConfig
from cosyvoice2.decoding import (
    TokenDecoder,
    TokenLike,
    _as_key,
    _length_limit,
    _tokens,
    decode_loop,
    log_softmax_f32,
)
from cosyvoice2.flow.encoder import (
    ConformerEncoder,
    RelPositionMultiHeadedAttention,
    rel_position_table,
)
from cosyvoice2.flow.flow import l2_normalize
from cosyvoice2.lm_models import KVCache
from cosyvoice2.sampling import Sampler


class _LayerCache:
    """One layer's KV cache as the rel-pos attention reads it (`start`, `keys_values`)."""

    def __init__(self, kv: KVCache):
        self.kv = kv
        self.start = kv.offset

    def keys_values(self, k: mx.array, v: mx.array) -> tuple[list[mx.array], list[mx.array]]:
        keys, values = self.kv.update_and_fetch(k, v)
        return [keys], [values]


class LegacyLinearNoSubsampling(nn.Module):
    """`Linear -> LayerNorm(eps 1e-5) -> ReLU`, then the positional-encoding scale `sqrt(d)`."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = [nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5)]
        self.xscale = odim**0.5

    def __call__(self, x: mx.array) -> mx.array:
        return nn.relu(self.out[1](self.out[0](x))) * self.xscale


class ReluFeedForward(nn.Module):
    """`w_2(relu(w_1(x)))` (`TransformerEncoder`'s default `activation_type: relu`)."""

    def __init__(self, idim: int, hidden_units: int):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.w_2 = nn.Linear(hidden_units, idim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w_2(nn.relu(self.w_1(x)))


class TransformerEncoderLayer(nn.Module):
    """Pre-norm rel-pos self-attention (`norm1`) and ReLU feed-forward (`norm2`)."""

    def __init__(self, size: int, heads: int, linear_units: int):
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(heads, size)
        self.feed_forward = ReluFeedForward(size, linear_units)
        self.norm1 = nn.LayerNorm(size, eps=1e-12)
        self.norm2 = nn.LayerNorm(size, eps=1e-12)

    def __call__(self, x: mx.array, pos_emb: mx.array, cache: _LayerCache) -> mx.array:
        x = x + self.self_attn(self.norm1(x), pos_emb, chunk=1, cache=cache)
        return x + self.feed_forward(self.norm2(x))


class TransformerEncoder(ConformerEncoder):
    """The speech LM's backbone: the encoder structure with the legacy input layer and
    transformer layers, causal, fed through one KV cache per layer (the official
    `forward_chunk` with `required_cache_size=-1` and a lower-triangular mask)."""

    embed_class = LegacyLinearNoSubsampling
    layer_class = TransformerEncoderLayer

    def __call__(self, x: mx.array, cache: list[KVCache]) -> mx.array:
        """`x` `(1, T, D)` after the positions already in `cache` (which it extends)."""
        x = self.embed(x)
        pos = rel_position_table(cache[0].offset + x.shape[1], self.output_size)
        for layer, kv in zip(self.encoders, cache, strict=True):
            x = layer(x, pos, _LayerCache(kv))
        return self.after_norm(x)


class TransformerLM(nn.Module):
    """The official `TransformerLM` for inference: `inference` yields speech tokens."""

    sos_eos = 0
    task_id = 1

    def __init__(self, config: TransformerLMConfig):
        super().__init__()
        self.config = config
        self.speech_token_size = config.speech_token_size
        self.eos_token = config.speech_token_size
        self.text_embedding = nn.Embedding(config.text_token_size, config.text_encoder_input_size)
        self.text_encoder = ConformerEncoder(config.text_encoder)
        self.text_encoder_affine_layer = nn.Linear(
            config.text_encoder.output_size, config.llm_input_size
        )
        self.llm_embedding = nn.Embedding(2, config.llm_input_size)
        self.llm = TransformerEncoder(config.llm)
        self.llm_decoder = nn.Linear(config.llm_output_size, config.speech_token_size + 1)
        self.speech_embedding = nn.Embedding(config.speech_token_size, config.llm_input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.llm_input_size)

    @staticmethod
    def sanitize(weights: dict[str, Any]) -> dict[str, mx.array]:
        """`llm.pt` tensors (torch or numpy) under this module's names (the same keys)."""
        return {
            k: v if isinstance(v, mx.array) else mx.array(np.asarray(v)) for k, v in weights.items()
        }

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.llm.encoders]

    # -------------------------------------------------------------- inputs

    def encode(self, text: TokenLike) -> mx.array:
        """Text ids -> `(1, T, llm_input_size)`: embedding, text encoder, affine layer."""
        return self.text_encoder_affine_layer(self.text_encoder(self.text_embedding(_tokens(text))))

    def embed_speaker(self, embedding: Any) -> mx.array:
        """The x-vector, L2-normalised and projected, as `(1, 1, D)`; `(1, 0, D)` when absent."""
        if embedding is None or np.asarray(embedding).size == 0:
            return mx.zeros((1, 0, self.config.llm_input_size))
        e = mx.array(np.asarray(embedding, dtype=np.float32)).reshape(1, -1)
        return self.spk_embed_affine_layer(l2_normalize(e))[:, None]

    def special_embedding(self, index: int) -> mx.array:
        return self.llm_embedding(mx.array([[index]], dtype=mx.int32))

    def prompt_input(
        self,
        text: TokenLike,
        prompt_text: TokenLike | None = None,
        prompt_speech_token: TokenLike | None = None,
        embedding: Any = None,
    ) -> mx.array:
        """The official input `[sos_eos, speaker, encode(prompt_text + text), task_id,
        prompt speech]` as `(1, L, D)`."""
        text_ids = mx.concatenate([_tokens(prompt_text), _tokens(text)], axis=1)
        parts = [
            self.special_embedding(self.sos_eos),
            self.embed_speaker(embedding),
            self.encode(text_ids),
            self.special_embedding(self.task_id),
        ]
        speech = _tokens(prompt_speech_token)
        if speech.shape[1]:
            parts.append(self.speech_embedding(speech))
        return mx.concatenate(parts, axis=1)

    # -------------------------------------------------------------- decoding

    def log_probs(self, xs: mx.array, cache: list[KVCache]) -> mx.array:
        """float32 log-softmax of the last position's logits, shape `(speech_token_size + 1,)`."""
        return log_softmax_f32(self.llm_decoder(self.llm(xs, cache)[:, -1])[0])

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
    ) -> Iterator[int]:
        """Yield speech tokens for `text` (the official `TransformerLM.inference`).

        Lengths count the target text only (`prompt_text` excluded), as the official code.
        The first step never draws eos (the official code masks it at step 0, and the
        minimum length keeps it masked while the text is not empty). `sampling` defaults to
        the config's repetition-aware sampler; `key` (an MLX key or an int seed) drives
        every draw.
        """
        lm_input = self.prompt_input(text, prompt_text, prompt_speech_token, embedding)
        n_text = _tokens(text).shape[1]
        min_len = max(_length_limit(n_text, min_token_text_ratio), 1)  # step 0: never eos
        max_len = _length_limit(n_text, max_token_text_ratio)
        sampler = sampling if sampling is not None else TokenDecoder.default_sampler(self.config)
        dec = TokenDecoder(self, self.make_cache(), sampler, _as_key(key))
        yield from decode_loop(dec, lm_input, min_len, max_len, self.eos_token)
