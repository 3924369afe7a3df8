"""The CFM's fixed starting noise, the official one, computed without torch.

The official `CausalConditionalCFM.__init__` calls `set_all_random_seed(0)` and
draws `torch.randn([1, 80, 50 * 300])` once; every inference starts from its
first T frames. Torch's CPU generator for this call is reproduced in numpy:

1. MT19937 seeded with the classic `init_genrand(0)`, 32-bit outputs;
2. each output to a float32 uniform `(x & 0xFFFFFF) * 2**-24`;
3. Box-Muller in blocks of 16 uniforms `d[0:16]`: `u1 = 1 - d[0:8]`, `u2 = d[8:16]`,
   `r = sqrt(-2 ln u1)`, `theta = 2 pi u2`; the block becomes `r cos theta`
   (first 8) then `r sin theta` (last 8). (Torch's vectorised path, used for
   float32 tensors of at least 16 elements whose size is a multiple of 16.)

The result equals torch's within 4.8e-7 (float32 rounding of log/cos/sin; tested
against torch in `tests/test_flow_noise.py`).

Why computed rather than shipped: it is computed once per process (cached here)
instead of shipping a float32 asset of the whole buffer in the package; and an fp16
or compressed copy would not be the same numbers. No global random state is touched: the
generator is a local `numpy.random.MT19937`.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

MEL_CHANNELS = 80
MAX_FRAMES = 50 * 300  # the official buffer: 300 s at 50 frames per second


def torch_randn_seed0(n: int) -> np.ndarray:
    """The first `n` values of `torch.manual_seed(0); torch.randn(n)` (n a multiple of 16), float32."""
    if n % 16:
        raise ValueError("n must be a multiple of 16 (torch's vectorised normal path)")
    bitgen = np.random.MT19937()
    bitgen._legacy_seeding(0)  # init_genrand(0), as torch's CPU generator seeds MT19937
    raw = bitgen.random_raw(n).astype(np.uint32)
    u = ((raw & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)).reshape(-1, 16)
    u1 = np.float32(1.0) - u[:, :8]
    u2 = u[:, 8:]
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    theta = np.float32(2.0 * np.pi) * u2
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1).reshape(n)


@functools.lru_cache(maxsize=1)
def _noise_channels_last() -> mx.array:
    noise = torch_randn_seed0(MEL_CHANNELS * MAX_FRAMES).reshape(MEL_CHANNELS, MAX_FRAMES)
    return mx.array(np.ascontiguousarray(noise.T))[None]


def cfm_noise(frames: int) -> mx.array:
    """The official starting noise for `frames` mel frames, channels-last `(1, frames, 80)`.

    Equals the official `rand_noise[:, :, :frames]` transposed.
    """
    if frames > MAX_FRAMES:
        raise ValueError(f"at most {MAX_FRAMES} frames (300 s) of fixed noise, asked for {frames}")
    return _noise_channels_last()[:, :frames]
