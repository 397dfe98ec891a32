// vitkern's own fp32 GEMM for the CPU kernels' weight products, C = A . W^T, with the weight
// W (n x k, row-major: an nn.Linear weight) prepacked once into column panels.
//
// Why: torch's bundled MKL runs `sgemm` on its generic path on AMD CPUs: 50-80% of the core's
// FMA peak at ViT shapes on Zen 3, under half of it on Zen 5 (~100 of ~225 GFLOP/s per core).
// Over a prepacked weight a 6 x 16 AVX2+FMA micro-kernel reaches 85-94% (Zen 3), a 12 x 32
// AVX-512 one 90-100% (Zen 5: the rate of oneDNN's own packed-weight matmul), and on CPUs with
// AVX512-BF16 a bf16 micro-kernel (vdpbf16ps, fp32 sums) twice that (benchmarks/NOTES.md).
// VITKERN_GEMM=blas sends the products back to BLAS.
//
// Packed layout: panels of kGemmNR = 16 output columns (weight rows); panel p holds, for each
// k, W[16p .. 16p+15][k] contiguously (zero-filled past n). numel = ceil(n / 16) * 16 * k.
#pragma once

#include <cstdint>
#include <functional>

#include "checks.h"

namespace vitkern {

constexpr int64_t kGemmNR = 16;

inline int64_t packed_weight_numel(int64_t n, int64_t k) { return (n + kGemmNR - 1) / kGemmNR * kGemmNR * k; }

// W (n x k, row-major, leading dimension ldw) times scale -> packed panels (packed_weight_numel(n, k) floats).
void pack_weight(const float* w, int64_t n, int64_t k, int64_t ldw, float* wp, float scale = 1.f);

// Whether the weight GEMMs take the packed route: this build has x86 SIMD, the CPU has AVX2+FMA
// (within the VITKERN_SIMD cap; the AVX-512 kernel where avx512f is in it too) and
// VITKERN_GEMM is not "blas". Read once.
bool packed_gemm_active();
const char* gemm_route();

// C (m x n, leading dimension ldc) = A (m x k, lda) . W^T, or C += A . W^T when accumulate.
// wp: W packed (pack_weight) -> the packed route; null -> BLAS on w (ldw = k). The packed route
// must be active when wp is given.
void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* w, const float* wp, float* c,
             int64_t ldc, bool accumulate);

// The starting value of a product C = init + A . W^T: the rows of a residual (m x n, `ld` apart)
// and/or a bias (n), either may be null. The packed kernels (AVX2 and AVX-512) add it to each
// output tile of the first K block as they store it, in place of a separate pass that wrote it into
// C for the product to read back and accumulate onto (the same sums: tile + (row + bias)); BLAS
// routes write it first. shifted(r, c): the same for the block at row r, column c.
struct RowInit {
  const float* rows = nullptr;
  int64_t ld = 0;
  const float* bias = nullptr;
  bool any() const { return rows != nullptr || bias != nullptr; }
  RowInit shifted(int64_t r, int64_t c) const {
    return {rows != nullptr ? rows + r * ld + c : nullptr, ld, bias != nullptr ? bias + c : nullptr};
  }
};

// C (m x n, ldc) (+)= A (m x k, lda) . W^T on the packed route with W given only packed (pack_weight,
// or pack_columns of W^T); the route must be active (RuntimeError otherwise). panel_stride: floats
// between panels, 0 for 16 * k (a whole packed matrix); larger when the product takes k-range
// [k0, k0 + k) of panels packed over a longer K (then wp points at row k0 of the first panel).
// sp_attention's Q . K^T and P . V. Without `accumulate`, C = init + A . W^T (init: see RowInit).
void gemm_packed_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* wp, float* c,
                    int64_t ldc, bool accumulate, int64_t panel_stride = 0, const RowInit& init = {});

// The same with A given transposed: C (m x n) (+)= A^T . W^T, where `at` is A^T, (k x m) row-major
// with leading dimension lda (element (i, kk) of A at at[kk * lda + i]). The weight gradients' and
// the attention backward's products over the rows of a (rows x n) matrix: dY^T . X, P^T . dO.
void gemm_packed_tn(int64_t m, int64_t n, int64_t k, const float* at, int64_t lda, const float* wp, float* c,
                    int64_t ldc, bool accumulate, int64_t panel_stride = 0);

// B (k x n, row-major, ldb) -> panels of 16 columns (packed_weight_numel(n, k) floats, zero-filled
// past n): the packed form of W = B^T, so that A . B = gemm_packed_nt(A, packed).
void pack_columns(const float* b, int64_t k, int64_t n, int64_t ldb, float* bp);

// A GEMM weight w (n x k, row-major; fp32, or bf16/fp16 for half-precision inputs, which the kernels
// compute in fp32) as a cpu kernel reads it, with its optional prepacked copy p (an op argument).
// `packed` is p when it is given, the packed route is on and p matches w; then w is not converted
// and `w` may be null. Otherwise `packed` is null and `w` points at w in fp32 (a converted copy,
// held in `f32`, for a half weight), and the op calls BLAS on it. p must be an fp32 contiguous 1-D
// tensor of packed_weight_numel(n, k) elements (else RuntimeError). The Python cache repacks on
// every tracked change of w (vitkern/ops/_packed.py); as a tripwire for an untracked one (an
// in-place change through `w.data`, which has its own version counter), 16 elements spread over w
// are compared with their packed copies (exactly: a half weight's values are fp32 numbers), and
// on a mismatch the call computes from w itself.
//
// p may instead be a bf16 packed weight (pack_gemm_weight_bf16; only where bf16_gemm_active()):
// then `packed_bf16` is set, `w` and `packed` are null, and the product runs on the bf16 route:
// the A rows rounded to bf16, bf16 x bf16 products summed in fp32 (vdpbf16ps). The tripwire
// compares w's elements rounded to bf16 with the packed ones.
struct GemmWeight {
  Tensor f32;  // keeps a converted or contiguous weight alive
  const float* w = nullptr;
  const float* packed = nullptr;
  const uint16_t* packed_bf16 = nullptr;
  bool prepacked() const { return packed != nullptr || packed_bf16 != nullptr; }
};
GemmWeight gemm_weight(const Tensor& w, const OptTensor& p, const char* name, int64_t n, int64_t k);

// C (m x n, ldc) (+)= A (m x k, fp32, lda) . W^T through whichever form of W `w` holds: the bf16
// packed panels (A converted to bf16 rows on the way), the fp32 packed panels, or BLAS on w.
// With `init` (and accumulate false): C = init + A . W^T.
void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const GemmWeight& w, float* c, int64_t ldc,
             bool accumulate, const RowInit* init = nullptr);

// bf16 inference's fc1 -> fc2 hand-off: H (m x n bf16, ldh elements per row) = epilogue(A . W^T)
// rounded to bf16, from A's bf16 rows (ab: m x kp, lda elements apart, kp = K padded to even: the
// LayerNorm writes them, ln_rows_bf16) on the bf16 packed panels of W (w.packed_bf16 required).
// Each product tile (6 rows x 64 columns, or 12 x 32 for the last columns) goes through
// `epilogue(tile, ldt, r0, rows, c0, cols)` (fp32, in place) while it is still in L1, then is
// stored as bf16: no fp32 (m x n) activation is written and read back (fc1's output for ViT-S
// batch 1 is 1.2 MB, beyond a 1 MB L2: the GELU pass and the conversion for fc2 each went through
// the L3). K beyond one bf16 K block (512) accumulates a row block's 64 (or 32) columns in an fp32
// buffer first. Single-threaded: the
// caller's row tile.
using TileEpilogue = std::function<void(float*, int64_t, int64_t, int64_t, int64_t, int64_t)>;
void gemm_nt_bf16_out(int64_t m, int64_t n, int64_t kp, const uint16_t* ab, int64_t lda, const GemmWeight& w,
                      uint16_t* h, int64_t ldh, const TileEpilogue& epilogue);

// bf16 inference's LayerNorm prologue: LayerNorm (RMSNorm when rms) of `rows` rows of x (d fp32)
// written straight as the bf16 A rows of the next GEMM (ldh elements apart, the columns past d
// zero), mean and 1/std as ln_rows stores them. One pass less than ln_rows then the A-row
// conversion (an fp32 copy of the rows written and read back). The route must be active.
void ln_rows_bf16(const float* x, int64_t rows, int64_t d, float eps, const float* w, const float* b, bool rms,
                  float* mean, float* rstd, uint16_t* h, int64_t ldh);

// bf16 attention's softmax numerator: p[i] = exp(x[i] - shift) rounded to bf16 for i < n and 0 up
// to np (the PV product's even K), in one pass with the exp; returns the sum of the fp32 exps (x
// is left as it was; shift >= every x[i]). The exp is a shorter polynomial than the fp32 pass's
// (relative error 6e-6, far below the bf16 rounding that follows). The route must be active.
float exp_sub_sum_bf16(const float* x, int64_t n, float shift, uint16_t* p, int64_t np);

// dst row r (ldd elements apart) = acc row r (dh fp32) times 1 / l[r], rounded to bf16: the bf16
// attention's normalised output straight into the next GEMM's A rows. The route must be active.
void scale_rows_to_bf16(const float* acc, int64_t rows, int64_t dh, const float* l, uint16_t* dst, int64_t ldd);

// Few rows on several threads (batch-1 inference): the output columns are split among the threads
// instead of the rows. Row tiles would each read the whole weight (ViT-S batch 1 on two threads:
// seven 30-row tiles, seven passes over each weight); column tasks read it once in all. Whether
// m rows on this many threads take that path: a prepacked weight, more than one thread and fewer
// than kColumnSplitRows rows per thread.
constexpr int64_t kColumnSplitRows = 128;
inline bool split_columns(int64_t m, const GemmWeight& w) {
  return w.prepacked() && num_threads() > 1 && m < kColumnSplitRows * num_threads();
}
// C (m x n, ldc) (+)= A (m x k, fp32, lda) . W^T on a prepacked W, threaded over column tasks of
// whole panel pairs (about four per thread), each over all m rows; per task, `epilogue(c0, cols)`
// (may be empty) runs on the task's columns [c0, c0 + cols) of every row after the product. The
// same sums as gemm_nt, bit for bit.
// With `init` (and accumulate false) C = init + A . W^T, each task starting its own columns.
void gemm_nt_columns(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const GemmWeight& w, float* c,
                     int64_t ldc, bool accumulate, const std::function<void(int64_t, int64_t)>& epilogue = {},
                     const RowInit* init = nullptr);

// The same from A already in bf16 rows (a16: m x kp, lda16 elements apart, kp even), on a bf16
// packed W: the column split's GEMMs whose A an earlier pass wrote as bf16 itself (the LayerNorm,
// fc1's column tasks, the attention's output).
void gemm_nt_columns_bf16a(int64_t m, int64_t n, int64_t kp, const uint16_t* a16, int64_t lda16, const GemmWeight& w,
                           float* c, int64_t ldc, bool accumulate,
                           const std::function<void(int64_t, int64_t)>& epilogue = {}, const RowInit* init = nullptr);
// gemm_nt_bf16_out threaded over the same column tasks: H's columns of each task as bf16, each
// product tile through `epilogue` (its c0 counted from H's first column) while it is in L1.
void gemm_nt_columns_bf16_out(int64_t m, int64_t n, int64_t kp, const uint16_t* a16, int64_t lda16,
                              const GemmWeight& w, uint16_t* h, int64_t ldh, const TileEpilogue& epilogue);

// C (m x n) = A (m x k, lda) . B (k x n, ldb), and C = A^T . B with A (k x m, lda), on the packed
// route (B packed per call, threaded over panels; row tiles of C threaded): the layernorm_mlp
// backward's products and packed_matmul's.
Tensor packed_mm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb);
Tensor packed_mm_tn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb);
// packed_matmul(a, b, trans_a) -> a . b or a^T . b (fp32, 2-D, contiguous after conversion): the
// backward of the models' attention linears in training on the packed route (vitkern/ops/_packed.py).
Tensor packed_matmul_cpu(const Tensor& a, const Tensor& b, bool trans_a);

// ---- the bf16 route (AVX512-BF16: AMD Zen 4/5, Intel Cooper Lake, Sapphire Rapids and later)
// Whether this build and CPU run the bf16 micro-kernel (x86 SIMD compiled in, avx512f and
// avx512_bf16 on the CPU within the VITKERN_SIMD cap, VITKERN_GEMM not "blas"). Read once.
bool bf16_gemm_active();
// Packed bf16 layout: the same 16-column panels, K padded to an even kp = k + k % 2, and within
// a panel the k-pairs (2t, 2t + 1) of the 16 columns interleaved: element (row j of the panel,
// k) at t * 32 + 2 * j + k % 2 with t = k / 2 (what vdpbf16ps multiplies pairwise).
inline int64_t packed_weight_numel_bf16(int64_t n, int64_t k) {
  return (n + kGemmNR - 1) / kGemmNR * kGemmNR * (k + k % 2);
}
// The bf16 route's pieces for products whose operands are not weights (sp_attention's Q . K^T
// and P . V in bf16 inference). rows_to_bf16: rows x k fp32 (lda) -> rows x kp bf16, the pad
// column zero. pack_rows_bf16: W (n x k fp32, ldw) times scale -> the packed bf16 layout.
// pack_columns_bf16: B (k x n fp32, ldb) -> the packed bf16 layout of W = B^T. gemm_packed_bf16_nt:
// C (m x n, ldc) (+)= A (m x kp bf16, lda) . W^T over packed panels kp long, pstride elements
// apart (0: kGemmNR * kp); the route must be active (RuntimeError otherwise).
void rows_to_bf16(const float* a, int64_t rows, int64_t k, int64_t lda, uint16_t* dst, int64_t kp);
void pack_rows_bf16(const float* w, int64_t n, int64_t k, int64_t ldw, uint16_t* wp, float scale);
void pack_columns_bf16(const float* b, int64_t k, int64_t n, int64_t ldb, uint16_t* bp);
void gemm_packed_bf16_nt(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* wp,
                         float* c, int64_t ldc, bool accumulate, int64_t pstride = 0, const RowInit* init = nullptr);

// pack_gemm_weight_bf16(w (n, k), any float dtype) -> (packed_weight_numel_bf16(n, k),) bf16,
// w's values rounded to nearest-even bf16.
Tensor pack_gemm_weight_bf16_cpu(const Tensor& w);

// pack_gemm_weight(w (n, k)) -> the packed fp32 panels (packed_weight_numel(n, k),).
Tensor pack_gemm_weight_cpu(const Tensor& w);

// linear_forward(x (m, k), w (n, k), bias (n,) or None, w packed or None) -> x . w^T + bias, (m, n),
// in x's dtype (fp32 inside), threaded over row tiles: the inference path of the models'
// nn.Linear layers on the packed route (vitkern/ops/_packed.py: linear).
Tensor linear_forward_cpu(const Tensor& x, const Tensor& w, const OptTensor& bias, const OptTensor& w_packed);

// Row tiles of a packed-route GEMM over m rows, the tasks of parallel_tasks: at most
// kPackedTileRows rows (the weights are packed once, so tiles can be small), with more than one
// thread about four tasks per thread of at least 24 rows, in multiples of the micro-kernel's 6
// rows. ViT-S batch 1 (197 rows): one tile on one thread, 7 tiles of 30 on two.
constexpr int64_t kPackedTileRows = 256;
inline int64_t packed_tile_rows(int64_t m) {
  return task_rows(m, kPackedTileRows, 24, 6);
}

}  // namespace vitkern
