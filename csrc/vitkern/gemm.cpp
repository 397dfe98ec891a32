// vitkern's own weight GEMMs (gemm.h): BLIS-style blocking over a prepacked weight.
//
// AVX2 (6 x 16): K in blocks of kKC (one block up to 2 kKC), row-major A in one row block of up to
// kMCRows rows (the models' row tiles), then groups of four 16-column weight panels (kKC x 64,
// 96 KB, in L2), then 6-row tiles, each run across the group's panels while its A rows (6 x kKC,
// 9 KB) stay in L1 - MLAS's order. The 6 x 16 micro-kernel: 12 ymm accumulators, two panel loads
// and six broadcasts of A per k, the full tile's K loop in inline assembly (k unrolled by 4). Row
// tails use intrinsics kernels with fewer rows (a template per row count); a partial last panel
// computes into a 6 x 16 buffer. The first K block's tiles add the starting value (bias, residual
// rows) as they are stored. Transposed A (weight gradients) runs panel-first in blocks of kMC rows.
// AVX-512 and bf16 (vdpbf16ps over k-pairs): K blocks, row blocks of kMC512, then panel groups,
// each swept down the row block with 24 zmm accumulators per micro-kernel call (the AVX-512 tiles
// span a whole group): 6 rows x four panels (64 columns) while four full panels are left, then
// 12 rows x two panels, and a lone last panel (kKC512 / kKCBf16, kMC512 below).
#include "gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "blas.h"
#include "stable.h"
#include "simd.h"

namespace vitkern {

namespace {

constexpr int64_t kMR = 6, kKC = 384, kMC = 96;
// Row-major A on AVX2: a product of up to kMCRows rows (the models' row tiles) is one row block;
// more rows go in blocks of kMCRows / 2. Tiles run across groups of kGroupPanels panels.
constexpr int64_t kMCRows = 384, kGroupPanels = 4;

// fp32 -> bf16, round to nearest even (NaN stays NaN): the rounding of torch's .to(bfloat16).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}


// C (m x n, ldc) = 0: an empty-K product that does not accumulate.
inline void clear_rows(float* c, int64_t m, int64_t n, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, sizeof(float) * n);
}

// The first `cols` columns of `rows` rows of a 16-wide buffer (a partial last panel's product)
// into C (ldc): stored, or added where `accumulate`.
inline void buffer_to_rows(const float* buf, int64_t rows, int64_t cols, float* c, int64_t ldc, bool accumulate,
                           const RowInit& init = {}) {
  for (int64_t r = 0; r < rows; ++r) {
    float* cr = c + r * ldc;
    const float* src = init.rows != nullptr ? init.rows + r * init.ld : nullptr;
    for (int64_t j = 0; j < cols; ++j) {
      const float v = buf[r * kGemmNR + j];
      if (accumulate) {
        cr[j] += v;
      } else if (init.any()) {
        cr[j] = v + ((src != nullptr ? src[j] : 0.f) + (init.bias != nullptr ? init.bias[j] : 0.f));
      } else {
        cr[j] = v;
      }
    }
  }
}

// C (m x n, ldc) = init (the residual rows plus the bias): the starting value a product then
// accumulates onto, on the routes whose kernels do not read `init` themselves.
inline void write_init(float* c, int64_t m, int64_t n, int64_t ldc, const RowInit& init) {
  for (int64_t r = 0; r < m; ++r) {
    float* cr = c + r * ldc;
    const float* src = init.rows != nullptr ? init.rows + r * init.ld : nullptr;
    for (int64_t j = 0; j < n; ++j) cr[j] = (src != nullptr ? src[j] : 0.f) + (init.bias != nullptr ? init.bias[j] : 0.f);
  }
}

// The outer loops of the packed GEMMs' nests: K blocks of kcb (the first stores into C, the rest
// accumulate), then row blocks of mcb: body(pc, kc, acc, ic, mc).
template <typename F>
inline void for_blocks(int64_t m, int64_t k, int64_t kcb, int64_t mcb, bool accumulate, F&& body) {
  for (int64_t pc = 0; pc < k; pc += kcb) {
    const int64_t kc = std::min(kcb, k - pc);
    for (int64_t ic = 0; ic < m; ic += mcb) body(pc, kc, accumulate || pc > 0, ic, std::min(mcb, m - ic));
  }
}

// An A block (mc rows of kc floats, lda apart) as the kernels read it: in place, or, where `pad`
// (rows a multiple of 4 KB apart all map to one L1 set), copied to `buf` at stride pad_ld. Sets ld.
inline const float* a_block(const float* ab, int64_t mc, int64_t kc, int64_t lda, bool pad, float* buf,
                            int64_t pad_ld, int64_t& ld) {
  ld = lda;
  if (!pad) return ab;
  for (int64_t r = 0; r < mc; ++r) std::memcpy(buf + r * pad_ld, ab + r * lda, sizeof(float) * kc);
  ld = pad_ld;
  return buf;
}

// The panels of an n-column product in pairs (a lone last panel, full or partial, on its own):
// body(p, np, cols) for the group starting at panel p, np panels, cols columns.
template <typename F>
inline void for_panel_pairs(int64_t n, F&& body) {
  const int64_t panels = (n + kGemmNR - 1) / kGemmNR;
  for (int64_t p = 0; p < panels;) {
    const int64_t left = n - p * kGemmNR;
    const int np = left >= 2 * kGemmNR ? 2 : 1;
    body(p, np, std::min<int64_t>(np * kGemmNR, left));
    p += np;
  }
}

#if VK_X86_SIMD
// One k step of the AVX2 micro-kernel: two panel loads, MR broadcasts, 2 MR FMAs.
template <int MR, bool AT>
__attribute__((target("avx2,fma"), always_inline)) inline void avx2_step(int64_t k, const float* a, int64_t lda,
                                                                        const float* b, __m256 (&c0)[MR],
                                                                        __m256 (&c1)[MR]) {
  const __m256 b0 = _mm256_loadu_ps(b + k * kGemmNR), b1 = _mm256_loadu_ps(b + k * kGemmNR + 8);
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    const __m256 av = _mm256_broadcast_ss(AT ? a + k * lda + r : a + r * lda + k);
    c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
    c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
  }
}

// One k step of the full 6 x 16 tile in assembly: the panel's 16 floats in ymm0/ymm1, each row's
// A element broadcast into ymm2/ymm3 in turn, accumulators ymm4..ymm15 (row r: ymm(4 + 2r),
// ymm(5 + 2r)). Rows 0-2 are addressed from a0 and rows 3-5 from a3 = a0 + 3 lda, with lda in bytes.
#define VK_AVX2_STEP(OFFA, OFFB)                                   \
  "vmovups " #OFFB "(%[b]), %%ymm0\n\t"                            \
  "vmovups " #OFFB "+32(%[b]), %%ymm1\n\t"                         \
  "vbroadcastss " #OFFA "(%[a0]), %%ymm2\n\t"                      \
  "vfmadd231ps %%ymm0, %%ymm2, %%ymm4\n\t"                         \
  "vfmadd231ps %%ymm1, %%ymm2, %%ymm5\n\t"                         \
  "vbroadcastss " #OFFA "(%[a0],%[ld],1), %%ymm3\n\t"              \
  "vfmadd231ps %%ymm0, %%ymm3, %%ymm6\n\t"                         \
  "vfmadd231ps %%ymm1, %%ymm3, %%ymm7\n\t"                         \
  "vbroadcastss " #OFFA "(%[a0],%[ld],2), %%ymm2\n\t"              \
  "vfmadd231ps %%ymm0, %%ymm2, %%ymm8\n\t"                         \
  "vfmadd231ps %%ymm1, %%ymm2, %%ymm9\n\t"                         \
  "vbroadcastss " #OFFA "(%[a3]), %%ymm3\n\t"                      \
  "vfmadd231ps %%ymm0, %%ymm3, %%ymm10\n\t"                        \
  "vfmadd231ps %%ymm1, %%ymm3, %%ymm11\n\t"                        \
  "vbroadcastss " #OFFA "(%[a3],%[ld],1), %%ymm2\n\t"              \
  "vfmadd231ps %%ymm0, %%ymm2, %%ymm12\n\t"                        \
  "vfmadd231ps %%ymm1, %%ymm2, %%ymm13\n\t"                        \
  "vbroadcastss " #OFFA "(%[a3],%[ld],2), %%ymm3\n\t"              \
  "vfmadd231ps %%ymm0, %%ymm3, %%ymm14\n\t"                        \
  "vfmadd231ps %%ymm1, %%ymm3, %%ymm15\n\t"

// The K loop of the full 6-row tile (row-major A), k unrolled by 4, into tile (6 x 16 floats,
// 32-byte aligned). The compiler's schedule of the intrinsics loop hoisted broadcasts, ran out of
// the 16 ymm registers and spilled an accumulator inside the loop, and recomputed row addresses
// with lea each step; this loop keeps the 12 accumulators in registers and addresses the six rows
// from two pointers, as MLAS's FMA3 kernel does (Zen 3: +8-13% GFLOP/s at the ViT shapes). Each
// accumulator sums its products in the same k order as avx2_step: the results are bitwise the same.
__attribute__((target("avx2,fma"))) inline void k_loop_6x16(int64_t kc, const float* a, int64_t lda, const float* b,
                                                            float* tile) {
  const float* a0 = a;
  const float* a3 = a + 3 * lda;
  const int64_t ld_bytes = lda * static_cast<int64_t>(sizeof(float));
  int64_t quads = kc / 4, rest = kc % 4;
  __asm__ volatile(
      "vxorps %%ymm4, %%ymm4, %%ymm4\n\t"
      "vxorps %%ymm5, %%ymm5, %%ymm5\n\t"
      "vxorps %%ymm6, %%ymm6, %%ymm6\n\t"
      "vxorps %%ymm7, %%ymm7, %%ymm7\n\t"
      "vxorps %%ymm8, %%ymm8, %%ymm8\n\t"
      "vxorps %%ymm9, %%ymm9, %%ymm9\n\t"
      "vxorps %%ymm10, %%ymm10, %%ymm10\n\t"
      "vxorps %%ymm11, %%ymm11, %%ymm11\n\t"
      "vxorps %%ymm12, %%ymm12, %%ymm12\n\t"
      "vxorps %%ymm13, %%ymm13, %%ymm13\n\t"
      "vxorps %%ymm14, %%ymm14, %%ymm14\n\t"
      "vxorps %%ymm15, %%ymm15, %%ymm15\n\t"
      "test %[quads], %[quads]\n\t"
      "jz 2f\n\t"
      "1:\n\t"  // four k steps
      VK_AVX2_STEP(0, 0) VK_AVX2_STEP(4, 64) VK_AVX2_STEP(8, 128) VK_AVX2_STEP(12, 192)
      "add $16, %[a0]\n\t"
      "add $16, %[a3]\n\t"
      "add $256, %[b]\n\t"
      "dec %[quads]\n\t"
      "jnz 1b\n\t"
      "2:\n\t"  // the last kc % 4 steps
      "test %[rest], %[rest]\n\t"
      "jz 4f\n\t"
      "3:\n\t"
      VK_AVX2_STEP(0, 0)
      "add $4, %[a0]\n\t"
      "add $4, %[a3]\n\t"
      "add $64, %[b]\n\t"
      "dec %[rest]\n\t"
      "jnz 3b\n\t"
      "4:\n\t"
      "vmovaps %%ymm4, (%[tile])\n\t"
      "vmovaps %%ymm5, 32(%[tile])\n\t"
      "vmovaps %%ymm6, 64(%[tile])\n\t"
      "vmovaps %%ymm7, 96(%[tile])\n\t"
      "vmovaps %%ymm8, 128(%[tile])\n\t"
      "vmovaps %%ymm9, 160(%[tile])\n\t"
      "vmovaps %%ymm10, 192(%[tile])\n\t"
      "vmovaps %%ymm11, 224(%[tile])\n\t"
      "vmovaps %%ymm12, 256(%[tile])\n\t"
      "vmovaps %%ymm13, 288(%[tile])\n\t"
      "vmovaps %%ymm14, 320(%[tile])\n\t"
      "vmovaps %%ymm15, 352(%[tile])\n\t"
      : [a0] "+r"(a0), [a3] "+r"(a3), [b] "+r"(b), [quads] "+r"(quads), [rest] "+r"(rest)
      : [ld] "r"(ld_bytes), [tile] "r"(tile)
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "xmm14", "xmm15", "cc", "memory");
}
#undef VK_AVX2_STEP

// C rows (ldc) = or += the MR x 16 block of A (MR rows of kc, lda) . panel (kc x 16). AT: A is
// stored transposed (kc x MR, element (r, k) at a[k * lda + r]), as for the weight gradients'
// dY^T . X and the attention backward's P^T . dO: the six broadcasts of a k step then read
// adjacent floats. With `init` and not `accumulate`: C = tile + (init row + init bias).
template <int MR, bool AT>
__attribute__((target("avx2,fma"))) void micro_kernel(int64_t kc, const float* a, int64_t lda, const float* b,
                                                      float* c, int64_t ldc, bool accumulate, const RowInit& init) {
  // The C tile's lines (the store's read-for-ownership, or the load when accumulating) are
  // requested first, so that they arrive during the K loop instead of stalling the stores at its end.
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + kGemmNR - 1), _MM_HINT_T0);
  }
  __m256 c0[MR], c1[MR];
  if constexpr (MR == kMR && !AT) {
    alignas(32) float tile[kMR * kGemmNR];
    k_loop_6x16(kc, a, lda, b, tile);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      c0[r] = _mm256_load_ps(tile + r * kGemmNR);
      c1[r] = _mm256_load_ps(tile + r * kGemmNR + 8);
    }
  } else {
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      c0[r] = _mm256_setzero_ps();
      c1[r] = _mm256_setzero_ps();
    }
    // k unrolled by 4: the loop's address arithmetic and branch once per four steps.
    int64_t k = 0;
    for (; k + 4 <= kc; k += 4) {
      avx2_step<MR, AT>(k, a, lda, b, c0, c1);
      avx2_step<MR, AT>(k + 1, a, lda, b, c0, c1);
      avx2_step<MR, AT>(k + 2, a, lda, b, c0, c1);
      avx2_step<MR, AT>(k + 3, a, lda, b, c0, c1);
    }
    for (; k < kc; ++k) avx2_step<MR, AT>(k, a, lda, b, c0, c1);
  }
  if (!accumulate && init.any()) {  // C = tile + (init row + bias)
    const __m256 zero = _mm256_setzero_ps();
    const __m256 bias0 = init.bias != nullptr ? _mm256_loadu_ps(init.bias) : zero;
    const __m256 bias1 = init.bias != nullptr ? _mm256_loadu_ps(init.bias + 8) : zero;
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      float* cr = c + r * ldc;
      const float* src = init.rows != nullptr ? init.rows + r * init.ld : nullptr;
      _mm256_storeu_ps(cr, _mm256_add_ps(c0[r], src != nullptr ? _mm256_add_ps(_mm256_loadu_ps(src), bias0) : bias0));
      _mm256_storeu_ps(cr + 8,
                       _mm256_add_ps(c1[r], src != nullptr ? _mm256_add_ps(_mm256_loadu_ps(src + 8), bias1) : bias1));
    }
    return;
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    if (accumulate) {
      c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(cr));
      c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(cr + 8));
    }
    _mm256_storeu_ps(cr, c0[r]);
    _mm256_storeu_ps(cr + 8, c1[r]);
  }
}

using MicroKernel = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, bool, const RowInit&);
template <bool AT>
constexpr MicroKernel kMicro[kMR + 1] = {nullptr,
                                         micro_kernel<1, AT>,
                                         micro_kernel<2, AT>,
                                         micro_kernel<3, AT>,
                                         micro_kernel<4, AT>,
                                         micro_kernel<5, AT>,
                                         micro_kernel<6, AT>};

// Offset of A's element (row i, column k): row-major, or transposed (AT).
template <bool AT>
inline int64_t a_at(int64_t i, int64_t k, int64_t lda) {
  return AT ? k * lda + i : i * lda + k;
}

// rows x (up to) 16 columns of C from one panel; cols < 16 (the last panel) goes through a buffer.
// `init` (a first K block that does not accumulate): C = product + (init row + bias).
template <bool AT>
void panel_rows(int64_t rows, int64_t cols, int64_t kc, const float* a, int64_t lda, const float* b, float* c,
                int64_t ldc, bool accumulate, const RowInit& init) {
  int64_t i = 0;
  if (cols == kGemmNR) {
    for (; i + kMR <= rows; i += kMR) {
      micro_kernel<kMR, AT>(kc, a + a_at<AT>(i, 0, lda), lda, b, c + i * ldc, ldc, accumulate, init.shifted(i, 0));
    }
    if (i < rows) {
      kMicro<AT>[rows - i](kc, a + a_at<AT>(i, 0, lda), lda, b, c + i * ldc, ldc, accumulate, init.shifted(i, 0));
    }
    return;
  }
  float buf[kMR * kGemmNR];
  for (; i < rows; i += kMR) {
    const int64_t mr = std::min(kMR, rows - i);
    kMicro<AT>[mr](kc, a + a_at<AT>(i, 0, lda), lda, b, buf, kGemmNR, false, RowInit{});
    buffer_to_rows(buf, mr, cols, c + i * ldc, ldc, accumulate, init.shifted(i, 0));
  }
}

// pstride: floats from one panel to the next (kGemmNR * k for a packed weight; more when the
// product uses a k-range of longer panels, as sp_attention's P . V does per key block).
template <bool AT>
void gemm_packed(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* wp, float* c,
                 int64_t ldc, bool accumulate, int64_t pstride, const RowInit& init = {}) {
  const int64_t panels = (n + kGemmNR - 1) / kGemmNR;
  // A's rows a multiple of 4 KB apart (ViT-B's fc2, K 3072) share one set of the L1: each A block is
  // copied to a padded stride first, as in gemm_packed_512 (Zen 3, 197 x 768 x 3072: see NOTES).
  // K up to 2 kKC runs as one block (ViT-B's qkv and fc1, K 768): each C tile is stored once
  // instead of stored, then read back from the L3 for the second block (Zen 3, 197 x 3072 x 768:
  // +7% GFLOP/s; K 3072 stays at 384, where 768 lost 5%). The transposed-A products keep kKC.
  const int64_t kcb = !AT && k <= 2 * kKC ? 2 * kKC : kKC;
  const bool pad_a = !AT && lda % 1024 == 0 && m > 1;
  const int64_t pad_ld = kcb + 16;
  // Row-major A: row blocks of up to kMCRows, then groups of kGroupPanels panels, then 6-row tiles,
  // each tile across the group's panels: its A rows (6 x kc, 9 KB) stay in L1 while the group's
  // panels (kc x 64, 96 KB) stream from L2 in one sequential run, as MLAS orders its SGEMM. The
  // panel-first order (a panel in L1, the A block's rows streaming past it from L2) ran 5-20%
  // slower on Zen 3 at the ViT batch-1 shapes (NOTES). Transposed A keeps the panel-first order.
  const int64_t mcb = AT ? kMC : (m <= kMCRows ? m : kMCRows / 2);
  Scratch a_copy = scratch(pad_a ? std::min(mcb, m) * pad_ld : 0);
  for_blocks(m, k, kcb, mcb, accumulate, [&](int64_t pc, int64_t kc, bool acc, int64_t ic, int64_t mc) {
    int64_t ld;
    const float* ab = a_block(a + a_at<AT>(ic, pc, lda), mc, kc, lda, pad_a, a_copy.get(), pad_ld, ld);
    const auto panel = [&](int64_t p, int64_t i, int64_t rows) {
      const int64_t cols = std::min(kGemmNR, n - p * kGemmNR);
      panel_rows<AT>(rows, cols, kc, ab + a_at<AT>(i, 0, ld), ld, wp + p * pstride + pc * kGemmNR,
                     c + (ic + i) * ldc + p * kGemmNR, ldc, acc, acc ? RowInit{} : init.shifted(ic + i, p * kGemmNR));
    };
    if (AT) {
      for (int64_t p = 0; p < panels; ++p) panel(p, 0, mc);
      return;
    }
    for (int64_t p0 = 0; p0 < panels; p0 += kGroupPanels) {
      const int64_t p1 = std::min(panels, p0 + kGroupPanels), pn = std::min(panels, p1 + kGroupPanels);
      // The next group's panel lines (one 64-byte line per k and panel) are requested into L2, spread
      // over this group's kernel calls: a model's weights come from DRAM once per forward, and the
      // first tile of a group otherwise waits on them (Zen 3, weights cycled beyond the L3: +2-5%).
      const int64_t next_lines = (pn - p1) * kc, calls = (mc + kMR - 1) / kMR * (p1 - p0);
      const int64_t per_call = (next_lines + calls - 1) / calls;
      int64_t issued = 0;
      for (int64_t i = 0; i < mc; i += kMR) {
        for (int64_t p = p0; p < p1; ++p) {
          for (const int64_t stop = std::min(next_lines, issued + per_call); issued < stop; ++issued) {
            _mm_prefetch(reinterpret_cast<const char*>(wp + (p1 + issued / kc) * pstride + (pc + issued % kc) * kGemmNR),
                         _MM_HINT_T1);
          }
          panel(p, i, std::min(kMR, mc - i));
        }
      }
    }
  });
}

// AVX-512: up to 12 rows x two panels (32 columns) per call, 24 zmm accumulators; one 512-bit
// load per panel and twelve broadcasts of A per k. NP = 1 for a lone last panel. The second panel
// lies pstride floats after the first.
constexpr int64_t kMR512 = 12;

// The MR x (16 NP) accumulator tile of an AVX-512 micro-kernel into C (ldc): stored, or added.
// With `init` (a first K block that does not accumulate): C = tile + (init row + init bias), the
// sum a separate pass used to write into C first, read here instead of C.
template <int MR, int NP>
__attribute__((target("avx512f"), always_inline)) inline void store_tile_512(__m512 (&c0)[MR], __m512 (&c1)[MR],
                                                                             float* c, int64_t ldc, bool accumulate,
                                                                             const RowInit& init) {
  if (!accumulate && init.any()) {
    const __m512 zero = _mm512_setzero_ps();
    const __m512 bias0 = init.bias != nullptr ? _mm512_loadu_ps(init.bias) : zero;
    const __m512 bias1 = NP == 2 && init.bias != nullptr ? _mm512_loadu_ps(init.bias + kGemmNR) : zero;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      float* cr = c + r * ldc;
      const float* src = init.rows != nullptr ? init.rows + r * init.ld : nullptr;
      c0[r] = _mm512_add_ps(c0[r], init.rows != nullptr ? _mm512_add_ps(_mm512_loadu_ps(src), bias0) : bias0);
      _mm512_storeu_ps(cr, c0[r]);
      if (NP == 2) {
        c1[r] = _mm512_add_ps(c1[r],
                              init.rows != nullptr ? _mm512_add_ps(_mm512_loadu_ps(src + kGemmNR), bias1) : bias1);
        _mm512_storeu_ps(cr + kGemmNR, c1[r]);
      }
    }
    return;
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    if (accumulate) c0[r] = _mm512_add_ps(c0[r], _mm512_loadu_ps(cr));
    _mm512_storeu_ps(cr, c0[r]);
    if (NP == 2) {
      if (accumulate) c1[r] = _mm512_add_ps(c1[r], _mm512_loadu_ps(cr + kGemmNR));
      _mm512_storeu_ps(cr + kGemmNR, c1[r]);
    }
  }
}
template <int MR, bool AT, int NP>
__attribute__((target("avx512f"))) void micro_kernel_512(int64_t kc, const float* a, int64_t lda, const float* b,
                                                         int64_t pstride, float* c, int64_t ldc, bool accumulate,
                                                         const RowInit& init) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    c0[r] = _mm512_setzero_ps();
    c1[r] = _mm512_setzero_ps();
  }
  const float* b2 = b + pstride;
  // Software prefetches (Zen 4, one core, 5 ViT GEMM shapes: +5-15% GFLOP/s; a ViT-S forward
  // -4 to -9%): the C tile's lines at the start (the store's read-for-ownership, or the load when
  // accumulating, then overlap the K loop instead of stalling at its end), the panels 8 k-steps
  // ahead, and each A row's next-but-one line as a line is entered.
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    if (NP == 2) _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + kGemmNR), _MM_HINT_T0);
  }
  for (int64_t k = 0; k < kc; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(b + (k + 8) * kGemmNR), _MM_HINT_T0);
    if (NP == 2) _mm_prefetch(reinterpret_cast<const char*>(b2 + (k + 8) * kGemmNR), _MM_HINT_T0);
    if (AT) {
      _mm_prefetch(reinterpret_cast<const char*>(a + (k + 8) * lda), _MM_HINT_T0);
    } else if ((k & 15) == 0) {
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) _mm_prefetch(reinterpret_cast<const char*>(a + r * lda + k + 32), _MM_HINT_T0);
    }
    const __m512 b0 = _mm512_loadu_ps(b + k * kGemmNR);
    const __m512 b1 = NP == 2 ? _mm512_loadu_ps(b2 + k * kGemmNR) : b0;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(AT ? a[k * lda + r] : a[r * lda + k]);
      c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
      if (NP == 2) c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
    }
  }
  store_tile_512<MR, NP>(c0, c1, c, ldc, accumulate, init);
}

// Four-panel (64-column) tiles, MR <= 6 rows: per k step 4 panel loads and MR broadcasts for 4 MR
// FMAs (the 12 x 32 tile: 2 loads, 12 broadcasts for 24). On Zen 4, in the ViT GEMM shapes (A's
// block in L2, the weight panels streaming from L2 / L3) the 6 x 64 tile runs 2-8% faster than
// 12 x 32; both sum each C element in the same k order, so the results are bit for bit the same.
constexpr int64_t kMRQuad = 6;
template <int MR>
__attribute__((target("avx512f"), always_inline)) inline void store_tile_quad(__m512 (&cc)[4][MR], float* c,
                                                                             int64_t ldc, bool accumulate,
                                                                             const RowInit& init) {
  const bool add_init = !accumulate && init.any();
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    const float* src = add_init && init.rows != nullptr ? init.rows + r * init.ld : nullptr;
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      __m512 v = cc[q][r];
      if (accumulate) {
        v = _mm512_add_ps(v, _mm512_loadu_ps(cr + q * kGemmNR));
      } else if (add_init) {  // tile + (init row + bias), as store_tile_512 adds it
        const __m512 bias = init.bias != nullptr ? _mm512_loadu_ps(init.bias + q * kGemmNR) : zero;
        v = _mm512_add_ps(v, src != nullptr ? _mm512_add_ps(_mm512_loadu_ps(src + q * kGemmNR), bias) : bias);
      }
      _mm512_storeu_ps(cr + q * kGemmNR, v);
    }
  }
}

// A four-panel tile's start: zeroed accumulators, and the C tile's lines prefetched (as in
// micro_kernel_512: the store's read-for-ownership, or the load when accumulating, then overlaps
// the K loop).
template <int MR>
__attribute__((target("avx512f"), always_inline)) inline void quad_tile_start(__m512 (&cc)[4][MR], const float* c,
                                                                             int64_t ldc) {
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      cc[q][r] = _mm512_setzero_ps();
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + q * kGemmNR), _MM_HINT_T0);
    }
  }
}

template <int MR>
__attribute__((target("avx512f"))) void micro_kernel_quad(int64_t kc, const float* a, int64_t lda, const float* b,
                                                          int64_t pstride, float* c, int64_t ldc, bool accumulate,
                                                          const RowInit& init) {
  __m512 cc[4][MR];
  quad_tile_start<MR>(cc, c, ldc);
  for (int64_t k = 0; k < kc; ++k) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      _mm_prefetch(reinterpret_cast<const char*>(b + q * pstride + (k + 8) * kGemmNR), _MM_HINT_T0);
    }
    if ((k & 15) == 0) {
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) _mm_prefetch(reinterpret_cast<const char*>(a + r * lda + k + 32), _MM_HINT_T0);
    }
    __m512 bv[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) bv[q] = _mm512_loadu_ps(b + q * pstride + k * kGemmNR);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) cc[q][r] = _mm512_fmadd_ps(av, bv[q], cc[q][r]);
    }
  }
  store_tile_quad<MR>(cc, c, ldc, accumulate, init);
}

using MicroKernel512 = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool,
                                const RowInit&);
template <bool AT, int NP>
constexpr MicroKernel512 kMicro512[kMR512 + 1] = {
    nullptr,
    micro_kernel_512<1, AT, NP>,  micro_kernel_512<2, AT, NP>,  micro_kernel_512<3, AT, NP>,
    micro_kernel_512<4, AT, NP>,  micro_kernel_512<5, AT, NP>,  micro_kernel_512<6, AT, NP>,
    micro_kernel_512<7, AT, NP>,  micro_kernel_512<8, AT, NP>,  micro_kernel_512<9, AT, NP>,
    micro_kernel_512<10, AT, NP>, micro_kernel_512<11, AT, NP>, micro_kernel_512<12, AT, NP>};

constexpr MicroKernel512 kMicroQuad[kMRQuad + 1] = {nullptr,
                                                     micro_kernel_quad<1>,
                                                     micro_kernel_quad<2>,
                                                     micro_kernel_quad<3>,
                                                     micro_kernel_quad<4>,
                                                     micro_kernel_quad<5>,
                                                     micro_kernel_quad<6>};

// The panels of an n-column product in groups of four full panels, then pairs (as for_panel_pairs)
// for the rest: body(p, np, cols), np in {1, 2, 4}.
template <typename F>
inline void for_panel_groups(int64_t n, bool quads, F&& body) {
  int64_t p = 0;
  if (quads) {
    for (; (p + 4) * kGemmNR <= n; p += 4) body(p, 4, 4 * kGemmNR);
  }
  const int64_t c0 = p * kGemmNR;
  if (c0 < n) for_panel_pairs(n - c0, [&](int64_t pp, int np, int64_t cols) { body(p + pp, np, cols); });
}

// rows x (up to) 32 columns of C from np (1 or 2) panels; cols < 16 (a lone last panel) through a buffer.
template <bool AT>
void panel_rows_512(int64_t rows, int64_t cols, int np, int64_t kc, const float* a, int64_t lda, const float* b,
                    int64_t pstride, float* c, int64_t ldc, bool accumulate, const RowInit& init) {
  if (cols == np * kGemmNR) {
    const auto& table = np == 2 ? kMicro512<AT, 2> : kMicro512<AT, 1>;
    int64_t i = 0;
    for (; i + kMR512 <= rows; i += kMR512) {
      table[kMR512](kc, a + a_at<AT>(i, 0, lda), lda, b, pstride, c + i * ldc, ldc, accumulate, init.shifted(i, 0));
    }
    if (i < rows) {
      table[rows - i](kc, a + a_at<AT>(i, 0, lda), lda, b, pstride, c + i * ldc, ldc, accumulate, init.shifted(i, 0));
    }
    return;
  }
  float buf[kMR512 * kGemmNR];
  for (int64_t i = 0; i < rows; i += kMR512) {
    const int64_t mr = std::min(kMR512, rows - i);
    kMicro512<AT, 1>[mr](kc, a + a_at<AT>(i, 0, lda), lda, b, pstride, buf, kGemmNR, false, RowInit{});
    buffer_to_rows(buf, mr, cols, c + i * ldc, ldc, accumulate, init.shifted(i, 0));
  }
}

// The AVX-512 loop nest: K blocks, rows in blocks of kMC512 (ViT batch 1's 197 rows read each
// weight panel once; with 96-row blocks three times, +4% bf16 / +1-2% fp32 over a ViT-S forward's
// 48 GEMMs), then groups of four panels (6 x 64 tiles) and the last columns in pairs (12 x 32).
// K blocks of kKC512 = 512: one block for K <= 512 (ViT-S: every GEMM but fc2), so a C tile is
// stored once instead of read back and added per block. The four panels' block (512 x 64 floats,
// 128 KB) does not stay in L1 either way; the micro-kernel's prefetches bring its lines from L2,
// and the A block (240 x 512 floats, 480 KB) stays in a 1 MB L2. On Zen 4 (6 x 64 tiles) 512 over
// 256: ViT-S fp32 -3.6% at batch 1 and 8, ViT-B even. AT (the weight gradients' transposed A,
// 12 x 32 tiles only) keeps blocks of kKC512T = 256.
constexpr int64_t kKC512 = 512, kKC512T = 256, kMC512 = 240;
template <bool AT>
void gemm_packed_512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* wp, float* c,
                     int64_t ldc, bool accumulate, int64_t pstride, const RowInit& init = {}) {
  // A's rows a multiple of 4 KB apart (lda a multiple of 1024 floats: ViT-B's fc2, K 3072; ViT-L's,
  // K 4096) all map to one set of the L1 (64 sets of 64-byte lines), whose 8 ways cannot hold the
  // 12 rows a micro-kernel reads: on Zen 4, 1576 x 768 x 3072 ran at 65-75 GFLOP/s against 90-100
  // for its neighbours. Each A block (used by every panel pair) is then copied once to a stride of
  // kc + 16 floats, which spreads the rows over the sets.
  const bool pad_a = !AT && lda % 1024 == 0 && m > 1;
  constexpr int64_t kcb = AT ? kKC512T : kKC512, kPadLd = kcb + 16;
  Scratch a_copy = scratch(pad_a ? std::min(kMC512, m) * kPadLd : 0);
  for_blocks(m, k, kcb, kMC512, accumulate, [&](int64_t pc, int64_t kc, bool acc, int64_t ic, int64_t mc) {
    int64_t ld;
    const float* ab = a_block(a + a_at<AT>(ic, pc, lda), mc, kc, lda, pad_a, a_copy.get(), kPadLd, ld);
    for_panel_groups(n, !AT, [&](int64_t p, int np, int64_t cols) {
      const float* b = wp + p * pstride + pc * kGemmNR;
      float* cb = c + ic * ldc + p * kGemmNR;
      const RowInit in = acc ? RowInit{} : init.shifted(ic, p * kGemmNR);
      if (np == 4) {
        for (int64_t i = 0; i < mc; i += kMRQuad) {
          const int64_t mr = std::min(kMRQuad, mc - i);
          kMicroQuad[mr](kc, ab + i * ld, ld, b, pstride, cb + i * ldc, ldc, acc, in.shifted(i, 0));
        }
        return;
      }
      panel_rows_512<AT>(mc, cols, np, kc, ab, ld, b, pstride, cb, ldc, acc, in);
    });
  });
}

// bf16: the same 12-row x two-panel blocking over k-pairs. Per pair t: one 512-bit load per panel
// (16 columns x 2 bf16), and per row one broadcast of the row's (2t, 2t + 1) bf16 pair; vdpbf16ps
// adds both products to each fp32 lane. a: bf16 rows (lda elements, even), b: the panel's pair t = 0.
template <int MR, int NP>
__attribute__((target("avx512f,avx512bf16"))) void micro_kernel_bf16(int64_t pairs, const uint16_t* a, int64_t lda,
                                                                     const uint16_t* b, int64_t pstride, float* c,
                                                                     int64_t ldc, bool accumulate,
                                                                     const RowInit& init) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    c0[r] = _mm512_setzero_ps();
    c1[r] = _mm512_setzero_ps();
  }
  const uint16_t* b2 = b + pstride;
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {  // prefetches as in micro_kernel_512 (one panel line per k-pair)
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    if (NP == 2) _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + kGemmNR), _MM_HINT_T0);
  }
  for (int64_t t = 0; t < pairs; ++t) {
    _mm_prefetch(reinterpret_cast<const char*>(b + (t + 8) * 2 * kGemmNR), _MM_HINT_T0);
    if (NP == 2) _mm_prefetch(reinterpret_cast<const char*>(b2 + (t + 8) * 2 * kGemmNR), _MM_HINT_T0);
    if ((t & 15) == 0) {
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) _mm_prefetch(reinterpret_cast<const char*>(a + r * lda + 2 * t + 64), _MM_HINT_T0);
    }
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + t * 2 * kGemmNR);
    const __m512bh b1 = NP == 2 ? (__m512bh)_mm512_loadu_si512(b2 + t * 2 * kGemmNR) : b0;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * t, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      c0[r] = _mm512_dpbf16_ps(c0[r], av, b0);
      if (NP == 2) c1[r] = _mm512_dpbf16_ps(c1[r], av, b1);
    }
  }
  store_tile_512<MR, NP>(c0, c1, c, ldc, accumulate, init);
}

// bf16 four-panel tiles (as micro_kernel_quad): per k-pair 4 panel loads and MR broadcasts.
template <int MR>
__attribute__((target("avx512f,avx512bf16"))) void micro_kernel_bf16_quad(int64_t pairs, const uint16_t* a,
                                                                          int64_t lda, const uint16_t* b,
                                                                          int64_t pstride, float* c, int64_t ldc,
                                                                          bool accumulate, const RowInit& init) {
  __m512 cc[4][MR];
  quad_tile_start<MR>(cc, c, ldc);
  for (int64_t t = 0; t < pairs; ++t) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      _mm_prefetch(reinterpret_cast<const char*>(b + q * pstride + (t + 8) * 2 * kGemmNR), _MM_HINT_T0);
    }
    if ((t & 15) == 0) {
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) _mm_prefetch(reinterpret_cast<const char*>(a + r * lda + 2 * t + 64), _MM_HINT_T0);
    }
    __m512bh bv[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) bv[q] = (__m512bh)_mm512_loadu_si512(b + q * pstride + t * 2 * kGemmNR);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * t, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) cc[q][r] = _mm512_dpbf16_ps(cc[q][r], av, bv[q]);
    }
  }
  store_tile_quad<MR>(cc, c, ldc, accumulate, init);
}

using MicroKernelBf16 = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool,
                                 const RowInit&);
template <int NP>
constexpr MicroKernelBf16 kMicroBf16[kMR512 + 1] = {
    nullptr,
    micro_kernel_bf16<1, NP>,  micro_kernel_bf16<2, NP>,  micro_kernel_bf16<3, NP>,  micro_kernel_bf16<4, NP>,
    micro_kernel_bf16<5, NP>,  micro_kernel_bf16<6, NP>,  micro_kernel_bf16<7, NP>,  micro_kernel_bf16<8, NP>,
    micro_kernel_bf16<9, NP>,  micro_kernel_bf16<10, NP>, micro_kernel_bf16<11, NP>, micro_kernel_bf16<12, NP>};

constexpr MicroKernelBf16 kMicroBf16Quad[kMRQuad + 1] = {nullptr,
                                                          micro_kernel_bf16_quad<1>,
                                                          micro_kernel_bf16_quad<2>,
                                                          micro_kernel_bf16_quad<3>,
                                                          micro_kernel_bf16_quad<4>,
                                                          micro_kernel_bf16_quad<5>,
                                                          micro_kernel_bf16_quad<6>};

// The bf16 kernels of a panel group (for_panel_groups' np), their row block and the fp32 tile stride
// gemm_nt_bf16_out stores them at.
struct Bf16Group {
  const MicroKernelBf16* kernels;
  int64_t rows, ldt;
};
inline Bf16Group bf16_group(int np) {
  if (np == 4) return {kMicroBf16Quad, kMRQuad, 4 * kGemmNR};
  return {np == 2 ? kMicroBf16<2> : kMicroBf16<1>, kMR512, 2 * kGemmNR};
}

// rows x cols fp32 (lda) -> bf16 rows (ldd elements apart), no padding.
__attribute__((target("avx512f,avx512bf16"))) void rows_to_bf16_strided(const float* a, int64_t rows, int64_t cols,
                                                                        int64_t lda, uint16_t* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = a + r * lda;
    uint16_t* d = dst + r * ldd;
    int64_t i = 0;
    for (; i + 16 <= cols; i += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
    }
    for (; i < cols; ++i) d[i] = bf16_bits(src[i]);
  }
}

// rows x k fp32 (lda) -> rows x kp bf16 (kp = k + k % 2, the pad column zero).
void rows_to_bf16_avx512(const float* a, int64_t rows, int64_t k, int64_t lda, uint16_t* dst, int64_t kp) {
  rows_to_bf16_strided(a, rows, k, lda, dst, kp);
  if (kp > k) {
    for (int64_t r = 0; r < rows; ++r) dst[r * kp + k] = 0;
  }
}

// The bf16 loop nest: K blocks of kKCBf16 elements, row blocks of kMC512, then 6 x 64 tiles and the
// last columns in pairs, as gemm_packed_512.
constexpr int64_t kKCBf16 = 512;
void gemm_packed_bf16(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* wp, float* c,
                      int64_t ldc, bool accumulate, int64_t pstride, const RowInit& init = {}) {
  if (kp == 0) {  // no K: C = 0 (or init), or unchanged when accumulating
    if (!accumulate) init.any() ? write_init(c, m, n, ldc, init) : clear_rows(c, m, n, ldc);
    return;
  }
  float buf[kMR512 * kGemmNR];
  // Rows a multiple of 4 KB apart (lda a multiple of 2048 bf16: ViT-L's fc2, K 4096) share one L1
  // set: each A block is copied to a padded stride first, as in gemm_packed_512.
  const bool pad_a = lda % 2048 == 0 && m > 1;
  constexpr int64_t kPadLd = kKCBf16 + 32;
  Scratch a_copy = scratch(pad_a ? (std::min(kMC512, m) * kPadLd + 1) / 2 : 0);
  uint16_t* a_pad = reinterpret_cast<uint16_t*>(a_copy.get());
  for_blocks(m, kp, kKCBf16, kMC512, accumulate, [&](int64_t pc, int64_t kc, bool acc, int64_t ic, int64_t mc) {
    const uint16_t* a_blk = a + ic * lda + pc;
    int64_t ld = lda;
    if (pad_a) {
      for (int64_t r = 0; r < mc; ++r) std::memcpy(a_pad + r * kPadLd, a_blk + r * lda, sizeof(uint16_t) * kc);
      a_blk = a_pad;
      ld = kPadLd;
    }
    for_panel_groups(n, true, [&](int64_t p, int np, int64_t cols) {
      const uint16_t* b = wp + p * pstride + pc * kGemmNR;
      const uint16_t* ab = a_blk;
      float* cb = c + ic * ldc + p * kGemmNR;
      const RowInit in = acc ? RowInit{} : init.shifted(ic, p * kGemmNR);
      if (np == 4) {
        for (int64_t i = 0; i < mc; i += kMRQuad) {
          const int64_t mr = std::min(kMRQuad, mc - i);
          kMicroBf16Quad[mr](kc / 2, ab + i * ld, ld, b, pstride, cb + i * ldc, ldc, acc, in.shifted(i, 0));
        }
        return;
      }
      const auto& table = np == 2 ? kMicroBf16<2> : kMicroBf16<1>;
      for (int64_t i = 0; i < mc; i += kMR512) {
        const int64_t mr = std::min(kMR512, mc - i);
        if (cols == np * kGemmNR) {
          table[mr](kc / 2, ab + i * ld, ld, b, pstride, cb + i * ldc, ldc, acc, in.shifted(i, 0));
        } else {  // a lone partial panel
          kMicroBf16<1>[mr](kc / 2, ab + i * ld, ld, b, pstride, buf, kGemmNR, false, RowInit{});
          buffer_to_rows(buf, mr, cols, cb + i * ldc, ldc, acc, in.shifted(i, 0));
        }
      }
    });
  });
}

// Two fp32 vectors (16 lanes) -> 16 bf16 pairs (lo from a, hi from b), as one 512-bit store.
__attribute__((target("avx512f,avx512bf16"))) inline void store_pairs(uint16_t* dst, __m512 a, __m512 b) {
  const __m512i a32 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(a));
  const __m512i b32 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(b));
  _mm512_storeu_si512(dst, _mm512_or_si512(a32, _mm512_slli_epi32(b32, 16)));
}

// 16 x 16 transpose of 32-bit elements held in 16 registers: r[i] (row i) -> r[j] (column j).
// Interleave rows in pairs (32-bit), then in fours (64-bit): in each 128-bit lane L, register 4i + j
// holds column 4L + j of rows 4i .. 4i + 3; two rounds of 128-bit lane shuffles gather the four
// lanes of one column.
__attribute__((target("avx512f"))) inline void transpose_16x16_epi32(__m512i (&r)[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
    b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
    b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88), c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
    r[j] = _mm512_shuffle_i32x4(c0, c2, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(c0, c2, 0xDD);
    r[4 + j] = _mm512_shuffle_i32x4(c1, c3, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(c1, c3, 0xDD);
  }
}

// W (n x k fp32, rows ldw apart) times scale -> the packed bf16 layout, without gathers: per panel
// (16 rows) and 32 k at a time, each row's 32 values rounded into 16 bf16 pairs (one 32-bit word
// per k-pair), then a 16 x 16 word transpose puts pair t of the 16 rows side by side, as the
// layout stores them. (The attention's K in bf16 inference: rows 3 * dim floats apart in the fused
// qkv; the 64 gathers per panel it replaces were 1% of a bf16 ViT-S forward.)
__attribute__((target("avx512f,avx512bf16"))) void pack_rows_bf16_avx512(const float* w, int64_t n, int64_t k,
                                                                         int64_t ldw, uint16_t* wp, float scale) {
  const int64_t kp = k + k % 2, panels = (n + kGemmNR - 1) / kGemmNR;
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t rows = std::min(kGemmNR, n - p * kGemmNR);
    const float* base = w + p * kGemmNR * ldw;
    uint16_t* dst = wp + p * kGemmNR * kp;
    for (int64_t k0 = 0; k0 < k; k0 += 32) {
      const int64_t left = k - k0;
      const __mmask16 m0 = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
      const __mmask16 m1 = left >= 32   ? static_cast<__mmask16>(0xffff)
                           : left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1u)
                                       : static_cast<__mmask16>(0);
      __m512i r[16];
      for (int64_t j = 0; j < kGemmNR; ++j) {
        if (j < rows) {
          const float* src = base + j * ldw + k0;
          const __m512 lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(m0, src), sv);
          const __m512 hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(m1, src + 16), sv);
          r[j] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // word t: the pair (k0 + 2t, k0 + 2t + 1)
        } else {
          r[j] = _mm512_setzero_si512();
        }
      }
      transpose_16x16_epi32(r);
      const int64_t pairs = std::min<int64_t>(16, (kp - k0) / 2);
      for (int64_t t = 0; t < pairs; ++t) _mm512_storeu_si512(dst + (k0 / 2 + t) * 2 * kGemmNR, r[t]);
    }
  }
}

__attribute__((target("avx512f,avx512bf16"))) void pack_columns_bf16_avx512(const float* b, int64_t k, int64_t n,
                                                                            int64_t ldb, uint16_t* bp) {
  const int64_t kp = k + k % 2, panels = (n + kGemmNR - 1) / kGemmNR;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t c0 = p * kGemmNR, cols = std::min(kGemmNR, n - c0);
    const __mmask16 m = static_cast<__mmask16>((1u << cols) - 1u);
    uint16_t* dst = bp + p * kGemmNR * kp;
    for (int64_t t = 0; t < kp / 2; ++t) {
      const __m512 r0 = _mm512_maskz_loadu_ps(m, b + 2 * t * ldb + c0);
      const __m512 r1 = 2 * t + 1 < k ? _mm512_maskz_loadu_ps(m, b + (2 * t + 1) * ldb + c0) : _mm512_setzero_ps();
      store_pairs(dst + t * 2 * kGemmNR, r0, r1);
    }
  }
}
#endif

int gemm_env() {  // 0 auto, 1 blas, 2 vitkern
  const char* env = std::getenv("VITKERN_GEMM");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return 0;
  if (std::strcmp(env, "blas") == 0) return 1;
  if (std::strcmp(env, "vitkern") == 0) return 2;
  return 0;  // vitkern/_ext.py warns about other values
}

}  // namespace

#if VK_X86_SIMD
namespace {
// Eight rows of w (ldw apart), columns [kk, kk + 8), times scale, stored transposed: dst[j * 16 + r]
// for r < 8 (an 8 x 8 transpose in registers).
__attribute__((target("avx2,fma"))) void pack_8x8(const float* w, int64_t ldw, float* dst, __m256 scale) {
  __m256 r0 = _mm256_mul_ps(_mm256_loadu_ps(w), scale), r1 = _mm256_mul_ps(_mm256_loadu_ps(w + ldw), scale);
  __m256 r2 = _mm256_mul_ps(_mm256_loadu_ps(w + 2 * ldw), scale);
  __m256 r3 = _mm256_mul_ps(_mm256_loadu_ps(w + 3 * ldw), scale);
  __m256 r4 = _mm256_mul_ps(_mm256_loadu_ps(w + 4 * ldw), scale);
  __m256 r5 = _mm256_mul_ps(_mm256_loadu_ps(w + 5 * ldw), scale);
  __m256 r6 = _mm256_mul_ps(_mm256_loadu_ps(w + 6 * ldw), scale);
  __m256 r7 = _mm256_mul_ps(_mm256_loadu_ps(w + 7 * ldw), scale);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * kGemmNR, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * kGemmNR, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * kGemmNR, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * kGemmNR, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * kGemmNR, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * kGemmNR, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * kGemmNR, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * kGemmNR, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// A full panel (16 rows of w) in 8 x 8 register transposes; the k % 8 tail element by element.
__attribute__((target("avx2,fma"))) void pack_panel_avx2(const float* w, int64_t k, int64_t ldw, float* dst,
                                                         float scale) {
  const __m256 sv = _mm256_set1_ps(scale);
  int64_t kk = 0;
  for (; kk + 8 <= k; kk += 8) {
    pack_8x8(w + kk, ldw, dst + kk * kGemmNR, sv);
    pack_8x8(w + 8 * ldw + kk, ldw, dst + kk * kGemmNR + 8, sv);
  }
  for (; kk < k; ++kk) {
    for (int64_t c = 0; c < kGemmNR; ++c) dst[kk * kGemmNR + c] = w[c * ldw + kk] * scale;
  }
}
}  // namespace
#endif

void pack_weight(const float* w, int64_t n, int64_t k, int64_t ldw, float* wp, float scale) {
  const int64_t panels = (n + kGemmNR - 1) / kGemmNR;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = wp + p * kGemmNR * k;
#if VK_X86_SIMD
    if (p * kGemmNR + kGemmNR <= n && simd::has_avx2()) {
      pack_panel_avx2(w + p * kGemmNR * ldw, k, ldw, dst, scale);  // the same products, in registers
      continue;
    }
#endif
    for (int64_t cidx = 0; cidx < kGemmNR; ++cidx) {
      const int64_t row = p * kGemmNR + cidx;
      if (row < n) {
        const float* src = w + row * ldw;
        for (int64_t kk = 0; kk < k; ++kk) dst[kk * kGemmNR + cidx] = src[kk] * scale;  // (x * 1 is x)
      } else {
        for (int64_t kk = 0; kk < k; ++kk) dst[kk * kGemmNR + cidx] = 0.f;
      }
    }
  }
}

bool packed_gemm_active() {
  static const bool active = [] {
    const int env = gemm_env();
    return env != 1 && simd::has_avx2();
  }();
  return active;
}

Tensor pack_gemm_weight_cpu(const Tensor& w_in) {
  VK_CHECK_CPU(w_in);
  VK_CHECK_FLOATING(w_in);
  VK_CHECK(w_in.dim() == 2, "weight must be 2-D (out_features, in_features), got ", shape_str(w_in));
  const Tensor w = f32c(w_in);
  const int64_t n = w.size(0), k = w.size(1);
  Tensor out = empty({packed_weight_numel(n, k)});
  pack_weight(f32_ptr(w), n, k, k, f32_ptr(out), 1.f);
  return out;
}

namespace {
// Element idx of a contiguous weight as fp32 (bf16 and fp16 values are exact in fp32).
float weight_at(const Tensor& w, int64_t idx) {
  switch (w.scalar_type()) {
    case ScalarType::BFloat16:
      return static_cast<float>(static_cast<const BFloat16*>(w.data_ptr())[idx]);
    case ScalarType::Half:
      return static_cast<float>(static_cast<const Half*>(w.data_ptr())[idx]);
    default:
      return static_cast<const float*>(w.data_ptr())[idx];
  }
}

// The tripwire's 16 sample positions, spread over an n x k weight (first and last included): flat
// index into w and (row, col).
constexpr int kTripwireSamples = 16;
inline int64_t tripwire_index(int s, int64_t total) {
  return s == kTripwireSamples - 1 ? total - 1 : (s * int64_t{7919} * 104729) % total;
}

// Whether the packed panels hold w: 16 elements spread over w (first and last included), each
// compared by same(packed element, w's element as fp32) at the packed offset at(row, col). In a
// forward the weights and their panels are beyond the L3, so every sample is a memory miss: all
// are requested first, then compared, so the misses overlap instead of following one another
// (the compare loop alone took ~1% of a bf16 ViT-S forward).
template <typename T, typename At, typename Same>
bool tripwire_matches(const Tensor& w, const T* wp, int64_t n, int64_t k, At at_of, Same same) {
  const int64_t total = n * k;
  if (total == 0) return true;
  const int64_t esize = w.scalar_type() == ScalarType::Float ? 4 : 2;  // (weight_at: fp32, bf16 or fp16)
  const char* wb = static_cast<const char*>(w.data_ptr());
  int64_t at[kTripwireSamples];
  for (int s = 0; s < kTripwireSamples; ++s) {
    const int64_t idx = tripwire_index(s, total);
    at[s] = at_of(idx / k, idx % k);
    __builtin_prefetch(wp + at[s]);
    __builtin_prefetch(wb + idx * esize);
  }
  for (int s = 0; s < kTripwireSamples; ++s) {
    if (!same(wp[at[s]], weight_at(w, tripwire_index(s, total)))) return false;
  }
  return true;
}

bool packed_matches(const Tensor& w, const float* wp, int64_t n, int64_t k) {
  return tripwire_matches(
      w, wp, n, k, [k](int64_t row, int64_t col) { return row / kGemmNR * kGemmNR * k + col * kGemmNR + row % kGemmNR; },
      [](float packed, float value) { return std::memcmp(&packed, &value, sizeof(float)) == 0; });
}
}  // namespace

bool bf16_gemm_active() {
#if VK_X86_SIMD
  static const bool active =
      gemm_env() != 1 && simd::has_avx512() && __builtin_cpu_supports("avx512bf16");
  return active;
#else
  return false;
#endif
}

Tensor pack_gemm_weight_bf16_cpu(const Tensor& w_in) {
  VK_CHECK_CPU(w_in);
  VK_CHECK_FLOATING(w_in);
  VK_CHECK(w_in.dim() == 2, "weight must be 2-D (out_features, in_features), got ", shape_str(w_in));
  const Tensor w = f32c(w_in);  // bf16 / fp16 values are exact in fp32: rounding from there is the same
  const int64_t n = w.size(0), k = w.size(1), kp = k + k % 2;
  Tensor out = empty({packed_weight_numel_bf16(n, k)}, ScalarType::BFloat16);
  uint16_t* dst = static_cast<uint16_t*>(out.data_ptr());
  const float* src = f32_ptr(w);
#if VK_X86_SIMD
  if (bf16_gemm_active()) {  // the attention's K packing (the same layout and rounding)
    pack_rows_bf16_avx512(src, n, k, k, dst, 1.f);
    return out;
  }
#endif
  const int64_t panels = (n + kGemmNR - 1) / kGemmNR;
  for (int64_t p = 0; p < panels; ++p) {
    uint16_t* pd = dst + p * kGemmNR * kp;
    for (int64_t j = 0; j < kGemmNR; ++j) {
      const int64_t row = p * kGemmNR + j;
      for (int64_t kk = 0; kk < kp; ++kk) {
        pd[kk / 2 * 2 * kGemmNR + 2 * j + kk % 2] = row < n && kk < k ? bf16_bits(src[row * k + kk]) : 0;
      }
    }
  }
  return out;
}

namespace {
// The bf16 tripwire: 16 elements spread over w, rounded to bf16, against the packed panels.
bool packed_matches_bf16(const Tensor& w, const uint16_t* wp, int64_t n, int64_t k) {
  const int64_t kp = k + k % 2;
  return tripwire_matches(
      w, wp, n, k,
      [kp](int64_t row, int64_t col) {
        return row / kGemmNR * kGemmNR * kp + col / 2 * 2 * kGemmNR + 2 * (row % kGemmNR) + col % 2;
      },
      [](uint16_t packed, float value) { return packed == bf16_bits(value); });
}
}  // namespace

GemmWeight gemm_weight(const Tensor& w_in, const OptTensor& p, const char* name, int64_t n, int64_t k) {
  VK_CHECK(w_in.numel() == n * k, name, ": expected a ", n, " x ", k, " weight, got ", shape_str(w_in));
  const ScalarType dt = w_in.scalar_type();
  VK_CHECK(dt == ScalarType::Float || dt == ScalarType::BFloat16 || dt == ScalarType::Half,
           name, ": the weight must be float32, bfloat16 or float16, got ", torch_dtype_name(dt));
  GemmWeight g;
  if (p.has_value() && p->scalar_type() == ScalarType::BFloat16) {
    const Tensor& t = *p;
    VK_CHECK_CPU(t);
    VK_CHECK(bf16_gemm_active(), name, " is a bf16 packed weight, but the bf16 GEMM route is not active on this CPU");
    VK_CHECK(t.dim() == 1 && t.is_contiguous() && t.numel() == packed_weight_numel_bf16(n, k), name,
             " must be a contiguous 1-D tensor of ", packed_weight_numel_bf16(n, k),
             " elements (pack_gemm_weight_bf16 of a ", n, " x ", k, " weight), got ", shape_str(t));
    const Tensor wc = contig(w_in);
    if (packed_matches_bf16(wc, static_cast<const uint16_t*>(t.data_ptr()), n, k)) {
      g.packed_bf16 = static_cast<const uint16_t*>(t.data_ptr());
      return g;
    }
  } else if (p.has_value() && packed_gemm_active()) {
    const Tensor& t = *p;
    VK_CHECK_CPU(t);
    VK_CHECK(t.scalar_type() == ScalarType::Float && t.dim() == 1 && t.is_contiguous() &&
                 t.numel() == packed_weight_numel(n, k),
             name, " must be a contiguous fp32 1-D tensor of ", packed_weight_numel(n, k),
             " elements (pack_gemm_weight of a ", n, " x ", k, " weight), got ", dtype_name(t.scalar_type()), " ",
             shape_str(t));
    const Tensor wc = contig(w_in);
    if (packed_matches(wc, f32_ptr(t), n, k)) {
      g.packed = f32_ptr(t);
      if (dt == ScalarType::Float) {
        g.f32 = wc;
        g.w = f32_ptr(wc);
      }
      return g;
    }
  }
  g.f32 = f32c(w_in);
  g.w = f32_ptr(g.f32);
  return g;
}

Tensor linear_forward_cpu(const Tensor& x_in, const Tensor& w_in, const OptTensor& bias_in, const OptTensor& w_packed) {
  VK_CHECK_CPU(x_in);
  VK_CHECK_CPU(w_in);
  VK_CHECK_FLOATING(x_in);
  VK_CHECK_FLOATING(w_in);
  VK_CHECK(x_in.dim() == 2, "x must be 2-D (rows, in_features), got ", shape_str(x_in));
  VK_CHECK(w_in.dim() == 2 && w_in.size(1) == x_in.size(1), "weight must have shape (out_features, ", x_in.size(1),
           "), got ", shape_str(w_in));
  const int64_t m = x_in.size(0), k = x_in.size(1), n = w_in.size(0);
  if (bias_in.has_value()) check_shape(*bias_in, "bias", {n});
  const Tensor x = f32c(x_in), bias = bias_in.has_value() ? f32c(*bias_in) : Tensor();
  const GemmWeight w = gemm_weight(w_in, w_packed, "weight_packed", n, k);
  const float *xp = f32_ptr(x), *bp = f32_ptr_or_null(bias);
  Tensor out = empty({m, n});
  float* op = f32_ptr(out);
  const RowInit init{nullptr, 0, bp};  // the bias, read as each output tile is stored
  if (split_columns(m, w)) {  // few rows on several threads: column tasks, each over all rows
    gemm_nt_columns(m, n, k, xp, k, w, op, n, false, {}, &init);
    return to(out, x_in.scalar_type());
  }
  const int64_t tile = w.prepacked() ? packed_tile_rows(m) : std::max<int64_t>(1, m);
  parallel_tasks((m + tile - 1) / tile, [&](auto& queue) {
    for (int64_t t; (t = queue.next()) >= 0;) {
      const int64_t r0 = t * tile, rows = std::min(tile, m - r0);
      gemm_nt(rows, n, k, xp + r0 * k, k, w, op + r0 * n, n, false, &init);
    }
  });
  return to(out, x_in.scalar_type());
}

const char* gemm_route() {
  if (!packed_gemm_active()) return blas_backend();
  return simd::has_avx512() ? "vitkern packed AVX-512 micro-kernel (prepacked weights)"
                            : "vitkern packed AVX2 micro-kernel (prepacked weights)";
}

void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* w, const float* wp, float* c,
             int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // no K (BLAS refuses a zero leading dimension and leaves C unwritten)
    if (!accumulate) clear_rows(c, m, n, ldc);
    return;
  }
  if (wp != nullptr && packed_gemm_active()) {
    gemm_packed_nt(m, n, k, a, lda, wp, c, ldc, accumulate);
    return;
  }
  // Column-major view: C^T (n x m, ldc) = W (k x n column-major, transposed) . A^T (k x m, lda).
  sgemm(true, false, n, m, k, 1.f, w, k, a, lda, accumulate ? 1.f : 0.f, c, ldc);
}

#if VK_X86_SIMD
namespace {
// A (m x k fp32, lda) as bf16 rows of kp = k + k % 2 elements, in this thread's buffer.
const uint16_t* a_rows_bf16(const float* a, int64_t m, int64_t k, int64_t lda) {
  const int64_t kp = k + k % 2;
  thread_local std::unique_ptr<uint16_t[]> abuf;
  thread_local int64_t abuf_size = 0;
  if (abuf_size < m * kp) {
    abuf.reset(new uint16_t[m * kp]);
    abuf_size = m * kp;
  }
  rows_to_bf16_avx512(a, m, k, lda, abuf.get(), kp);
  return abuf.get();
}

}  // namespace
#endif

void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const GemmWeight& w, float* c, int64_t ldc,
             bool accumulate, const RowInit* init) {
  if (m == 0 || n == 0) return;
  const RowInit in = init != nullptr && !accumulate ? *init : RowInit{};
#if VK_X86_SIMD
  if (w.packed_bf16 != nullptr) {
    const int64_t kp = k + k % 2;
    gemm_packed_bf16(m, n, kp, kp == 0 ? nullptr : a_rows_bf16(a, m, k, lda), kp, w.packed_bf16, c, ldc, accumulate,
                     kGemmNR * kp, in);
    return;
  }
  if (in.any() && w.packed != nullptr && packed_gemm_active()) {
    gemm_packed_nt(m, n, k, a, lda, w.packed, c, ldc, false, 0, in);
    return;
  }
#endif
  if (in.any()) {  // the other routes: C = init first, then accumulate onto it
    write_init(c, m, n, ldc, in);
    accumulate = true;
  }
  gemm_nt(m, n, k, a, lda, w.w, w.packed, c, ldc, accumulate);
}

void gemm_nt_bf16_out(int64_t m, int64_t n, int64_t kp, const uint16_t* ab, int64_t lda, const GemmWeight& w,
                           uint16_t* h, int64_t ldh, const TileEpilogue& epilogue) {
  VK_CHECK(w.packed_bf16 != nullptr, "gemm_nt_bf16_out: the weight must be packed as bf16");
  if (m == 0 || n == 0) return;
#if VK_X86_SIMD
  const int64_t pstride = kGemmNR * kp;
  if (kp == 0) {  // no K: the epilogue of a zero product
    Scratch c = scratch(m * n);
    gemm_packed_bf16(m, n, kp, ab, lda, w.packed_bf16, c.get(), n, false, pstride);
    epilogue(c.get(), n, 0, m, 0, n);
    rows_to_bf16_strided(c.get(), m, n, n, h, ldh);
    return;
  }
  if (kp > kKCBf16) {
    // Several K blocks (ViT-B's fc1: K 768): a row block's 64 (or 32) columns accumulate over the K
    // blocks in a (rows x 64) fp32 buffer, in L2 (60 KB at most), then take the epilogue and the bf16
    // store. Before, the whole (m x n) product went through an fp32 scratch (ViT-B batch 8's
    // 256-row tiles: 3 MB, in the L3) that the epilogue and the conversion each read back. The
    // same sums in the same order (each K block added onto the last, as gemm_packed_bf16 does).
    Scratch buf = scratch(kMC512 * 4 * kGemmNR);
    for (int64_t ic = 0; ic < m; ic += kMC512) {
      const int64_t mc = std::min(kMC512, m - ic);
      for_panel_groups(n, true, [&](int64_t p, int np, int64_t cols) {
        const Bf16Group g = bf16_group(np);
        const int64_t mrb = g.rows, ldt = g.ldt;
        for (int64_t pc = 0; pc < kp; pc += kKCBf16) {
          const int64_t kc = std::min(kKCBf16, kp - pc);
          const uint16_t* b = w.packed_bf16 + p * pstride + pc * kGemmNR;
          for (int64_t i = 0; i < mc; i += mrb) {
            const int64_t mr = std::min(mrb, mc - i);
            g.kernels[mr](kc / 2, ab + (ic + i) * lda + pc, lda, b, pstride, buf.get() + i * ldt, ldt, pc > 0,
                          RowInit{});
          }
        }
        epilogue(buf.get(), ldt, ic, mc, p * kGemmNR, cols);
        rows_to_bf16_strided(buf.get(), mc, cols, ldt, h + ic * ldh + p * kGemmNR, ldh);
      });
    }
    return;
  }
  alignas(64) float tile[kMR512 * 2 * kGemmNR];  // (kMRQuad x 4 panels: the same size)
  static_assert(kMRQuad * 4 == kMR512 * 2, "the tile holds either shape");
  for (int64_t ic = 0; ic < m; ic += kMC512) {  // row blocks (A's block stays in L2), then panel groups
    const int64_t mc = std::min(kMC512, m - ic);
    for_panel_groups(n, true, [&](int64_t p, int np, int64_t cols) {
      const uint16_t* b = w.packed_bf16 + p * pstride;
      const Bf16Group g = bf16_group(np);
      const int64_t mrb = g.rows, ldt = g.ldt;
      for (int64_t i = ic; i < ic + mc; i += mrb) {
        const int64_t mr = std::min(mrb, ic + mc - i);
        g.kernels[mr](kp / 2, ab + i * lda, lda, b, pstride, tile, ldt, false, RowInit{});
        epilogue(tile, ldt, i, mr, p * kGemmNR, cols);
        rows_to_bf16_strided(tile, mr, cols, ldt, h + i * ldh + p * kGemmNR, ldh);
      }
    });
  }
#else
  (void)ab; (void)lda; (void)h; (void)ldh; (void)epilogue; (void)kp;
#endif
}

#if VK_X86_SIMD
namespace {
__attribute__((target("avx512f,avx512bf16"))) void ln_rows_bf16_avx512(const float* x, int64_t rows, int64_t d,
                                                                       float eps, const float* w, const float* b,
                                                                       bool rms, float* mean, float* rstd,
                                                                       uint16_t* h, int64_t ldh) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    simd::ln_row_stats(xr, d, rms, eps, mean + r, rstd + r);
    const __m512 mv = _mm512_set1_ps(mean[r]), rv = _mm512_set1_ps(rstd[r]);
    uint16_t* hr = h + r * ldh;
    for (int64_t t = 0; t < d; t += 16) {
      const __mmask16 k = d - t >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (d - t)) - 1u);
      const __m512 xn = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, xr + t), mv), rv);
      const __m512 wv = w ? _mm512_maskz_loadu_ps(k, w + t) : one, bv = b ? _mm512_maskz_loadu_ps(k, b + t) : zero;
      const __m256i y = (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(xn, wv, bv));
      if (d - t >= 16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(hr + t), y);
      } else {  // (no masked 16-bit store without AVX512-BW: through a buffer)
        alignas(32) uint16_t tail[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(tail), y);
        std::memcpy(hr + t, tail, (d - t) * sizeof(uint16_t));
      }
    }
    for (int64_t t = d; t < ldh; ++t) hr[t] = 0;
  }
}
}  // namespace
#endif

#if VK_X86_SIMD
namespace {
// exp(x) for x <= 0 (a softmax numerator: x - its row's max) whose result is rounded to bf16: a
// degree-4 polynomial on the reduced argument (relative error 6e-6, against bf16's 3.9e-3 step;
// the fp32 exp_avx512 carries degree 6 for 2e-7), no upper clamp (x <= 0). -inf and anything
// below -104 give 0, NaN stays NaN (max returns its second operand when either is NaN).
__attribute__((target("avx512f"))) inline __m512 exp_nonpos_bf16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(0.0409174040f), r, _mm512_set1_ps(0.167539760f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.500089288f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, fx);
}

__attribute__((target("avx512f,avx512bf16"))) float exp_sub_sum_bf16_avx512(const float* x, int64_t n, float shift,
                                                                            uint16_t* p, int64_t np) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 y = exp_nonpos_bf16(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i), (__m256i)_mm512_cvtneps_pbh(y));
    acc = _mm512_add_ps(acc, y);
  }
  if (i < n) {  // masked tail; the bf16 lanes past n (up to the pad) are zero
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 y = _mm512_maskz_mov_ps(m, exp_nonpos_bf16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), sh)));
    alignas(32) uint16_t tail[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tail), (__m256i)_mm512_cvtneps_pbh(y));
    std::memcpy(p + i, tail, (std::min<int64_t>(np, i + 16) - i) * sizeof(uint16_t));
    acc = _mm512_add_ps(acc, y);
    i = std::min<int64_t>(np, i + 16);
  }
  for (; i < np; ++i) p[i] = 0;
  return _mm512_reduce_add_ps(acc);
}
}  // namespace
#endif

#if VK_X86_SIMD
namespace {
__attribute__((target("avx512f,avx512bf16"))) void scale_rows_to_bf16_avx512(const float* acc, int64_t rows,
                                                                             int64_t dh, const float* l, uint16_t* dst,
                                                                             int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    const float* a = acc + r * dh;
    uint16_t* d = dst + r * ldd;
    int64_t t = 0;
    for (; t + 16 <= dh; t += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + t),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(a + t), inv)));
    }
    if (t < dh) {
      const __mmask16 m = static_cast<__mmask16>((1u << (dh - t)) - 1u);
      alignas(32) uint16_t tail[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tail),
                         (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + t), inv)));
      std::memcpy(d + t, tail, (dh - t) * sizeof(uint16_t));
    }
  }
}
}  // namespace
#endif

void scale_rows_to_bf16(const float* acc, int64_t rows, int64_t dh, const float* l, uint16_t* dst, int64_t ldd) {
  VK_CHECK(bf16_gemm_active(), "scale_rows_to_bf16: the bf16 GEMM route is not active");
#if VK_X86_SIMD
  scale_rows_to_bf16_avx512(acc, rows, dh, l, dst, ldd);
#else
  (void)acc; (void)rows; (void)dh; (void)l; (void)dst; (void)ldd;
#endif
}

float exp_sub_sum_bf16(const float* x, int64_t n, float shift, uint16_t* p, int64_t np) {
  VK_CHECK(bf16_gemm_active(), "exp_sub_sum_bf16: the bf16 GEMM route is not active");
#if VK_X86_SIMD
  return exp_sub_sum_bf16_avx512(x, n, shift, p, np);
#else
  (void)x; (void)n; (void)shift; (void)p; (void)np;
  return 0.f;
#endif
}

void ln_rows_bf16(const float* x, int64_t rows, int64_t d, float eps, const float* w, const float* b, bool rms,
                  float* mean, float* rstd, uint16_t* h, int64_t ldh) {
  VK_CHECK(bf16_gemm_active(), "ln_rows_bf16: the bf16 GEMM route is not active");
#if VK_X86_SIMD
  ln_rows_bf16_avx512(x, rows, d, eps, w, b, rms, mean, rstd, h, ldh);
#else
  (void)x; (void)rows; (void)d; (void)eps; (void)w; (void)b; (void)rms; (void)mean; (void)rstd; (void)h; (void)ldh;
#endif
}

void rows_to_bf16(const float* a, int64_t rows, int64_t k, int64_t lda, uint16_t* dst, int64_t kp) {
  VK_CHECK(bf16_gemm_active(), "rows_to_bf16: the bf16 GEMM route is not active");
#if VK_X86_SIMD
  rows_to_bf16_avx512(a, rows, k, lda, dst, kp);
#endif
}

void pack_rows_bf16(const float* w, int64_t n, int64_t k, int64_t ldw, uint16_t* wp, float scale) {
  VK_CHECK(bf16_gemm_active(), "pack_rows_bf16: the bf16 GEMM route is not active");
#if VK_X86_SIMD
  pack_rows_bf16_avx512(w, n, k, ldw, wp, scale);
#endif
}

void pack_columns_bf16(const float* b, int64_t k, int64_t n, int64_t ldb, uint16_t* bp) {
  VK_CHECK(bf16_gemm_active(), "pack_columns_bf16: the bf16 GEMM route is not active");
#if VK_X86_SIMD
  pack_columns_bf16_avx512(b, k, n, ldb, bp);
#endif
}

void gemm_packed_bf16_nt(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* wp,
                         float* c, int64_t ldc, bool accumulate, int64_t pstride, const RowInit* init) {
  VK_CHECK(bf16_gemm_active(), "gemm_packed_bf16_nt: the bf16 GEMM route is not active");
  if (m == 0 || n == 0) return;
#if VK_X86_SIMD
  gemm_packed_bf16(m, n, kp, a, lda, wp, c, ldc, accumulate, pstride > 0 ? pstride : kGemmNR * kp,
                   init != nullptr && !accumulate ? *init : RowInit{});
#else
  (void)init;
#endif
}

namespace {
// The column split's tasks, threaded: body(c0, cols) for each task's columns [c0, c0 + cols).
// Tasks are whole panel pairs (32 columns; an even number of them past one, so that the tasks run
// 64-column tiles), about kTasksPerThread per thread.
template <typename F>
void for_column_tasks(int64_t n, F&& body) {
  const int64_t pairs = (n + 2 * kGemmNR - 1) / (2 * kGemmNR);
  const int64_t tasks_wanted = std::max<int64_t>(1, num_threads() * kTasksPerThread);
  int64_t pairs_per_task = std::max<int64_t>(1, (pairs + tasks_wanted - 1) / tasks_wanted);
  if (pairs_per_task > 1) pairs_per_task += pairs_per_task % 2;
  const int64_t per_task = pairs_per_task * 2 * kGemmNR;
  parallel_tasks((n + per_task - 1) / per_task, [&](auto& queue) {
    for (int64_t t; (t = queue.next()) >= 0;) body(t * per_task, std::min(per_task, n - t * per_task));
  });
}

// gemm_nt_columns over fp32 A (a, lda) or, on the bf16 route, bf16 A rows (a16, lda16; k then
// counts the bf16 row's elements and is even).
void columns_impl(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const uint16_t* a16, int64_t lda16,
                  const GemmWeight& w, float* c, int64_t ldc, bool accumulate,
                  const std::function<void(int64_t, int64_t)>& epilogue, const RowInit* init) {
  const int64_t kp = k + k % 2;
  for_column_tasks(n, [&](int64_t c0, int64_t cols) {
    float* ct = c + c0;
    // (this task's columns of the starting value: each task reads or writes its own)
    const RowInit in = init != nullptr && !accumulate ? init->shifted(0, c0) : RowInit{};
#if VK_X86_SIMD
    if (w.packed_bf16 != nullptr) {
      gemm_packed_bf16(m, cols, kp, a16, lda16, w.packed_bf16 + c0 * kp, ct, ldc, accumulate, kGemmNR * kp, in);
      if (epilogue) epilogue(c0, cols);
      return;
    }
#endif
    gemm_packed_nt(m, cols, k, a, lda, w.packed + c0 * k, ct, ldc, accumulate, 0, in);
    if (epilogue) epilogue(c0, cols);
  });
}
}  // namespace

void gemm_nt_columns(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const GemmWeight& w, float* c,
                     int64_t ldc, bool accumulate, const std::function<void(int64_t, int64_t)>& epilogue,
                     const RowInit* init) {
  VK_CHECK(w.prepacked(), "gemm_nt_columns: the weight must be prepacked");
  if (m == 0 || n == 0) return;
  const int64_t kp = k + k % 2;
  Scratch a16_buf = scratch(w.packed_bf16 != nullptr ? (m * kp + 1) / 2 : 0);
  uint16_t* a16 = reinterpret_cast<uint16_t*>(a16_buf.get());
#if VK_X86_SIMD
  if (w.packed_bf16 != nullptr) {  // A rounded to bf16 once, shared by the tasks; row chunks on every thread
    const int64_t rt = task_rows(m, 64, 8, 1);
    parallel_tasks((m + rt - 1) / rt, [&](auto& queue) {
      for (int64_t t; (t = queue.next()) >= 0;) {
        const int64_t r0 = t * rt;
        rows_to_bf16_avx512(a + r0 * lda, std::min(rt, m - r0), k, lda, a16 + r0 * kp, kp);
      }
    });
  }
#endif
  columns_impl(m, n, k, a, lda, a16, kp, w, c, ldc, accumulate, epilogue, init);
}

void gemm_nt_columns_bf16_out(int64_t m, int64_t n, int64_t kp, const uint16_t* a16, int64_t lda16,
                              const GemmWeight& w, uint16_t* h, int64_t ldh, const TileEpilogue& epilogue) {
  VK_CHECK(w.packed_bf16 != nullptr, "gemm_nt_columns_bf16_out: the weight must be packed as bf16");
  VK_CHECK(kp % 2 == 0, "gemm_nt_columns_bf16_out: the bf16 rows must have an even length, got ", kp);
  if (m == 0 || n == 0) return;
  for_column_tasks(n, [&](int64_t c0, int64_t cols) {
    GemmWeight wt;
    wt.packed_bf16 = w.packed_bf16 + c0 * kp;  // the task's panels (c0 is a multiple of 16)
    gemm_nt_bf16_out(m, cols, kp, a16, lda16, wt, h + c0, ldh,
                     [&](float* tile, int64_t ldt, int64_t r0, int64_t rows, int64_t tc0, int64_t nc) {
                       epilogue(tile, ldt, r0, rows, c0 + tc0, nc);
                     });
  });
}

void gemm_nt_columns_bf16a(int64_t m, int64_t n, int64_t kp, const uint16_t* a16, int64_t lda16, const GemmWeight& w,
                           float* c, int64_t ldc, bool accumulate,
                           const std::function<void(int64_t, int64_t)>& epilogue, const RowInit* init) {
  VK_CHECK(w.packed_bf16 != nullptr, "gemm_nt_columns_bf16a: the weight must be packed as bf16");
  VK_CHECK(kp % 2 == 0, "gemm_nt_columns_bf16a: the bf16 rows must have an even length, got ", kp);
  if (m == 0 || n == 0) return;
  columns_impl(m, n, kp, nullptr, 0, a16, lda16, w, c, ldc, accumulate, epilogue, init);
}

// The backward's products on the packed GEMM route (gemm.h): B packed into 16-column panels
// (threaded over panels), then row tiles of C threaded over gemm_packed_nt / _tn. The same sums
// for any thread count (each element's K loop is one micro-kernel's, in one order).
namespace {
void pack_columns_threaded(const float* b, int64_t k, int64_t n, int64_t ldb, float* bp) {
  const int64_t panels = (n + kGemmNR - 1) / kGemmNR, per = 8;  // 8 panels (128 columns) a task
  parallel_tasks((panels + per - 1) / per, [&](auto& queue) {
    for (int64_t t; (t = queue.next()) >= 0;) {
      const int64_t c0 = t * per * kGemmNR, cols = std::min(per * kGemmNR, n - c0);
      pack_columns(b + c0, k, cols, ldb, bp + c0 * k);
    }
  });
}
}  // namespace

// C (m x n, row-major) = A (m x k, lda) . B (k x n, ldb).
Tensor packed_mm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb) {
  Scratch bp = scratch(packed_weight_numel(n, k));
  pack_columns_threaded(b, k, n, ldb, bp.get());
  Tensor out = empty({m, n});
  float* c = f32_ptr(out);
  const int64_t tile = packed_tile_rows(m);
  parallel_tasks((m + tile - 1) / tile, [&](auto& queue) {
    for (int64_t t; (t = queue.next()) >= 0;) {
      const int64_t r0 = t * tile, rows = std::min(tile, m - r0);
      gemm_packed_nt(rows, n, k, a + r0 * lda, lda, bp.get(), c + r0 * n, n, false);
    }
  });
  return out;
}

// C (m x n) = A^T . B with A (k x m, lda) and B (k x n, ldb): a weight gradient, summed over the k rows.
Tensor packed_mm_tn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb) {
  Scratch bp = scratch(packed_weight_numel(n, k));
  pack_columns_threaded(b, k, n, ldb, bp.get());
  Tensor out = empty({m, n});
  float* c = f32_ptr(out);
  const int64_t tile = task_rows(m, 96, 24, 12);
  parallel_tasks((m + tile - 1) / tile, [&](auto& queue) {
    for (int64_t t; (t = queue.next()) >= 0;) {
      const int64_t r0 = t * tile, rows = std::min(tile, m - r0);
      gemm_packed_tn(rows, n, k, a + r0, lda, bp.get(), c + r0 * n, n, false);
    }
  });
  return out;
}

Tensor packed_matmul_cpu(const Tensor& a_in, const Tensor& b_in, bool trans_a) {
  VK_CHECK_CPU(a_in);
  VK_CHECK_CPU(b_in);
  VK_CHECK(a_in.dim() == 2 && b_in.dim() == 2, "packed_matmul: a and b must be 2-D, got ", shape_str(a_in), " and ",
           shape_str(b_in));
  VK_CHECK(a_in.size(trans_a ? 0 : 1) == b_in.size(0), "packed_matmul: a", trans_a ? "^T" : "", " ",
           shape_str(a_in), " and b ", shape_str(b_in), " do not chain");
  VK_CHECK(packed_gemm_active(), "packed_matmul: the packed GEMM route is not active");
  const Tensor a = f32c(a_in), b = f32c(b_in);
  const int64_t n = b.size(1), k = b.size(0), m = trans_a ? a.size(1) : a.size(0);
  if (m == 0 || n == 0) return empty({m, n});
  if (k == 0) return zeros({m, n});
  return trans_a ? packed_mm_tn(m, n, k, f32_ptr(a), m, f32_ptr(b), n) : packed_mm(m, n, k, f32_ptr(a), k, f32_ptr(b), n);
}

namespace {
template <bool AT>
void packed_product(const char* name, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* wp,
                    float* c, int64_t ldc, bool accumulate, int64_t panel_stride, const RowInit& init = {}) {
  VK_CHECK(packed_gemm_active(), name, ": the packed GEMM route is not active");
  if (m == 0 || n == 0) return;
#if VK_X86_SIMD
  if (k == 0) {  // no K: C = init (or 0), or unchanged when accumulating
    if (!accumulate) init.any() ? write_init(c, m, n, ldc, init) : clear_rows(c, m, n, ldc);
    return;
  }
  const int64_t ps = panel_stride > 0 ? panel_stride : kGemmNR * k;
  if (simd::has_avx512()) {
    gemm_packed_512<AT>(m, n, k, a, lda, wp, c, ldc, accumulate, ps, init);
  } else {
    gemm_packed<AT>(m, n, k, a, lda, wp, c, ldc, accumulate, ps, init);
  }
#else
  (void)init;
#endif
}
}  // namespace

void gemm_packed_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* wp, float* c,
                    int64_t ldc, bool accumulate, int64_t panel_stride, const RowInit& init) {
  packed_product<false>("gemm_packed_nt", m, n, k, a, lda, wp, c, ldc, accumulate, panel_stride, init);
}

void gemm_packed_tn(int64_t m, int64_t n, int64_t k, const float* at, int64_t lda, const float* wp, float* c,
                    int64_t ldc, bool accumulate, int64_t panel_stride) {
  packed_product<true>("gemm_packed_tn", m, n, k, at, lda, wp, c, ldc, accumulate, panel_stride);
}

void pack_columns(const float* b, int64_t k, int64_t n, int64_t ldb, float* bp) {
  const int64_t panels = (n + kGemmNR - 1) / kGemmNR;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t c0 = p * kGemmNR, cols = std::min(kGemmNR, n - c0);
    float* dst = bp + p * kGemmNR * k;
    if (cols == kGemmNR) {  // (a constant-size copy: inlined, not a libc call per 64 bytes)
      for (int64_t kk = 0; kk < k; ++kk) std::memcpy(dst + kk * kGemmNR, b + kk * ldb + c0, sizeof(float) * kGemmNR);
      continue;
    }
    for (int64_t kk = 0; kk < k; ++kk) {
      std::memcpy(dst + kk * kGemmNR, b + kk * ldb + c0, sizeof(float) * cols);
      std::memset(dst + kk * kGemmNR + cols, 0, sizeof(float) * (kGemmNR - cols));
    }
  }
}

}  // namespace vitkern
