// The bf16 panel GEMM on AMX tiles. This file alone is compiled with -mamx-tile
// -mamx-bf16 (and AVX-512F, which every AMX CPU has); the dispatcher uses it only when
// the CPU has AMX-BF16 and Linux has granted this process the tile data state
// (enable_amx). kernels.h's bf16 pair panels
// are AMX's B operand as they are (per pair of k, 16 columns x 2 bf16: 64 bytes a row)
// and x's bf16 pairs its A operand (16 rows of 32 k), so a tile product needs no
// re-layout: 16 rows x 16 columns x 32 k per instruction, fp32 sums in the C tile.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

#include "kernels.h"

namespace cv2k {
namespace {

constexpr int64_t kPairsPerTile = 16;  // a tile row: 64 bytes = 16 pairs of k

struct TileConfig {  // palette 1 (the layout _tile_loadconfig reads)
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: C (2 x 2 blocks of 16 x 16 fp32); 4, 5: A (x rows); 6, 7: B (panels).
void configure() {
  alignas(64) TileConfig c = {};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// Writes the C tile at t (16 x 16 fp32) to the output rows [m0, m0 + 16) that exist, the
// bias added (or both added to y when accumulating).
void store(const PanelBf16Args& p, const float* t, int64_t m0, int64_t panel) {
  const int64_t n0 = panel * kPanelWidth;
  const int64_t cols = p.N - n0 < kPanelWidth ? p.N - n0 : kPanelWidth;
  const int64_t rows = p.M - m0 < 16 ? p.M - m0 : 16;
  const __mmask16 mask = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
  const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + n0) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    float* y = p.y + (m0 + r) * p.ldy + n0;
    __m512 v = _mm512_add_ps(_mm512_load_ps(t + r * 16), bias);
    if (p.accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, y));
    _mm512_mask_storeu_ps(y, mask, v);
  }
}

}  // namespace

bool enable_amx() {
  constexpr long kReqXcompPerm = 0x1023;  // arch_prctl ARCH_REQ_XCOMP_PERM
  constexpr long kXtiledata = 18;         // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
}

// Row blocks of 32 (two A tiles) by pairs of panels (two B tiles): four C tiles.
// x must hold its rows up to the next multiple of 16 (zeros; bf16_pairs does).
void panel_bf16_cols_amx(const PanelBf16Args& p, int64_t p0, int64_t p1) {
  configure();
  alignas(64) float t[4][256];
  const int64_t stride_x = p.kpairs * 4;  // bytes from one row of pairs to the next
  const int64_t panel_size = p.kpairs * 2 * kPanelWidth;
  for (int64_t m0 = 0; m0 < p.M; m0 += 32) {  // a row block's x stays in L1 over the panels
    const bool two_rows = m0 + 16 < p.M;
    const uint32_t* x0 = p.x + m0 * p.kpairs;
    const uint32_t* x1 = x0 + 16 * p.kpairs;
    for (int64_t panel = p0; panel < p1; panel += 2) {
      const bool two_panels = panel + 1 < p1;
      const uint16_t* w0 = p.wp + panel * panel_size;
      const uint16_t* w1 = w0 + panel_size;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t j = 0; j < p.kpairs; j += kPairsPerTile) {
        _tile_loadd(4, x0 + j, stride_x);
        _tile_loadd(6, w0 + j * 2 * kPanelWidth, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two_panels) {
          _tile_loadd(7, w1 + j * 2 * kPanelWidth, 64);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (two_rows) {
          _tile_loadd(5, x1 + j, stride_x);
          _tile_dpbf16ps(2, 5, 6);
          if (two_panels) _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, t[0], 64);
      store(p, t[0], m0, panel);
      if (two_panels) {
        _tile_stored(1, t[1], 64);
        store(p, t[1], m0, panel + 1);
      }
      if (two_rows) {
        _tile_stored(2, t[2], 64);
        store(p, t[2], m0 + 16, panel);
        if (two_panels) {
          _tile_stored(3, t[3], 64);
          store(p, t[3], m0 + 16, panel + 1);
        }
      }
    }
  }
  _tile_release();
}

}  // namespace cv2k
