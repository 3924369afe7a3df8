"""CosyVoice2's flow matching in MLX: speech tokens to 80-bin mel at 50 Hz.

Modules (each ports the official file of the same name, names kept so the
`flow.pt` keys map one to one):

- `flow.py`: `CausalMaskedDiffWithXvec` (embeddings, encoder, CFM; `inference`, `sanitize`);
- `encoder.py`: `UpsampleConformerEncoder` with `PreLookaheadLayer`, `Upsample1D`,
  espnet relative-position attention;
- `flow_matching.py`: `CausalConditionalCFM` (Euler, cosine schedule, batched CFG);
- `decoder.py`: the U-Net estimator (`CausalConditionalDecoder`);
- `transformer.py`: its transformer block (`BasicTransformerBlock`, diffusers' `Attention`);
- `noise.py`: the official fixed starting noise, computed without torch;
- `ops.py`: convolution, mask and activation helpers (CPU kernels or MLX ops);
- `cache.py`: the O(n) streaming state (`ChunkCache`, `FlowState`) and `flow_step`;
- the numba row kernels for softmax, GELU, SiLU, Mish and LayerNorm are
  `cosyvoice2.row_kernels`, used on the CPU without the optional `cosyvoice2_kernels`
  extension (with it, the extension's operations and MLX's); which run is
  `cosyvoice2.backend`'s choice.

Layout is channels-last throughout (`(B, T, C)`); `inference` returns `(1, T, 80)`.

Streaming: `inference(..., streaming=True, finalize=False)` is the official
chunked path (chunk-masked attention in encoder and estimator, 3 look-ahead
tokens used as context, not as output). The O(n) variant runs the same modules
with a streaming cache passed in (`cache=`, `caches=`; `cache.flow_step`), as
mlx-lm's layers take their KV cache; without one a call is the whole utterance.

Where the time goes (full size, one CFG estimator call = one Euler step, batch 2
x 400 frames, i.e. a 3 s prompt + 5 s of speech). Measured times belong in the
bench's results files (`bench/README.md`); this is what they are made of:

- Work (from the shapes): about 71 G multiply-adds per step, most of it in the 56
  transformer blocks (q/k/v and output projections, feed-forward, and attention
  scores and values at 400 frames), the rest in the 14 causal resnet blocks; ten
  steps, plus the encoder once.
- MLX's own element-wise transcendentals (`exp`, `erf`, `tanh`, `sigmoid`,
  `logaddexp`) are slow paths on this CPU, orders of magnitude slower per element
  than an add, and each step needs about 143 M softmax exponentials, 46 M GELUs and
  6 M Mish values: with MLX ops they, not the GEMMs, dominated a step. The numba
  kernels (`cosyvoice2.row_kernels`) compute them within 1.5e-6 of the exact functions; the
  call is then GEMM-bound.
- Two cores: batched, only the GEMMs used both (OpenBLAS threads) while MLX's
  element-wise ops and the kernel hand-offs ran on one, the other spinning. So the
  two CFG branches run on two threads with single-threaded BLAS
  (`cosyvoice2.branches`).
- Few frames (the streaming cache's calls: 50-70 new frames on a cached prompt):
  fixed costs per call (dispatch, layout copies, hand-offs) weigh more than at 400
  frames. With the optional extension (`kernels/`), each transformer block is one
  `transformer_block` node (panel GEMM over weights packed once, block attention over
  the cached keys/values, LayerNorm and GELU in C++, residuals in place) and the
  remaining projections and row ops are extension nodes too, so a step is built
  lazily without a numba hand-off. Without the extension: numba kernels and MLX
  matmuls (OpenBLAS re-packing every weight per call).
- In fp32 with the official algorithm the flow is bound by the machine's GEMM
  rate; fewer steps (`n_timesteps`) scale its cost linearly (bf16 and int8 matmuls
  are slower paths still on MLX-CPU).
"""

from cosyvoice2.flow.decoder import CausalConditionalDecoder
from cosyvoice2.flow.encoder import UpsampleConformerEncoder
from cosyvoice2.flow.flow import CausalMaskedDiffWithXvec
from cosyvoice2.flow.flow_matching import CausalConditionalCFM
from cosyvoice2.flow.noise import cfm_noise

__all__ = [
    "CausalConditionalCFM",
    "CausalConditionalDecoder",
    "CausalMaskedDiffWithXvec",
    "UpsampleConformerEncoder",
    "cfm_noise",
]
