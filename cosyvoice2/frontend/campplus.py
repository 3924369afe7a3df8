"""CAM++ speaker embedding (3D-Speaker's `CAMPPlus`, as in `campplus.onnx`) in MLX.

Input: the mean-normalised 80-bin Kaldi fbank of 16 kHz speech (B, T, 80)
(`features.campplus_features`); output: the 192-d speaker embedding (B, 192)
that CosyVoice2 feeds to its LLM and flow.

Module and parameter names are those of 3D-Speaker's PyTorch model
(`head.layer1.0.conv1`, `xvector.block2.tdnnd5.cam_layer.linear_local`, ...),
which are also the module paths of the ONNX export. The network here is the
inference form the exporter produces: every batch norm that directly follows a
convolution is folded into it (that convolution has a bias), so the only batch
norms left are the ones applied to concatenated features (`nonlinear1` of each
dense layer and `nonlinear` of each transit layer). `CAMPPlus.sanitize` takes
either the ONNX-derived weights (`cosyvoice2.onnx_weights`), which are already
folded, or a PyTorch `state_dict` (numpy arrays), which it folds, and turns
PyTorch's channel-first kernels into MLX's channel-last ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

_BN_EPS = 1e-5


@dataclass(frozen=True)
class CAMPPlusConfig:
    """3D-Speaker `CAMPPlus` hyperparameters (CosyVoice2's `campplus.onnx` uses these defaults)."""

    feat_dim: int = 80
    embedding_size: int = 192
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
    m_channels: int = 32
    num_layers: tuple[int, ...] = (12, 24, 16)
    dilations: tuple[int, ...] = (1, 2, 2)
    kernel_size: int = 3
    seg_len: int = 100

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CAMPPlusConfig:
        names = cls.__dataclass_fields__
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_weights(cls, weights: dict[str, Any]) -> CAMPPlusConfig:
        """Infer the configuration from PyTorch-layout weights (ONNX-derived or a `state_dict`)."""
        num_layers = []
        block = 1
        while any(k.startswith(f"xvector.block{block}.tdnnd1.") for k in weights):
            n = 0
            while any(k.startswith(f"xvector.block{block}.tdnnd{n + 1}.") for k in weights):
                n += 1
            num_layers.append(n)
            block += 1
        if not num_layers:
            raise ValueError("not CAM++ weights: no xvector.block1.tdnnd1.* parameters")
        conv1 = np.asarray(weights["head.conv1.weight"])
        local = np.asarray(weights["xvector.block1.tdnnd1.cam_layer.linear_local.weight"])
        lin1 = np.asarray(weights["xvector.block1.tdnnd1.linear1.weight"])
        tdnn = np.asarray(weights["xvector.tdnn.linear.weight"])
        dense = np.asarray(weights["xvector.dense.linear.weight"])
        growth = local.shape[0]
        bn_channels = lin1.shape[0]
        m_channels = conv1.shape[0]
        head_out = tdnn.shape[1]
        return cls(
            feat_dim=head_out // m_channels * 8,
            embedding_size=dense.shape[0],
            growth_rate=growth,
            bn_size=bn_channels // growth,
            init_channels=tdnn.shape[0],
            m_channels=m_channels,
            num_layers=tuple(num_layers),
            dilations=cls.dilations if len(num_layers) == 3 else tuple([1] * len(num_layers)),
        )


# ---------------------------------------------------------------------------
# Building blocks (channel-last: 2-D maps are (B, F, T, C), sequences (B, T, C))


class BatchNorm(nn.Module):
    """Inference batch norm over the last axis with PyTorch's parameter names."""

    def __init__(self, channels: int, affine: bool = True):
        super().__init__()
        if affine:
            self.weight = mx.ones((channels,))
            self.bias = mx.zeros((channels,))
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        y = (x - self.running_mean) * mx.rsqrt(self.running_var + _BN_EPS)
        if "weight" in self:
            y = y * self.weight + self.bias
        return y


class Conv1d(nn.Module):
    """1-D convolution on (B, T, C) with an MLX (out, k, in) weight; dilated kernels run as shifted matmuls."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = False,
    ):
        super().__init__()
        self.weight = mx.zeros((cout, kernel, cin))
        if bias:
            self.bias = mx.zeros((cout,))
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def __call__(self, x: mx.array) -> mx.array:
        k = self.weight.shape[1]
        if k == 1 and self.stride == 1:
            y = x @ self.weight[:, 0, :].T
        elif self.dilation == 1:
            y = mx.conv1d(x, self.weight, stride=self.stride, padding=self.padding)
        else:  # MLX's dilated conv is slow on CPU; k shifted matmuls are exact and fast
            if self.stride != 1:
                raise NotImplementedError("strided dilated convolution")
            t = x.shape[1]
            xp = mx.pad(x, [(0, 0), (self.padding, self.padding), (0, 0)])
            out_len = t + 2 * self.padding - self.dilation * (k - 1)
            y = None
            for j in range(k):
                start = j * self.dilation
                term = xp[:, start : start + out_len, :] @ self.weight[:, j, :].T
                y = term if y is None else y + term
        if "bias" in self:
            y = y + self.bias
        return y


class Conv2d(nn.Module):
    """2-D convolution on (B, H, W, C) with an MLX (out, kh, kw, in) weight and an optional bias."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: tuple[int, int] = (1, 1),
        padding: int = 0,
        bias: bool = True,
    ):
        super().__init__()
        self.weight = mx.zeros((cout, kernel, kernel, cin))
        if bias:
            self.bias = mx.zeros((cout,))
        self.stride, self.padding = stride, padding

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        if "bias" in self:
            y = y + self.bias
        return y


class BasicResBlock(nn.Module):
    """FCM residual block; `bn1`/`bn2`/`shortcut.1` are folded into `conv1`/`conv2`/`shortcut.0`."""

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = Conv2d(cin, planes, 3, stride=(stride, 1), padding=1)
        self.conv2 = Conv2d(planes, planes, 3, padding=1)
        self.shortcut = (
            [Conv2d(cin, planes, 1, stride=(stride, 1))] if stride != 1 or cin != planes else []
        )

    def __call__(self, x: mx.array) -> mx.array:
        out = self.conv2(nn.relu(self.conv1(x)))
        out = out + (self.shortcut[0](x) if self.shortcut else x)
        return nn.relu(out)


class FCM(nn.Module):
    """The 2-D convolutional front end: (B, T, F) fbank -> (B, T, m_channels * F / 8)."""

    def __init__(self, m_channels: int = 32):
        super().__init__()
        self.conv1 = Conv2d(1, m_channels, 3, padding=1)
        self.layer1 = [
            BasicResBlock(m_channels, m_channels, 2),
            BasicResBlock(m_channels, m_channels, 1),
        ]
        self.layer2 = [
            BasicResBlock(m_channels, m_channels, 2),
            BasicResBlock(m_channels, m_channels, 1),
        ]
        self.conv2 = Conv2d(m_channels, m_channels, 3, stride=(2, 1), padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = x.transpose(0, 2, 1)[..., None]  # (B, F, T, 1): PyTorch's (B, 1, F, T) channel-last
        out = nn.relu(self.conv1(x))
        for block in self.layer1 + self.layer2:
            out = block(out)
        out = nn.relu(self.conv2(out))  # (B, F/8, T, C)
        b, f, t, c = out.shape
        return out.transpose(0, 2, 3, 1).reshape(b, t, c * f)  # PyTorch's (B, C*F, T), time-major


class TDNNLayer(nn.Module):
    """`linear` (its batch norm folded in) then ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.linear = Conv1d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.relu(self.linear(x))


class Nonlinear(nn.Module):
    """`get_nonlinear('batchnorm-relu')` for a batch norm that cannot be folded."""

    def __init__(self, channels: int):
        super().__init__()
        self.batchnorm = BatchNorm(channels)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.relu(self.batchnorm(x))


class CAMLayer(nn.Module):
    """Context-aware masking: a local conv scaled by a sigmoid of global + segment-mean context."""

    def __init__(
        self, bn_channels: int, out_channels: int, kernel: int, dilation: int, seg_len: int
    ):
        super().__init__()
        self.linear_local = Conv1d(
            bn_channels,
            out_channels,
            kernel,
            padding=(kernel - 1) // 2 * dilation,
            dilation=dilation,
        )
        self.linear1 = Conv1d(bn_channels, bn_channels // 2, 1, bias=True)
        self.linear2 = Conv1d(bn_channels // 2, out_channels, 1, bias=True)
        self.seg_len = seg_len

    def seg_pooling(self, x: mx.array) -> mx.array:
        """Mean over consecutive segments of `seg_len` frames (the last one partial), spread back over them."""
        b, t, c = x.shape
        n = math.ceil(t / self.seg_len)
        xp = mx.pad(x, [(0, 0), (0, n * self.seg_len - t), (0, 0)])
        sums = xp.reshape(b, n, self.seg_len, c).sum(axis=2)
        counts = np.full((n,), self.seg_len, dtype=np.float32)
        counts[-1] = t - (n - 1) * self.seg_len
        means = sums / mx.array(counts)[None, :, None]
        spread = mx.broadcast_to(means[:, :, None, :], (b, n, self.seg_len, c)).reshape(
            b, n * self.seg_len, c
        )
        return spread[:, :t, :]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear_local(x)
        context = mx.mean(x, axis=1, keepdims=True) + self.seg_pooling(x)
        context = nn.relu(self.linear1(context))
        return y * mx.sigmoid(self.linear2(context))


class CAMDenseTDNNLayer(nn.Module):
    def __init__(
        self, cin: int, cout: int, bn_channels: int, kernel: int, dilation: int, seg_len: int
    ):
        super().__init__()
        self.nonlinear1 = Nonlinear(cin)
        self.linear1 = Conv1d(cin, bn_channels, 1, bias=True)  # `nonlinear2`'s batch norm folded in
        self.cam_layer = CAMLayer(bn_channels, cout, kernel, dilation, seg_len)

    def __call__(self, x: mx.array) -> mx.array:
        return self.cam_layer(nn.relu(self.linear1(self.nonlinear1(x))))


class TransitLayer(nn.Module):
    def __init__(self, cin: int, cout: int, folded_bias: bool):
        super().__init__()
        self.nonlinear = Nonlinear(cin)
        self.linear = Conv1d(cin, cout, 1, bias=folded_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(self.nonlinear(x))


class DenseLayer(nn.Module):
    """`linear` on the pooled statistics with the affine-free batch norm folded in."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = Conv1d(cin, cout, 1, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x)


class XVector(nn.Module):
    def __init__(self, config: CAMPPlusConfig, channels: int):
        super().__init__()
        c = config
        self.tdnn = TDNNLayer(channels, c.init_channels, 5, stride=2)
        channels = c.init_channels
        for i, (n, dilation) in enumerate(zip(c.num_layers, c.dilations), start=1):
            layers = {
                f"tdnnd{j + 1}": CAMDenseTDNNLayer(
                    channels + j * c.growth_rate,
                    c.growth_rate,
                    c.bn_size * c.growth_rate,
                    c.kernel_size,
                    dilation,
                    c.seg_len,
                )
                for j in range(n)
            }
            setattr(self, f"block{i}", layers)
            channels += n * c.growth_rate
            last = i == len(c.num_layers)
            setattr(self, f"transit{i}", TransitLayer(channels, channels // 2, folded_bias=last))
            channels //= 2
        self.dense = DenseLayer(channels * 2, c.embedding_size)
        self.num_blocks = len(c.num_layers)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.tdnn(x)
        for i in range(1, self.num_blocks + 1):
            block = getattr(self, f"block{i}")
            for j in range(1, len(block) + 1):
                x = mx.concatenate([x, block[f"tdnnd{j}"](x)], axis=-1)
            x = getattr(self, f"transit{i}")(x)
        x = nn.relu(x)  # `out_nonlinear`, its batch norm folded into the last transit's conv
        t = x.shape[1]
        mean = mx.mean(x, axis=1)
        std = mx.sqrt(mx.sum((x - mean[:, None, :]) ** 2, axis=1) / (t - 1))
        stats = mx.concatenate([mean, std], axis=-1)[:, None, :]
        return self.dense(stats)[:, 0, :]


class CAMPPlus(nn.Module):
    """CAM++: (B, T, 80) mean-normalised fbank -> (B, 192) speaker embedding."""

    def __init__(self, config: CAMPPlusConfig = CAMPPlusConfig()):
        super().__init__()
        self.config = config
        self.head = FCM(config.m_channels)
        self.xvector = XVector(config, config.m_channels * (config.feat_dim // 8))

    def __call__(self, feats: mx.array) -> mx.array:
        if feats.ndim != 3 or feats.shape[-1] != self.config.feat_dim:
            raise ValueError(
                f"CAM++ expects (batch, frames, {self.config.feat_dim}) features, got {tuple(feats.shape)}"
            )
        return self.xvector(self.head(feats.astype(mx.float32)))

    # -- weights ---------------------------------------------------------

    def fold_pairs(self) -> list[tuple[str, str]]:
        """(conv, batch norm) module pairs whose batch norm is folded into the conv in this model."""
        pairs = [("head.conv1", "head.bn1"), ("head.conv2", "head.bn2")]
        for layer in ("layer1", "layer2"):
            for i in range(2):
                p = f"head.{layer}.{i}"
                pairs += [
                    (f"{p}.conv1", f"{p}.bn1"),
                    (f"{p}.conv2", f"{p}.bn2"),
                    (f"{p}.shortcut.0", f"{p}.shortcut.1"),
                ]
        pairs.append(("xvector.tdnn.linear", "xvector.tdnn.nonlinear.batchnorm"))
        for i, n in enumerate(self.config.num_layers, start=1):
            for j in range(1, n + 1):
                p = f"xvector.block{i}.tdnnd{j}"
                pairs.append((f"{p}.linear1", f"{p}.nonlinear2.batchnorm"))
        last = len(self.config.num_layers)
        pairs.append((f"xvector.transit{last}.linear", "xvector.out_nonlinear.batchnorm"))
        pairs.append(("xvector.dense.linear", "xvector.dense.nonlinear.batchnorm"))
        return pairs

    def sanitize(self, weights: dict[str, Any]) -> dict[str, mx.array]:
        """Map ONNX-derived or PyTorch `state_dict` weights (numpy, PyTorch layouts) onto this model.

        Folds every batch norm of `fold_pairs` that is present (a PyTorch state
        dict; in the ONNX file the exporter has already folded all but the
        affine-free last one), drops `num_batches_tracked`, and moves kernels to
        MLX's channel-last layout.
        """
        w = {
            k: np.asarray(v, dtype=np.float64)
            for k, v in weights.items()
            if not k.endswith("num_batches_tracked")
        }
        for conv, bn in self.fold_pairs():
            if f"{bn}.running_mean" not in w:
                continue
            mean, var = w.pop(f"{bn}.running_mean"), w.pop(f"{bn}.running_var")
            gamma = w.pop(f"{bn}.weight", np.ones_like(mean))
            beta = w.pop(f"{bn}.bias", np.zeros_like(mean))
            scale = gamma / np.sqrt(var + _BN_EPS)
            kernel = w[f"{conv}.weight"]
            w[f"{conv}.weight"] = kernel * scale.reshape((-1,) + (1,) * (kernel.ndim - 1))
            w[f"{conv}.bias"] = (w.get(f"{conv}.bias", 0.0) - mean) * scale + beta
        out = {}
        for k, v in w.items():
            if k.endswith(".weight") and v.ndim == 4:
                v = v.transpose(0, 2, 3, 1)  # (out, in, kh, kw) -> (out, kh, kw, in)
            elif k.endswith(".weight") and v.ndim == 3:
                v = v.transpose(0, 2, 1)  # (out, in, k) -> (out, k, in)
            out[k] = mx.array(v.astype(np.float32))
        return out

    @classmethod
    def from_weights(cls, weights: dict[str, Any]) -> CAMPPlus:
        """Build, sanitize and load strictly (every parameter must be given, none left over)."""
        model = cls(CAMPPlusConfig.from_weights(weights))
        model.load_weights(list(model.sanitize(weights).items()), strict=True)
        mx.eval(model.parameters())
        return model

    @classmethod
    def from_onnx(cls, path: str) -> CAMPPlus:
        """Load `campplus.onnx` through the protobuf reader (no ONNX runtime)."""
        from cosyvoice2.onnx_weights import read_onnx_weights

        return cls.from_weights(read_onnx_weights(path))


def speaker_embedding(model: CAMPPlus, speech_16k: mx.array | np.ndarray) -> mx.array:
    """The official `_extract_spk_embedding`: fbank, mean removal, CAM++ -> (1, 192)."""
    from cosyvoice2.frontend.features import campplus_features

    return model(campplus_features(speech_16k)[None])
