"""S3 speech tokenizer v2 (`speech_tokenizer_v2.onnx`) in MLX: 128-bin Whisper log-mel -> 25 Hz tokens.

The network (the `s3tokenizer` package's `S3TokenizerV2` is its PyTorch twin):

- two convolutions (kernel 3, stride 2, GELU) take 100 Hz mel frames to 25 Hz;
- `n_layer` pre-norm blocks: multi-head attention with rotary position
  embeddings on q and k (head size 64, base 10000, the two halves rotated) and
  an FSMN memory (a depthwise convolution of kernel 31 over v, added to v)
  added to the attention output, then a GELU MLP;
- finite scalar quantisation: `project_in` to 8 values, `tanh`, times 0.999,
  rounded to {-1, 0, 1}, shifted to {0, 1, 2} and read as 8 base-3 digits
  (digit i weighs 3**i): 3**8 = 6561 codes.

Module and parameter names are the ONNX file's module paths (`conv1`,
`blocks.3.attn.fsmn_block`, `quantizer.project_in`, ...). `sanitize` also
accepts the `s3tokenizer` PyTorch state dict (`encoder.` prefix,
`quantizer._codebook.project_down`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

_ROPE_DIM = 64
_FSQ_SCALE = float(np.float32(0.999))


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    """S3 tokenizer v2 sizes (the released file: 128 mels, 1280 wide, 20 heads, 6 blocks)."""

    n_mels: int = 128
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 6
    fsmn_kernel: int = 31
    fsq_dim: int = 8
    fsq_levels: int = 3
    rope_theta: float = 10000.0

    @property
    def codebook_size(self) -> int:
        return self.fsq_levels**self.fsq_dim

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeechTokenizerConfig:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_weights(cls, weights: dict[str, Any]) -> SpeechTokenizerConfig:
        """Infer the sizes from ONNX-derived weights (or the `s3tokenizer` state dict)."""
        w = _canonical_names(weights)
        if "conv1.weight" not in w or "blocks.0.attn.query.weight" not in w:
            raise ValueError("not S3 tokenizer v2 weights: conv1 / blocks.0.attn.query missing")
        conv1 = np.asarray(w["conv1.weight"])
        n_layer = 0
        while f"blocks.{n_layer}.attn.query.weight" in w:
            n_layer += 1
        n_state = conv1.shape[0]
        fsmn = np.asarray(w["blocks.0.attn.fsmn_block.weight"])
        return cls(
            n_mels=conv1.shape[1],
            n_state=n_state,
            n_head=n_state // _ROPE_DIM,
            n_layer=n_layer,
            fsmn_kernel=fsmn.shape[-1],
            fsq_dim=np.asarray(w["quantizer.project_in.weight"]).shape[0],
        )


def _canonical_names(weights: dict[str, Any]) -> dict[str, Any]:
    """`s3tokenizer` state-dict names -> the ONNX module paths used here."""
    out = {}
    for k, v in weights.items():
        if k.startswith("encoder."):
            k = k[len("encoder.") :]
        k = k.replace("quantizer._codebook.project_down.", "quantizer.project_in.")
        out[k] = v
    return out


@functools.lru_cache(maxsize=4)
def _rope_table(length: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (length, 64) as `s3tokenizer.precompute_freqs_cis(64, ...)` builds them (float32 angles)."""
    f32 = np.float32
    exponents = np.arange(0, _ROPE_DIM, 2, dtype=f32)[: _ROPE_DIM // 2] / f32(_ROPE_DIM)
    inv_freq = (f32(1.0) / (f32(theta) ** exponents.astype(np.float64)).astype(f32)).astype(f32)
    angles = np.outer(np.arange(length, dtype=f32), inv_freq).astype(f32).astype(np.float64)
    cos, sin = np.cos(angles).astype(f32), np.sin(angles).astype(f32)
    return np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)


def _rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotary embedding on (B, T, H, 64): `x * cos + rotate_half(x) * sin`."""
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


@mx.compile
def _fsmn_taps(padded: mx.array, v: mx.array, taps: mx.array) -> mx.array:
    """`v + sum_j padded[:, j : j + T] * taps[:, j]`: the FSMN's depthwise kernel as fused shifted products.

    Compiled into one kernel: on CPU, faster than separate ops or a grouped conv.
    """
    t = v.shape[1]
    out = v
    for j in range(taps.shape[1]):
        out = out + padded[:, j : j + t, :] * taps[:, j]
    return out


class FSMNMultiHeadAttention(nn.Module):
    """v2's attention: rotary positions on q and k, and the FSMN memory added to the output.
    With `kernel` 0 it is v1's plain attention (no FSMN; positions are added to the input,
    and `__call__` gets no rotary table)."""

    def __init__(self, n_state: int, n_head: int, kernel: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)
        if kernel:
            self.fsmn_block = nn.Conv1d(n_state, n_state, kernel, groups=n_state, bias=False)
        self.left = (kernel - 1) // 2
        self.right = kernel - 1 - self.left

    def fsmn(self, v: mx.array, mask_pad: mx.array) -> mx.array:
        """Depthwise convolution over time of the masked values, plus the values, masked."""
        v = v * mask_pad
        vp = mx.pad(v, [(0, 0), (self.left, self.right), (0, 0)])
        return _fsmn_taps(vp, v, self.fsmn_block.weight[:, :, 0]) * mask_pad

    def __call__(
        self,
        x: mx.array,
        bias: mx.array | None,
        mask_pad: mx.array,
        cos: mx.array | None,
        sin: mx.array | None,
    ) -> mx.array:
        b, t, d = x.shape
        dh = d // self.n_head
        q = self.query(x).reshape(b, t, self.n_head, dh)
        k = self.key(x).reshape(b, t, self.n_head, dh)
        v = self.value(x)
        if cos is not None:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        memory = self.fsmn(v, mask_pad) if "fsmn_block" in self else None
        scale = dh**-0.25
        q = q.transpose(0, 2, 1, 3) * scale
        k = k.transpose(0, 2, 3, 1) * scale
        scores = q @ k
        if bias is not None:
            scores = scores + bias
        weights = mx.softmax(scores, axis=-1)
        wv = (
            (weights @ v.reshape(b, t, self.n_head, dh).transpose(0, 2, 1, 3))
            .transpose(0, 2, 1, 3)
            .reshape(b, t, d)
        )
        return self.out(wv) if memory is None else self.out(wv) + memory


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, kernel: int):
        super().__init__()
        self.attn = FSMNMultiHeadAttention(n_state, n_head, kernel)
        self.attn_ln = nn.LayerNorm(n_state, eps=1e-5)
        self.mlp = [nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state)]
        self.mlp_ln = nn.LayerNorm(n_state, eps=1e-5)

    def __call__(
        self,
        x: mx.array,
        bias: mx.array | None,
        mask_pad: mx.array,
        cos: mx.array | None = None,
        sin: mx.array | None = None,
    ) -> mx.array:
        x = x + self.attn(self.attn_ln(x), bias, mask_pad, cos, sin)
        h = self.mlp_ln(x)
        for layer in self.mlp:
            h = layer(h)
        return x + h


class FSQuantizer(nn.Module):
    def __init__(self, n_state: int, dim: int, levels: int):
        super().__init__()
        self.project_in = nn.Linear(n_state, dim)
        self.levels = levels

    def __call__(self, x: mx.array) -> mx.array:
        h = mx.tanh(self.project_in(x)) * _FSQ_SCALE
        digits = mx.round(h) + 1
        powers = mx.array([float(self.levels**i) for i in range(digits.shape[-1])])
        return mx.sum(digits * powers, axis=-1).astype(mx.int32)


def _conv_len(n: mx.array | int, stride: int = 2) -> mx.array | int:
    """Output length of a kernel-3, padding-1 convolution of `stride`."""
    return (n - 1) // stride + 1


def _conv_front(
    model: nn.Module, mel: mx.array, mel_len: mx.array | None, stride1: int
) -> tuple[mx.array, mx.array, mx.array, mx.array | None]:
    """Both tokenizers' front: `conv1` (stride `stride1`) and `conv2` (stride 2), each with
    GELU on the masked input. Returns the states (B, T', n_state), their lengths, the
    padding mask (B, T', 1) and the attention bias of padded keys (None without padding)."""
    b, _, t = mel.shape
    if mel_len is None:
        mel_len = mx.full((b,), t, dtype=mx.int32)
    mel_len = mel_len.astype(mx.int32)
    x = mel.astype(mx.float32).transpose(0, 2, 1)
    mask = (mx.arange(t)[None, :] < mel_len[:, None])[..., None]
    x = nn.gelu(model.conv1(x * mask))
    len1, t1 = _conv_len(mel_len, stride1), _conv_len(t, stride1)
    mask = (mx.arange(t1)[None, :] < len1[:, None])[..., None]
    x = nn.gelu(model.conv2(x * mask))
    len2, t2 = _conv_len(len1), _conv_len(t1)
    valid = mx.arange(t2)[None, :] < len2[:, None]  # (B, T')
    bias = None
    if not bool(mx.all(valid)):
        bias = ((1.0 - valid.astype(mx.float32)) * -1.0e10)[:, None, None, :]
    return x, len2, valid[..., None].astype(mx.float32), bias


class SpeechTokenizerV2(nn.Module):
    """(B, n_mels, T) log-mel and lengths -> (B, ceil(ceil(T/2)/2)) tokens in [0, 6561) and token lengths."""

    def __init__(self, config: SpeechTokenizerConfig = SpeechTokenizerConfig()):
        super().__init__()
        if config.n_state // config.n_head != _ROPE_DIM:
            raise ValueError(
                f"head size must be {_ROPE_DIM}, got {config.n_state // config.n_head}"
            )
        self.config = config
        self.conv1 = nn.Conv1d(config.n_mels, config.n_state, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(config.n_state, config.n_state, 3, stride=2, padding=1)
        self.blocks = [
            ResidualAttentionBlock(config.n_state, config.n_head, config.fsmn_kernel)
            for _ in range(config.n_layer)
        ]
        self.quantizer = FSQuantizer(config.n_state, config.fsq_dim, config.fsq_levels)

    def encode(self, mel: mx.array, mel_len: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """The encoder: hidden states (B, T', n_state) and their lengths."""
        x, len2, mask_pad, bias = _conv_front(self, mel, mel_len, 2)
        t2 = x.shape[1]
        cos_np, sin_np = _rope_table(max(2048, t2), self.config.rope_theta)
        cos = mx.array(cos_np[:t2])[None, :, None, :]
        sin = mx.array(sin_np[:t2])[None, :, None, :]
        for block in self.blocks:
            x = block(x, bias, mask_pad, cos, sin)
        return x, len2

    def __call__(self, mel: mx.array, mel_len: mx.array | None = None) -> tuple[mx.array, mx.array]:
        hidden, lengths = self.encode(mel, mel_len)
        return self.quantizer(hidden), lengths

    # -- weights ---------------------------------------------------------

    @staticmethod
    def sanitize(weights: dict[str, Any]) -> dict[str, mx.array]:
        """ONNX-derived (or `s3tokenizer` state-dict) weights, PyTorch layouts -> this model's parameters."""
        out = {}
        for k, v in _canonical_names(weights).items():
            v = np.asarray(v, dtype=np.float32)
            if k.endswith(".weight") and v.ndim == 3:
                v = v.transpose(0, 2, 1)  # conv (out, in/groups, k) -> (out, k, in/groups)
            out[k] = mx.array(v)
        return out

    @classmethod
    def from_weights(cls, weights: dict[str, Any]) -> SpeechTokenizerV2:
        """Build, sanitize and load strictly (every parameter given, none left over)."""
        model = cls(SpeechTokenizerConfig.from_weights(weights))
        model.load_weights(list(cls.sanitize(weights).items()), strict=True)
        mx.eval(model.parameters())
        return model

    @classmethod
    def from_onnx(cls, path: str) -> SpeechTokenizerV2:
        """Load `speech_tokenizer_v2.onnx` through the protobuf reader (no ONNX runtime)."""
        from cosyvoice2.onnx_weights import read_onnx_weights

        return cls.from_weights(read_onnx_weights(path))


# -- the first generation's tokenizer (v1) ------------------------------------------------


@dataclass(frozen=True)
class SpeechTokenizerV1Config:
    """S3 tokenizer v1 sizes (`s3tokenizer`'s `S3Tokenizer`): 128 mels, 1280 wide, 20 heads,
    6 blocks, 4096 codes; `stride` 1 for the 50 Hz tokenizer (`speech_tokenizer_v1`), 2 for
    the 25 Hz one (`speech_tokenizer_v1_25hz`)."""

    n_mels: int = 128
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 6
    codebook_size: int = 4096
    stride: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=4)
def _sinusoids(length: int, channels: int) -> np.ndarray:
    """Whisper's absolute positional embedding `(length, channels)` (sin half, cos half), float32
    as `s3tokenizer.model.sinusoids` computes it."""
    f32 = np.float32
    step = np.log(10000) / (channels // 2 - 1)
    inv = np.exp((f32(-step) * np.arange(channels // 2, dtype=f32)).astype(f32)).astype(f32)
    t = np.arange(length, dtype=f32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(f32)


class VectorQuantizer(nn.Module):
    """v1's quantizer: the L2-normalised state's nearest codebook row (`embed`, Euclidean)."""

    def __init__(self, n_state: int, codebook_size: int):
        super().__init__()
        self.embed = mx.zeros((codebook_size, n_state))

    def __call__(self, x: mx.array) -> mx.array:
        norm = mx.maximum(mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True)), 1e-12)
        x = x / norm
        e = self.embed
        dist = -(mx.sum(x * x, axis=-1, keepdims=True) - 2 * (x @ e.T) + mx.sum(e * e, axis=-1))
        return mx.argmax(dist, axis=-1).astype(mx.int32)


class SpeechTokenizerV1(nn.Module):
    """(B, n_mels, T) log-mel and lengths -> v1 tokens in [0, 4096) and token lengths: the
    Whisper encoder (convolutions, absolute sinusoidal positions, plain attention blocks) and
    a Euclidean codebook (`s3tokenizer.model.S3Tokenizer`)."""

    def __init__(self, config: SpeechTokenizerV1Config = SpeechTokenizerV1Config()):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.n_mels, config.n_state, 3, stride=config.stride, padding=1)
        self.conv2 = nn.Conv1d(config.n_state, config.n_state, 3, stride=2, padding=1)
        self.blocks = [
            ResidualAttentionBlock(config.n_state, config.n_head, 0) for _ in range(config.n_layer)
        ]
        self.quantizer = VectorQuantizer(config.n_state, config.codebook_size)

    def encode(self, mel: mx.array, mel_len: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """The encoder: hidden states (B, T', n_state) and their lengths."""
        x, len2, mask_pad, bias = _conv_front(self, mel, mel_len, self.config.stride)
        t2 = x.shape[1]
        x = x + mx.array(_sinusoids(max(1500, t2), self.config.n_state)[:t2])
        for block in self.blocks:
            x = block(x, bias, mask_pad)
        return x, len2

    def __call__(self, mel: mx.array, mel_len: mx.array | None = None) -> tuple[mx.array, mx.array]:
        hidden, lengths = self.encode(mel, mel_len)
        return self.quantizer(hidden), lengths

    @staticmethod
    def sanitize(weights: dict[str, Any]) -> dict[str, mx.array]:
        """`s3tokenizer` v1 state dict (PyTorch layouts) -> this model's parameters (its
        positional table is computed, not read)."""
        out = {}
        for k, v in weights.items():
            k = k.removeprefix("encoder.").replace("quantizer._codebook.embed", "quantizer.embed")
            if k == "positional_embedding":
                continue
            v = np.asarray(v, dtype=np.float32)
            if k.endswith(".weight") and v.ndim == 3:
                v = v.transpose(0, 2, 1)
            out[k] = mx.array(v)
        return out


def speech_tokens(model: SpeechTokenizerV2, speech_16k: mx.array | np.ndarray) -> mx.array:
    """The official `_extract_speech_token`: 128-bin Whisper log-mel, tokenizer -> (1, T') int32 tokens."""
    from cosyvoice2.frontend.features import whisper_log_mel

    mel = whisper_log_mel(speech_16k, n_mels=model.config.n_mels)
    codes, _ = model(mel[None])
    return codes
