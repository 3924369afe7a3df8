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

The forward pass is the modules' own: `flow_step` calls the encoder, the CFM and
its estimator with a `ChunkCache` (`cache=`), as mlx-lm's models take their KV
cache; this module holds the state and the commit rule, not a second pass.

Keys and values are kept per layer as the list of blocks in which they were
computed (`ChunkCache.keys_values`, `ChunkCache.kv_blocks`): attention runs over
the blocks without joining them, so a chunk reads the cache but never copies it.

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

from cosyvoice2.flow.flow_matching import euler_times
from cosyvoice2.flow.noise import cfm_noise
from cosyvoice2.flow.ops import conv1d_valid


class ChunkCache:
    """One call's view of a network's streaming state, for its new positions `[start, end)`.

    The modules read the committed state at `start` (one item per stateful layer,
    in the order of the forward pass) and record the state at `commit` (the new
    commit point, `start <= commit <= end`) in `new`. Positions are counted in
    the unit of the layers that use it (tokens, or frames: `scaled`).
    """

    def __init__(self, old: list | None, start: int, commit: int):
        self._old = iter(old) if old else None
        self.new: list = []
        self.start, self.commit = start, commit

    def scaled(self, factor: int) -> ChunkCache:
        """The same state seen by layers with `factor` positions per position of this one
        (the encoder's layers after upsampling)."""
        view = ChunkCache(None, self.start * factor, self.commit * factor)
        view._old, view.new = self._old, self.new
        return view

    def _take(self) -> Any:
        return next(self._old) if self._old is not None else None

    def conv(self, x: mx.array, layer: Any) -> mx.array:
        """`layer`'s causal convolution (`conv1d_valid`) of `x` `(B, n, C)` with its left
        context from the state (zeros at the start); records the `k - 1` inputs before
        `commit`."""
        k = layer.weight.shape[1]
        tail = self._take()
        if tail is None:
            tail = mx.zeros((x.shape[0], k - 1, x.shape[2]), dtype=x.dtype)
        full = mx.concatenate([tail, x], axis=1)
        rel = self.commit - self.start
        self.new.append(full[:, rel : rel + k - 1])
        return conv1d_valid(layer, full)

    def kv_blocks(self) -> tuple[list[mx.array], int]:
        """The earlier positions' keys and values `(B, n, 2 * inner)` as blocks in order, and
        how many of this call's positions to commit (pass their keys and values to
        `commit_kv` next). Position-major: a block is one contiguous array the attention
        reads head by head."""
        old = self._take()
        blocks = list(old) if old else []
        return blocks, self.commit - sum(b.shape[1] for b in blocks)

    def commit_kv(self, blocks: list[mx.array], kv: mx.array | None) -> None:
        """The new state: `blocks` (from `kv_blocks`) plus the committed positions' `kv`."""
        self.new.append(blocks + ([kv] if kv is not None else []))

    def keys_values(self, k: mx.array, v: mx.array) -> tuple[list[mx.array], list[mx.array]]:
        """Keys and values `(B, H, n, d)` of all positions so far, as blocks in order.

        The committed positions are kept as the list of blocks in which they were
        computed, never concatenated: joining them into one array per layer and
        Euler step would copy the whole cache on every chunk (memory traffic growing
        with the square of the length). The new state is the old blocks plus the
        committed part of this call's block.
        """
        old = self._take()
        blocks = list(old) if old else []
        keep = self.commit - sum(b[0].shape[2] for b in blocks)
        self.new.append(blocks + ([(k[:, :, :keep], v[:, :, :keep])] if keep > 0 else []))
        blocks.append((k, v))
        return [b[0] for b in blocks], [b[1] for b in blocks]


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
    encoder = ChunkCache(state.encoder, c, c2)
    context = None if finalize else emb[:, n - c :]
    mu = flow.encoder_proj(flow.encoder(emb[:, : n - c], context, True, encoder))
    f0, f1 = ratio * c, ratio * n
    t_p = prompt_feat.shape[1]
    cond = mx.zeros((1, f1 - f0, mu.shape[-1]), dtype=mu.dtype)
    if f0 < t_p:
        cond = mx.concatenate(
            [prompt_feat[:, f0:f1].astype(mu.dtype), cond[:, : max(0, f1 - t_p)]], 1
        )
    old_steps = state.steps or ((None, None),) * len(euler_times(n_timesteps))
    mx.eval(old_steps)  # branch threads cannot evaluate this thread's pending work
    steps = [tuple(ChunkCache(old, f0, ratio * c2) for old in pair) for pair in old_steps]
    mel = flow.decoder(
        mu, None, n_timesteps, spks=spks, cond=cond, streaming=True,
        noise=cfm_noise(f1)[:, f0:], caches=steps,
    )  # fmt: skip
    return mel, FlowState(c2, encoder.new, tuple((a.new, b.new) for a, b in steps))


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
