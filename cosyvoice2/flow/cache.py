"""The streaming flow in O(n): each chunk's encoder and estimator work done once, with caches.

The official streaming (`CosyVoice2Model.tts(stream=True)`) re-runs the flow over
the prompt and every token so far for each chunk. In streaming mode nothing in
the flow lets an earlier position depend on a later one *across a block
boundary*:

- encoder: `embed` and `up_embed` are per position; `PreLookaheadLayer` reads 3
  tokens ahead (in a non-final call those are the real next tokens, the
  look-ahead context) and its second conv 2 behind; the conformer layers attend
  with a chunk mask of `static_chunk_size` (25) tokens, `Upsample1D` is a causal
  conv over the repeated frames, the up-layers attend in chunks of 50 frames;
  relative positions depend on `i - j` only, not on the sequence length;
- estimator (every Euler step): causal convs (kernel 3), per-frame LayerNorm,
  attention chunk-masked to `static_chunk_size` (50) frames, 1x1 convs;
- CFM noise: indexed by absolute frame (the official fixed noise), and the
  Euler update is per frame.

Inside a block, though, a position sees the *later* positions of its block, so a
block that is only partly known is not final. Hence the rule used here: the
state (attention keys/values of every layer, the last `k - 1` inputs of every
causal conv, the pre-look-ahead conv's last outputs) is *committed* only up to
the last whole block boundary reached by positions whose look-ahead was real;
each call computes from that boundary to the end. With the official schedule
(prompt + first hop a multiple of 25, then hops of 25) every call ends on a
boundary, so each token is encoded and each frame solved exactly once; with
another first hop at most one block (25 tokens, 50 frames) is computed again
per call. This is exact: tested equal (within float rounding) to the recompute
path on every chunk.

What is not O(n): the official final call (`finalize=True`) runs the flow
without the streaming flag, i.e. with full attention, so its frames depend on
every later frame; it can only be recomputed whole. `FlowStream(official_final=True)`
does that (parity with the official output); the default finishes with a
chunk-masked `finalize=True` step, which the cache computes incrementally.

Keys and values are kept per layer as the list of blocks in which they were
computed (`_Walk.keys_values`, `_Walk.kv_blocks`): attention runs over the blocks
without joining them, so a chunk reads the cache but never copies it.

Memory (arithmetic from the shapes, not a measurement): per estimator attention
block and Euler step the keys and values of both CFG branches,
`2 * 2 * heads * head_dim * 4` bytes per frame (8 KiB for CosyVoice2's 8 x 64): with
64 blocks and 10 steps about 5.2 MB per mel frame (50 per second), e.g. 2 GB for a
3 s prompt and 5 s of speech.

The prompt's committed state depends only on the prompt (tokens, mel,
x-vector) and `n_timesteps`, so `prompt_state` computes it once per speaker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from cosyvoice2 import branches
from cosyvoice2.flow.decoder import block_scores, block_values
from cosyvoice2.flow.encoder import rel_position_table
from cosyvoice2.flow.flow_matching import euler_times
from cosyvoice2.flow.noise import cfm_noise
from cosyvoice2.flow.ops import dense, layer_norm, silu, softmax


class _Walk:
    """One pass of a network over new positions `[c, end)`.

    Reads the committed state at `c` (items in traversal order) and records the
    state at `c2` (the new commit point, `c <= c2 <= end`). Positions are in the
    walk's unit times `scale` (tokens: 1, frames: the upsampling stride).
    """

    def __init__(self, old: list | None, c: int, c2: int):
        self.old = iter(old) if old else None
        self.new: list = []
        self.c, self.c2 = c, c2

    def _take(self) -> Any:
        return next(self.old) if self.old is not None else None

    def conv(
        self, x: mx.array, weight: mx.array, bias: mx.array | None, scale: int = 1
    ) -> mx.array:
        """Causal conv (left context from the committed state; zeros at the start)."""
        k = weight.shape[1]
        tail = self._take()
        if tail is None:
            tail = mx.zeros((x.shape[0], k - 1, x.shape[2]), dtype=x.dtype)
        full = mx.concatenate([tail, x], axis=1)
        rel = (self.c2 - self.c) * scale
        self.new.append(full[:, rel : rel + k - 1])
        y = mx.conv1d(full, weight)
        return y if bias is None else y + bias

    def kv_blocks(self) -> tuple[list[mx.array], int]:
        """The earlier positions' keys and values `(B, n, 2 * inner)` as blocks in order, and
        how many of this call's positions to commit (pass their keys and values to
        `commit_kv` next). Position-major: a block is one contiguous array the attention
        reads head by head."""
        old = self._take()
        blocks = list(old) if old else []
        return blocks, self.c2 - sum(b.shape[1] for b in blocks)

    def commit_kv(self, blocks: list[mx.array], kv: mx.array | None) -> None:
        """The new state: `blocks` (from `kv_blocks`) plus the committed positions' `kv`."""
        self.new.append(blocks + ([kv] if kv is not None else []))

    def keys_values(
        self, k: mx.array, v: mx.array, scale: int = 1
    ) -> tuple[list[mx.array], list[mx.array]]:
        """Keys and values `(B, H, n, d)` of all positions so far, as blocks in order.

        The committed positions are kept as the list of blocks in which they were
        computed, never concatenated: joining them into one array per layer and
        Euler step would copy the whole cache on every chunk (memory traffic growing
        with the square of the length). The new state is the old blocks plus the
        committed part of this call's block.
        """
        old = self._take()
        blocks = list(old) if old else []
        n_old = sum(b[0].shape[2] for b in blocks)
        keep = self.c2 * scale - n_old
        self.new.append(blocks + ([(k[:, :, :keep], v[:, :, :keep])] if keep > 0 else []))
        blocks.append((k, v))
        return [b[0] for b in blocks], [b[1] for b in blocks]


# ----------------------------------------------------------------------------- encoder


def _rel_attention(
    w: _Walk, attn: Any, x: mx.array, chunk: int, scale: int, table: mx.array
) -> mx.array:
    """`RelPositionMultiHeadedAttention` for the new queries against all keys so far."""
    b, n, _ = x.shape
    h, d = attn.h, attn.d_k
    q = attn.linear_q(x).reshape(b, n, h, d)
    k = attn.linear_k(x).reshape(b, n, h, d).transpose(0, 2, 1, 3)
    v = attn.linear_v(x).reshape(b, n, h, d).transpose(0, 2, 1, 3)
    keys, values = w.keys_values(k, v, scale)
    total = sum(b.shape[2] for b in keys)
    c = total - n
    # Relative positions i - j for queries c..total-1 and keys 0..total-1: from
    # total-1 down to -(n-1): rows 0 .. 2*total-2-c of the length-`total` table.
    p = attn.linear_pos(table[:, : 2 * total - 1 - c])
    p = p.reshape(1, -1, h, d).transpose(0, 2, 1, 3)
    q_u = (q + attn.pos_bias_u).transpose(0, 2, 1, 3)
    q_v = (q + attn.pos_bias_v).transpose(0, 2, 1, 3)
    sc = 1.0 / math.sqrt(d)
    bd = q_v @ p.transpose(0, 1, 3, 2)  # (b, h, n, 2*total-1-c)
    idx = (n - 1) - mx.arange(n)[:, None] + mx.arange(total)[None, :]
    bd = mx.take_along_axis(bd, mx.broadcast_to(idx, (b, h, n, total)), axis=-1)
    scores = block_scores(q_u * sc, keys) + bd * sc
    out = block_values(softmax(scores, chunk, c), values)
    return attn.linear_out(out.transpose(0, 2, 1, 3).reshape(b, n, h * d))


def _conformer(w: _Walk, layer: Any, x: mx.array, chunk: int, scale: int, table) -> mx.array:
    x = x + _rel_attention(w, layer.self_attn, layer.norm_mha(x), chunk, scale, table)
    ff = layer.feed_forward
    y = layer.norm_ff(x)
    if type(ff.w_1) is nn.Linear:
        y = silu(y @ ff.w_1.weight.T, ff.w_1.bias)
    else:
        y = silu(ff.w_1(y))
    return x + ff.w_2(y)


def encode_step(
    w: _Walk, encoder: Any, xs: mx.array, context: mx.array | None, lookahead: int
) -> mx.array:
    """Encoder output for new token embeddings `xs` `(1, n, in)` (frames `stride * n`).

    `context`: the embeddings of the `lookahead` tokens after them (None: the end,
    zero padding, as `finalize=True`).
    """
    cfg = encoder.config
    xs = encoder.embed.embed(xs)
    ctx = (
        encoder.embed.embed(context)
        if context is not None
        else mx.zeros((xs.shape[0], lookahead, xs.shape[2]), dtype=xs.dtype)
    )
    pre = encoder.pre_lookahead_layer
    y = mx.conv1d(mx.concatenate([xs, ctx], axis=1), pre.conv1.weight) + pre.conv1.bias
    y = nn.leaky_relu(y, negative_slope=0.01)
    xs = w.conv(y, pre.conv2.weight, pre.conv2.bias) + xs
    total = w.c + xs.shape[1]
    table = rel_position_table(total, xs.shape[2])
    for layer in encoder.encoders:
        xs = _conformer(w, layer, xs, cfg.static_chunk_size, 1, table)
    s = cfg.upsample_stride
    b, n, ch = xs.shape
    xs = mx.broadcast_to(xs[:, :, None], (b, n, s, ch)).reshape(b, n * s, ch)
    xs = w.conv(xs, encoder.up_layer.conv.weight, encoder.up_layer.conv.bias, scale=s)
    xs = encoder.up_embed.embed(xs)
    table = rel_position_table(total * s, xs.shape[2])
    for layer in encoder.up_encoders:
        xs = _conformer(w, layer, xs, cfg.static_chunk_size * s, s, table)
    return encoder.after_norm(xs)


# ----------------------------------------------------------------------------- estimator


def _causal_block(w: _Walk, blk: Any, x: mx.array) -> mx.array:
    conv, norm = blk.block[0], blk.block[2]
    y = w.conv(x, conv.weight, conv.bias)
    return layer_norm(y, norm.weight, norm.bias, norm.eps, then_mish=True)


def _resnet(w: _Walk, r: Any, x: mx.array, temb: mx.array) -> mx.array:
    h = _causal_block(w, r.block1, x)
    h = h + r.mlp[1](r.mlp[0](temb))[:, None, :]
    h = _causal_block(w, r.block2, h)
    return h + dense(r.res_conv, x)


def _transformer(w: _Walk, blk: Any, x: mx.array, chunk: int) -> mx.array:
    blocks, keep = w.kv_blocks()
    y, kv = blk.over_blocks(x, blocks, chunk, keep)
    w.commit_kv(blocks, kv)
    return y


def estimator_step(
    w: _Walk,
    est: Any,
    x: mx.array,
    mu: mx.array,
    t: mx.array,
    spks: mx.array,
    cond: mx.array,
) -> mx.array:
    """The causal U-Net's velocity for new frames (batch of 2: CFG), streaming (chunk-masked)."""
    chunk = est.config.static_chunk_size
    temb = est.time_mlp(est.time_embeddings(t))
    spk = mx.broadcast_to(spks[:, None, :], (*x.shape[:2], spks.shape[-1]))
    x = mx.concatenate([x, mu, spk, cond], axis=-1)
    hiddens = []
    for resnet, blocks, down in est.down_blocks:
        x = _resnet(w, resnet, x, temb)
        for blk in blocks:
            x = _transformer(w, blk, x, chunk)
        hiddens.append(x)
        x = w.conv(x, down.weight, down.bias)
    for resnet, blocks in est.mid_blocks:
        x = _resnet(w, resnet, x, temb)
        for blk in blocks:
            x = _transformer(w, blk, x, chunk)
        # Start computing what is built while the rest of the graph is built (the Python
        # of a step is about a tenth of its time, and the two branches' Python shares a
        # GIL): no step waits for its whole graph first.
        mx.async_eval(x)
    for resnet, blocks, up in est.up_blocks:
        skip = hiddens.pop()
        x = mx.concatenate([x, skip], axis=-1)
        x = _resnet(w, resnet, x, temb)
        for blk in blocks:
            x = _transformer(w, blk, x, chunk)
        x = w.conv(x, up.weight, up.bias)
    x = _causal_block(w, est.final_block, x)
    return dense(est.final_proj, x)


# ----------------------------------------------------------------------------- state


@dataclass(frozen=True)
class FlowState:
    """The committed streaming state after `tokens` positions (prompt included).

    Immutable: a step returns a new state, so a speaker's prompt state can be
    shared by any number of requests.
    """

    tokens: int = 0
    encoder: list = field(default_factory=list)
    steps: tuple = ()  # per Euler step: (conditional, unconditional) estimator state lists

    @property
    def nbytes(self) -> int:
        def size(item: Any) -> int:
            if isinstance(item, (list, tuple)):
                return sum(size(i) for i in item)
            return item.nbytes if isinstance(item, mx.array) else 0

        return size(self.encoder) + size(self.steps)


def block_tokens(flow: Any) -> int:
    """Token count of the blocks on which encoder and estimator state can be committed."""
    cfg = flow.config
    enc = cfg.encoder.static_chunk_size
    ratio = cfg.token_mel_ratio
    est = cfg.decoder.estimator.static_chunk_size
    if cfg.encoder.upsample_stride != ratio or est % ratio:
        raise ValueError(
            "streaming cache needs upsample_stride == token_mel_ratio and aligned chunks"
        )
    if len(cfg.decoder.estimator.channels) != 1:
        raise NotImplementedError("the streaming cache supports the single-level causal estimator")
    return math.lcm(enc, est // ratio)


def flow_step(
    flow: Any,
    state: FlowState,
    tokens: mx.array,
    prompt_feat: mx.array,
    spks: mx.array,
    n_timesteps: int,
    finalize: bool,
    commit: int | None = None,
) -> tuple[mx.array, FlowState]:
    """Mel frames for the positions after `state` and the state committed at `commit`.

    `tokens` `(1, N)`: prompt + speech tokens so far (all of them; those before
    `state.tokens` are not recomputed). Not `finalize`: the last `pre_lookahead_len`
    are look-ahead context. Returns the mel `(1, frames, 80)` of absolute frames
    `ratio * state.tokens ...` (prompt frames included) and the new state
    (committed at `commit` tokens, by default the last block boundary).
    """
    cfg = flow.config
    look = cfg.pre_lookahead_len
    ratio = cfg.token_mel_ratio
    n = tokens.shape[1] if finalize else tokens.shape[1] - look
    c = state.tokens
    if n <= c:
        raise ValueError(f"no new positions: {n} tokens, {c} committed")
    m = block_tokens(flow)
    c2 = (n // m) * m if commit is None else commit
    if not (c <= c2 <= n):
        raise ValueError(f"commit point {c2} outside [{c}, {n}]")
    emb = flow.input_embedding(mx.maximum(tokens[:, c:].astype(mx.int32), 0))
    w = _Walk(state.encoder, c, c2)
    ctx = None if finalize else emb[:, n - c :]
    h = encode_step(w, flow.encoder, emb[:, : n - c], ctx, look)
    mu = flow.encoder_proj(h)
    f0, f1 = ratio * c, ratio * n
    t_p = prompt_feat.shape[1]
    cond = mx.zeros((1, f1 - f0, mu.shape[-1]), dtype=mu.dtype)
    if f0 < t_p:
        cond = mx.concatenate(
            [prompt_feat[:, f0:f1].astype(mu.dtype), cond[:, : max(0, f1 - t_p)]], 1
        )
    x = cfm_noise(f1)[:, f0:].astype(mu.dtype)
    rate = flow.decoder.config.inference_cfg_rate
    est = flow.decoder.estimator
    mu_in = mx.concatenate([mu, mx.zeros_like(mu)], axis=0)
    spks_in = mx.concatenate([spks, mx.zeros_like(spks)], axis=0)
    cond_in = mx.concatenate([cond, mx.zeros_like(cond)], axis=0)
    steps = []
    times = euler_times(n_timesteps, flow.decoder.config.t_scheduler)
    old_steps = state.steps or (None,) * len(times)
    mx.eval(old_steps)  # worker threads cannot evaluate this thread's pending work
    for (t, dt), old in zip(times, old_steps):
        inputs = (mx.concatenate([x, x], axis=0), mu_in, mx.full((2,), t, dtype=x.dtype))
        inputs += (spks_in, cond_in)

        def branch(i: int, *a: mx.array, old: Any = old) -> tuple[mx.array, list]:
            ws = _Walk(old[i] if old is not None else None, f0, ratio * c2)
            return estimator_step(ws, est, *a), ws.new

        # The CFG branches one at a time (on two threads where `branches.enabled()`),
        # each with its own state: no batch-2 state to split or join between calls.
        (v_cond, new0), (v_uncond, new1) = branches.map_branches(
            branch, [[i, *(a[i : i + 1] for a in inputs)] for i in (0, 1)]
        )
        steps.append((new0, new1))
        x = x + dt * ((1.0 + rate) * v_cond - rate * v_uncond)
    return x, FlowState(c2, w.new, tuple(steps))


def prompt_state(
    flow: Any,
    prompt_token: mx.array,
    prompt_feat: mx.array,
    embedding: mx.array,
    n_timesteps: int,
) -> FlowState:
    """The committed state of a prompt alone: its whole blocks whose look-ahead is in the prompt."""
    n = prompt_token.shape[1] - flow.config.pre_lookahead_len
    c = max(0, n // block_tokens(flow) * block_tokens(flow))
    if c == 0:
        return FlowState()
    tokens = prompt_token[:, : c + flow.config.pre_lookahead_len]
    _, state = flow_step(
        flow, FlowState(), tokens, prompt_feat, flow.speaker(embedding), n_timesteps, False, c
    )
    mx.eval(state.encoder, state.steps)
    return state
