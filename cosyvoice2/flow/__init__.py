"""CosyVoice2's flow matching in MLX: speech tokens to 80-bin mel at 50 Hz.

Modules (each ports the official file of the same name, names kept so the
`flow.pt` keys map one to one):

- `flow.py`: `CausalMaskedDiffWithXvec` (embeddings, encoder, CFM; `inference`, `sanitize`);
- `encoder.py`: `UpsampleConformerEncoder` with `PreLookaheadLayer`, `Upsample1D`,
  espnet relative-position attention;
- `flow_matching.py`: `CausalConditionalCFM` (Euler, cosine schedule, batched CFG);
- `decoder.py`: the U-Net estimator (`CausalConditionalDecoder`, `ConditionalDecoder`);
- `noise.py`: the official fixed starting noise, computed without torch;
- `ops.py`: convolution, mask and activation helpers (CPU kernels or MLX ops);
- `cpu_kernels.py`: numba kernels for softmax, GELU, SiLU, Mish, LayerNorm (the
  optional `cosyvoice2_kernels` extension supersedes them in the estimator when built).

Layout is channels-last throughout (`(B, T, C)`); `inference` returns `(1, T, 80)`.

Streaming: `inference(..., streaming=True, finalize=False)` is the official
chunked path (chunk-masked attention in encoder and estimator, 3 look-ahead
tokens used as context, not as output). Every module call is a function of its
explicit inputs (no per-request state), so an incremental O(n) variant that
caches the prompt's and earlier chunks' per-layer state can be added beside it
and tested against it.

Where the time goes (full size, one CFG estimator call = one Euler step, batch 2
x 400 frames, i.e. a 3 s prompt + 5 s of speech; measured 2026-11-27 on the
2-core AVX2 x86_64 machine with OpenBLAS preloaded, while other jobs kept its
load average at 3-8, so single runs vary by +-30% and only interleaved
comparisons are meaningful):

- Work: about 71 G multiply-adds per step (142 GFLOP), 92% of it in the 56
  transformer blocks (q/k/v and output projections 36%, feed-forward 36%,
  attention scores and values 28% at 400 frames), the rest in the 14 causal
  resnet blocks. Ten steps are 1.42 TFLOP; the encoder adds about 20 GFLOP once.
- MLX's own element-wise transcendentals are the trap on this CPU: `exp` 50,
  `erf` 127, `tanh` 66, `sigmoid` 66, `logaddexp` 98 ns per element, against
  0.3 ns for an add. Each step needs 143 M softmax exponentials, 46 M GELUs and
  6 M Mish values: with MLX ops one estimator call took 32.6 s, 11.5 s with
  those functions replaced by ReLU (same loaded session). The numba kernels
  (`cpu_kernels`) compute them at 1-2 ns per element per thread, within 1.5e-6
  of the exact functions; the call is then GEMM-bound.
- One thread each (`OPENBLAS_NUM_THREADS=1`, torch 1 thread), CPU time of one
  estimator call, interleaved runs: ours 3.2-4.0 s, the official PyTorch
  2.6-3.9 s (ours 1.03-1.26x). Per transformer block: ours 52-60 ms (attention
  37-41: fused q/k/v GEMM 9-10, scores 6-7, softmax kernel 5-6, values 6.5-9,
  output projection 4.5-5; feed-forward 13.5-16), torch 46 ms (attention 30
  with its fused flash-attention kernel, feed-forward 14). Two threads each
  (load 2.4-3): ours 2.0-2.6 s wall per call, the official 1.7 s at best and
  13.4 s when its threads collapsed.
- Whole `inference`, 75 prompt + 125 new tokens, 10 steps: one thread each,
  ours 59 s (49.6 s CPU), official 37.5 s (33.9 s CPU); two threads each,
  interleaved, ours 44-80 s, official 134-220 s (its OpenMP threads wait on
  each other when the cores are shared). None of these are quiet-machine
  figures (NOTES.md: official 10.3 s there).
- Two cores: batched, only the GEMMs used both (OpenBLAS threads) while MLX's
  element-wise ops and the kernel hand-offs ran on one, the other spinning. The
  two CFG branches now run on two threads with single-threaded BLAS
  (`cosyvoice2.branches`): 1.87-1.92 s per call instead of 2.3-2.9 (quiet); the
  whole flow, 10 steps, 3.57 s per second of audio against the official 3.4-4.0
  on the same machine (`bench/README.md`, 2026-11-27).
- Few frames (the streaming cache's calls: 50-70 new frames on a cached prompt).
  With the optional extension (`kernels/`), each transformer block is one
  `transformer_block` node (panel GEMM over weights packed once, block attention over
  the cached keys/values, LayerNorm and GELU in C++, residuals in place) and the
  remaining projections and row ops are extension nodes too, so a step is built
  lazily without a numba hand-off. One CFG branch, one thread, 70 new frames on 100
  cached: 0.19-0.24 s per Euler step; both branches on two threads 0.22-0.30 s (the
  same process without the extension: 0.39-0.52; quiet machine, 2026-11-27,
  interleaved). Per block about 3 ms, of which the GEMMs (65-77 GFLOP/s on one core)
  take 2 and the attention over 170 keys 0.6. Without the extension: numba kernels
  and MLX matmuls (OpenBLAS re-packing every weight per call), 0.28-0.37 s per
  branch step in the previous profile.
- The issue's target (flow <= 1.2 s per second of audio at 10 steps) means 6 s
  for the 1.42 TFLOP above, i.e. 237 GFLOP/s sustained: above this machine's
  best fp32 GEMM rate (181 GFLOP/s, 1024x1024, 2 threads, quiet), so it is not
  reachable here in fp32 with the official algorithm (bf16/int8 matmuls are
  slower still on MLX-CPU). Fewer steps (`n_timesteps`) scale the cost linearly.
"""

from cosyvoice2.flow.decoder import CausalConditionalDecoder, ConditionalDecoder
from cosyvoice2.flow.encoder import UpsampleConformerEncoder
from cosyvoice2.flow.flow import CausalMaskedDiffWithXvec
from cosyvoice2.flow.flow_matching import CausalConditionalCFM
from cosyvoice2.flow.noise import cfm_noise

__all__ = [
    "CausalConditionalCFM",
    "CausalConditionalDecoder",
    "CausalMaskedDiffWithXvec",
    "ConditionalDecoder",
    "UpsampleConformerEncoder",
    "cfm_noise",
]
