"""`CausalMaskedDiffWithXvec`: speech tokens + prompt + speaker embedding to mel, CosyVoice2's flow.

Port of the official `cosyvoice/flow/flow.py` (inference). Steps of `inference`:

1. the speaker x-vector is L2-normalised and projected to 80 dims (`spk_embed_affine_layer`);
2. prompt tokens and new tokens are concatenated and embedded (`input_embedding`);
3. `UpsampleConformerEncoder` turns them into 50 Hz features (2 frames per token),
   `encoder_proj` maps them to 80 dims (`mu`);
4. the conditions are the prompt mel followed by zeros;
5. `CausalConditionalCFM` solves the ODE from the official fixed noise;
6. the frames after the prompt are returned.

`streaming` selects the chunk-masked attention of the encoder and the estimator
(the official streaming path); `finalize=False` treats the last
`pre_lookahead_len` (3) tokens as look-ahead context: they shape the frames
before them through the `PreLookaheadLayer` but produce no frames themselves,
exactly as the latest official `inference(..., streaming, finalize)`. The
official hard-codes 10 Euler steps here; `n_timesteps` exposes it.

Differences between the installed reference wheel (mid-2025) and the latest
upstream `cosyvoice/flow/` that matter here: none for CosyVoice2 inference.
Upstream adds a training-time speech-token extractor to the flow, the
CosyVoice3 `CausalMaskedDiffWithDiT`, a dtype choice for TensorRT in
`solve_euler`, and an `in_channels` argument to `PreLookaheadLayer` (still 512).
The parity tests run against the wheel; the `finalize`/`streaming` semantics
ported here are the same in both.

Layout: channels-last. `prompt_feat` is `(1, T_prompt, 80)` (the official
layout too), and the returned mel is `(1, T, 80)`; the official returns
`(1, 80, T)`. Batch size 1, as the official asserts.
"""

from __future__ import annotations

import threading
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from cosyvoice2 import packed as packed_forms
from cosyvoice2.config import FlowConfig, MaskedDiffConfig
from cosyvoice2.flow.decoder import (
    CausalConditionalDecoder,
    CausalConv1d,
    CausalResnetBlock1D,
    ConvTranspose1d,
)
from cosyvoice2.flow.encoder import ConformerEncoder, PreLookaheadLayer, UpsampleConformerEncoder
from cosyvoice2.flow.encoder import Upsample1D as EncoderUpsample1D
from cosyvoice2.flow.flow_matching import CausalConditionalCFM, ConditionalCFM, OverlapCache
from cosyvoice2.flow.length_regulator import MEL_RATE, InterpolateRegulator
from cosyvoice2.flow.ops import cpu_extension, uses_panels
from cosyvoice2.flow.transformer import Attention, BasicTransformerBlock
from cosyvoice2.ops import set_dtype_evaluated
from cosyvoice2.packed import is_bf16_linear, packed


def forget_packed(module: nn.Module) -> None:
    """`cosyvoice2.packed.forget_packed`, and each attention's fused q/k/v weight dropped too."""
    packed_forms.forget_packed(module)
    for _, m in module.named_modules():
        if isinstance(m, Attention):
            m._fused = None


def sanitize_flow(model: nn.Module, weights: dict[str, Any]) -> dict[str, mx.array]:
    """A `flow.pt` state dict under `model`'s names: the same keys, convolution weights from
    torch `(out, in, k)` to MLX `(out, k, in)`, transposed ones from `(in, out, k)`."""
    transposed = {
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, ConvTranspose1d)
    }
    out = {}
    for key, w in weights.items():
        w = mx.array(w)
        if key.endswith("weight") and w.ndim == 3:
            w = w.transpose(1, 2, 0) if key in transposed else w.transpose(0, 2, 1)
        out[key] = w
    return out


def embed_tokens(embedding: nn.Embedding, prompt_token: mx.array, token: mx.array) -> mx.array:
    """Prompt and new speech tokens embedded together (negative ids clamped to 0, as the
    official `torch.clamp(token, min=0)`); a ValueError for an id beyond the vocabulary."""
    tokens = mx.concatenate([prompt_token, token], axis=1).astype(mx.int32)
    vocab = embedding.weight.shape[0]
    if tokens.size and mx.max(tokens).item() >= vocab:
        raise ValueError(f"speech token {mx.max(tokens).item()} out of range (vocab {vocab})")
    return embedding(mx.maximum(tokens, 0))


def l2_normalize(x: mx.array, eps: float = 1e-12) -> mx.array:
    """`torch.nn.functional.normalize(x, dim=-1)`: `x / max(||x||, eps)`."""
    norm = mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))
    return x / mx.maximum(norm, eps)


class CausalMaskedDiffWithXvec(nn.Module):
    """The flow model; parameter names are the official `flow.pt` keys (see `sanitize`)."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.encoder = UpsampleConformerEncoder(config.encoder, config.pre_lookahead_len)
        self.encoder_proj = nn.Linear(config.encoder.output_size, config.output_size)
        self.decoder = CausalConditionalCFM(config.decoder)

    def set_dtype(self, dtype: mx.Dtype, predicate: Any = None) -> None:
        forget_packed(self)
        set_dtype_evaluated(self, dtype, predicate)

    def pack_weights(self) -> int:
        """Make now the forms of the weights that the active backend's calls read (each
        transformer block's fused q/k/v; with the CPU extension also the panels of its
        output and feed-forward projections and of the decoder's and the encoder's causal
        convolutions), and let them hold the weights: one copy of each weight, not the
        weight and its form (`Attention.fused_weight`, `packed`: `release`). Returns the
        number of layers done: 0 off the main thread (the weights would become lazy arrays
        of the stream of the thread that made them). Load calls it; a cast or quantisation
        drops the forms (`forget_packed`), and a call makes again what it needs.
        """
        if threading.current_thread() is not threading.main_thread():
            return 0
        kernels = cpu_extension()
        n = 0
        for _, m in self.named_modules():
            if isinstance(m, BasicTransformerBlock):
                attn, ff = m.attn1, m.ff
                qkv = (attn.to_q, attn.to_k, attn.to_v)
                if all(type(x) is nn.Linear for x in qkv):
                    panels = attn.to_q.weight.dtype == mx.float32 or all(map(is_bf16_linear, qkv))
                    attn.fused_weight(kernels if panels else None, release=True)
                    n += 1
                layers = [attn.to_out[0], ff.net[0].proj, ff.net[2]]
            elif isinstance(m, CausalResnetBlock1D):
                layers = [m.res_conv, m.block1.block[0], m.block2.block[0]]
            elif isinstance(m, CausalConditionalDecoder):
                layers = [m.final_proj]
            elif isinstance(m, PreLookaheadLayer):
                layers = [m.conv2]  # (conv1 is MLX's own layer, its weights read as they are)
            elif isinstance(m, EncoderUpsample1D):
                layers = [m.conv]
            else:
                continue
            for layer in layers:  # where `linear` / `conv1d_valid` take the panels, as a call would
                conv = isinstance(layer, CausalConv1d) or (
                    type(layer) is nn.Conv1d and layer.weight.shape[1] > 1
                )
                if kernels is not None and (
                    layer.weight.dtype == mx.float32 if conv else uses_panels(layer)
                ):
                    packed(kernels, layer, release=True)
                    n += 1
        return n

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Official `flow.pt` state dict (torch layouts) -> this model's parameters.

        Names are kept; convolution weights move from torch `(out, in, k)` to MLX
        `(out, k, in)`, transposed convolutions from `(in, out, k)` to `(out, k, in)`.
        """
        return sanitize_flow(self, weights)

    def speaker(self, embedding: mx.array) -> mx.array:
        """The x-vector `(1, spk_embed_dim)` normalised and projected: `spks` `(1, 80)`."""
        return self.spk_embed_affine_layer(l2_normalize(embedding))

    def encode(
        self,
        token: mx.array,
        prompt_token: mx.array,
        streaming: bool = False,
        finalize: bool = True,
    ) -> mx.array:
        """`mu` `(1, 2 * N, 80)` for the N tokens of prompt + new tokens (minus the look-ahead if not `finalize`)."""
        x = embed_tokens(self.input_embedding, prompt_token, token)
        if finalize:
            h = self.encoder(x, None, streaming)
        else:
            n = self.config.pre_lookahead_len
            if x.shape[1] <= n:
                raise ValueError(f"finalize=False needs more than {n} tokens, got {x.shape[1]}")
            h = self.encoder(x[:, :-n], x[:, -n:], streaming)
        return self.encoder_proj(h)

    def inference(
        self,
        token: mx.array,
        prompt_token: mx.array,
        prompt_feat: mx.array,
        embedding: mx.array,
        streaming: bool = False,
        finalize: bool = True,
        n_timesteps: int = 10,
        temperature: float = 1.0,
        noise: mx.array | None = None,
    ) -> mx.array:
        """Mel frames `(1, T, 80)` for `token` `(1, N)` after the prompt (see module doc).

        `prompt_token` `(1, N_p)`, `prompt_feat` `(1, T_p, 80)` (normally `T_p = 2 N_p`),
        `embedding` `(1, 192)`. `noise` replaces the official fixed noise when given
        (`(1, T_p + T, 80)`).
        """
        if token.shape[0] != 1:
            raise ValueError("batch size 1 only, as the official inference")
        spks = self.speaker(embedding)
        mu = self.encode(token, prompt_token, streaming, finalize)
        mel_len1 = prompt_feat.shape[1]
        mel_len2 = mu.shape[1] - mel_len1
        if mel_len2 < 0:
            raise ValueError(
                f"prompt_feat has {mel_len1} frames, more than the {mu.shape[1]} encoded"
            )
        cond = mx.concatenate(
            [prompt_feat.astype(mu.dtype), mx.zeros((1, mel_len2, mu.shape[-1]), dtype=mu.dtype)],
            axis=1,
        )
        feat = self.decoder(
            mu,
            None,
            n_timesteps,
            temperature,
            spks=spks,
            cond=cond,
            streaming=streaming,
            noise=noise,
        )
        return feat[:, mel_len1:]


class MaskedDiffWithXvec(nn.Module):
    """The first generation's flow (CosyVoice-300M family, 22.05 kHz): the official
    `cosyvoice/flow/flow.py:MaskedDiffWithXvec` (inference); parameter names are `flow.pt`'s.

    Prompt and new tokens are embedded and encoded together by a non-causal
    `ConformerEncoder` (50 Hz features), projected to 80 dims, stretched to mel frames by
    `InterpolateRegulator` (prompt and new part apart; the new part gets
    `int(N / input_frame_rate * 22050 / 256)` frames), and the non-causal
    `ConditionalCFM` solves the mel from noise with the prompt mel as condition.
    """

    def __init__(self, config: MaskedDiffConfig):
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.encoder = ConformerEncoder(config.encoder)
        self.encoder_proj = nn.Linear(config.encoder.output_size, config.output_size)
        self.decoder = ConditionalCFM(config.decoder)
        self.length_regulator = InterpolateRegulator(config.length_regulator)

    def sanitize(self, weights: dict[str, Any]) -> dict[str, mx.array]:
        """Official `flow.pt` state dict (torch layouts) -> this model's parameters."""
        return sanitize_flow(self, weights)

    def speaker(self, embedding: mx.array) -> mx.array:
        """The x-vector `(1, spk_embed_dim)` normalised and projected: `spks` `(1, 80)`."""
        return self.spk_embed_affine_layer(l2_normalize(embedding))

    def mel_frames(self, n_tokens: int) -> int:
        """Mel frames of `n_tokens` new tokens, as the official inference counts them."""
        return int(n_tokens / self.config.input_frame_rate * MEL_RATE)

    def encode(self, token: mx.array, prompt_token: mx.array, mel_len1: int) -> mx.array:
        """`mu` `(1, mel_len1 + mel_frames(N), 80)`: the encoded tokens stretched to frames."""
        n1 = prompt_token.shape[1]
        h = self.encoder_proj(self.encoder(embed_tokens(self.input_embedding, prompt_token, token)))
        return self.length_regulator.inference(
            h[:, :n1], h[:, n1:], mel_len1, self.mel_frames(token.shape[1]),
            self.config.input_frame_rate,
        )  # fmt: skip

    def inference(
        self,
        token: mx.array,
        prompt_token: mx.array,
        prompt_feat: mx.array,
        embedding: mx.array,
        n_timesteps: int = 10,
        temperature: float = 1.0,
        noise: mx.array | None = None,
        key: mx.array | None = None,
        cache: OverlapCache | None = None,
    ) -> mx.array:
        """Mel frames `(1, T, 80)` for `token` `(1, N)` after the prompt.

        `prompt_token` `(1, N_p)`, `prompt_feat` `(1, T_p, 80)`, `embedding` `(1, 192)`.
        `noise` `(1, T_p + T, 80)` is the CFM's starting noise (drawn from `key` when absent).
        `cache`: a stream's `OverlapCache` (the official `flow_cache`), read and updated.
        """
        if token.shape[0] != 1:
            raise ValueError("batch size 1 only, as the official inference")
        spks = self.speaker(embedding)
        mel_len1 = prompt_feat.shape[1]
        mu = self.encode(token, prompt_token, mel_len1)
        cond = mx.concatenate(
            [
                prompt_feat.astype(mu.dtype),
                mx.zeros((1, mu.shape[1] - mel_len1, mu.shape[-1]), dtype=mu.dtype),
            ],
            axis=1,
        )
        feat = self.decoder(
            mu, None, n_timesteps, temperature, spks=spks, cond=cond, noise=noise, key=key,
            prompt_len=mel_len1, cache=cache,
        )  # fmt: skip
        return feat[:, mel_len1:]
