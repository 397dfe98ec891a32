// One pre-norm ViT block for eager CPU inference in a single call (block.h):
//
//   a = x + proj(attention(qkv(LayerNorm1(x))))     attention: sp_attention_forward_cpu, with the
//                                                   spatial prior when omega is given
//   y = a + fc2(act(fc1(LayerNorm2(a))))            layernorm_mlp_forward_cpu
//
// Why: the block's kernels take ~10 ms at ViT-S batch 1 on one core, and the Python around them
// (module calls, argument checks, dispatch, norm1 and the residual add as separate torch ops)
// took ~0.9 ms per block on top (benchmarks/NOTES.md, "The block in one call"). Here norm1 is the
// qkv GEMM's prologue (per row tile, the normalised rows never leave the tile buffer) and the
// residual and proj bias are the proj GEMM's starting value, as fc2's are in layernorm_mlp.
#include "block.h"

#include <algorithm>
#include <utility>

#include "blas.h"
#include "checks.h"
#include "gemm.h"
#include "layernorm_mlp.h"
#include "sp_attention.h"

namespace vitkern {
namespace {

// The module-by-module forward this call replaces would refuse an input with parameters of another
// dtype or device (F.linear, F.layer_norm): so does this. x and the parameters are fp32, or all
// bf16 / all fp16 (computed in fp32, the output rounded once to x's dtype: the Python side takes
// this path for half precision only on CPUs without half-precision GEMM hardware).
void check_param(const OptTensor& t, const char* name, ScalarType dtype) {
  if (!t.has_value()) return;
  VK_CHECK(t->is_cpu(), "block_forward: ", name, " must be on the CPU, got ", device_str(*t));
  VK_CHECK(t->scalar_type() == dtype, "block_forward: ", name, " must be ", torch_dtype_name(dtype), " like x, got ",
           torch_dtype_name(t->scalar_type()));
}

}  // namespace

Tensor block_forward_cpu(const Tensor& x_in, const OptTensor& ln1_w_in, const OptTensor& ln1_b_in, double eps1,
                         const Tensor& qkv_w_in, const OptTensor& qkv_b_in, const OptTensor& qkv_packed,
                         const Tensor& proj_w_in, const OptTensor& proj_b_in, const OptTensor& proj_packed,
                         const OptTensor& omega, int64_t gh, int64_t gw, int64_t num_prefix, int64_t heads,
                         double scale, const OptTensor& ln2_w, const OptTensor& ln2_b, double eps2,
                         const Tensor& fc1_w, const OptTensor& fc1_b, const OptTensor& fc1_packed, const Tensor& fc2_w,
                         const OptTensor& fc2_b, const OptTensor& fc2_packed, int64_t act) {
  VK_CHECK_CPU(x_in);
  VK_CHECK(x_in.dim() == 3, "x must have shape (batch, tokens, dim), got ", shape_str(x_in));
  const ScalarType dt = x_in.scalar_type();
  VK_CHECK(dt == kFloat || dt == ScalarType::BFloat16 || dt == ScalarType::Half,
           "block_forward: x must be float32, bfloat16 or float16, got ", torch_dtype_name(dt));
  const std::pair<const OptTensor*, const char*> params[] = {
      {&ln1_w_in, "norm1_weight"}, {&ln1_b_in, "norm1_bias"}, {&qkv_b_in, "qkv_bias"}, {&proj_b_in, "proj_bias"},
      {&ln2_w, "norm2_weight"},    {&ln2_b, "norm2_bias"},    {&fc1_b, "fc1_bias"},    {&fc2_b, "fc2_bias"}};
  for (const auto& [t, name] : params) check_param(*t, name, dt);
  // The prior's table: in the parameters' dtype, or fp32 (sp_attention's mixed-precision omega).
  check_param(omega, "omega", omega.has_value() && omega->scalar_type() == kFloat ? kFloat : dt);
  check_param(qkv_w_in, "qkv_weight", dt);
  check_param(proj_w_in, "proj_weight", dt);
  check_param(fc1_w, "fc1_weight", dt);
  check_param(fc2_w, "fc2_weight", dt);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), M = B * N;
  VK_CHECK(heads > 0 && D % heads == 0, "heads must divide dim ", D, ", got ", heads);
  check_shape(qkv_w_in, "qkv_weight", {3 * D, D});
  check_shape(proj_w_in, "proj_weight", {D, D});
  if (qkv_b_in.has_value()) check_shape(*qkv_b_in, "qkv_bias", {3 * D});
  if (proj_b_in.has_value()) check_shape(*proj_b_in, "proj_bias", {D});
  if (ln1_w_in.has_value()) check_shape(*ln1_w_in, "norm1_weight", {D});
  if (ln1_b_in.has_value()) check_shape(*ln1_b_in, "norm1_bias", {D});
  const int64_t Dh = D / heads;
  const Tensor x = f32c(x_in);
  const GemmWeight qkv_w = gemm_weight(qkv_w_in, qkv_packed, "qkv_packed", 3 * D, D);
  const GemmWeight proj_w = gemm_weight(proj_w_in, proj_packed, "proj_packed", D, D);
  const Tensor qkv_b = opt_f32(qkv_b_in), proj_b = opt_f32(proj_b_in), ln1_w = opt_f32(ln1_w_in),
               ln1_b = opt_f32(ln1_b_in);
  const float* xp = f32_ptr(x);
  const float *qbp = f32_ptr_or_null(qkv_b), *pbp = f32_ptr_or_null(proj_b);
  const float *l1w = f32_ptr_or_null(ln1_w), *l1b = f32_ptr_or_null(ln1_b);
  const float e1 = static_cast<float>(eps1);

  // 1. qkv (M, 3D) = LayerNorm1(x) . Wqkv^T + b, per row tile (the bias read as the GEMM stores its tiles).
  const RowInit qkv_init{nullptr, 0, qbp};
  // The block's intermediates (qkv, the attention output, the residual stream a) live in pooled
  // scratch (blas.h): fresh torch allocations of them were page-faulted back in on many forwards
  // (ViT-S batch 8: 1150-4700 faults on some forwards, ~4 us each).
  Scratch qkv_buf = scratch(M * 3 * D);
  float* qkvp = qkv_buf.get();
  if (split_columns(M, qkv_w)) {  // few rows on several threads: LayerNorm (row chunks), then column tasks
    Scratch hn = scratch(M * D), stats = scratch(2 * M);
    if (qkv_w.packed_bf16 != nullptr) {  // (bf16 weights: norm1 writes the bf16 A rows)
      const int64_t dp = D + D % 2;
      uint16_t* h16 = reinterpret_cast<uint16_t*>(hn.get());
      ln_rows_threaded(xp, M, D, e1, l1w, l1b, false, stats.get(), stats.get() + M, nullptr, h16, dp);
      gemm_nt_columns_bf16a(M, 3 * D, dp, h16, dp, qkv_w, qkvp, 3 * D, false, {}, &qkv_init);
    } else {
      ln_rows_threaded(xp, M, D, e1, l1w, l1b, false, stats.get(), stats.get() + M, hn.get());
      gemm_nt_columns(M, 3 * D, D, hn.get(), D, qkv_w, qkvp, 3 * D, false, {}, &qkv_init);
    }
  } else {
    const int64_t tile = forward_tile_rows(M, qkv_w.prepacked()), tiles = (M + tile - 1) / tile;
    // bf16 weights: norm1 writes the GEMM's bf16 A rows directly (D padded to even).
    const bool a16 = qkv_w.packed_bf16 != nullptr;
    const int64_t dp = D + D % 2;
    parallel_tasks(tiles, [&](auto& queue) {
      Scratch hn = scratch(a16 ? (tile * dp + 1) / 2 : tile * D), stats = scratch(2 * tile);
      uint16_t* h16 = reinterpret_cast<uint16_t*>(hn.get());
      for (int64_t t; (t = queue.next()) >= 0;) {
        const int64_t r0 = t * tile, rows = std::min(tile, M - r0);
        float* o = qkvp + r0 * 3 * D;
        if (a16) {
          ln_rows_bf16(xp + r0 * D, rows, D, e1, l1w, l1b, false, stats.get(), stats.get() + tile, h16, dp);
          gemm_packed_bf16_nt(rows, 3 * D, dp, h16, dp, qkv_w.packed_bf16, o, 3 * D, false, 0, &qkv_init);
          continue;
        }
        ln_rows(xp + r0 * D, rows, D, e1, l1w, l1b, false, stats.get(), stats.get() + tile, hn.get());
        gemm_nt(rows, 3 * D, D, hn.get(), D, qkv_w, o, 3 * D, false, &qkv_init);
      }
    });
  }

  // 2. attention on strided (B, H, N, Dh) views of qkv; the output is token-major (M, D) rows.
  const Sizes view_sizes{B, heads, N, Dh}, view_strides{N * 3 * D, Dh, 3 * D, 1};
  const Tensor q = from_blob(qkvp, view_sizes, view_strides);
  const Tensor k = from_blob(qkvp + D, view_sizes, view_strides);
  const Tensor v = from_blob(qkvp + 2 * D, view_sizes, view_strides);
  // bf16 inference (the weights packed as bf16): the attention's tile products on bf16 operands too.
  const bool bf16 = qkv_w.packed_bf16 != nullptr;
  // With proj packed as bf16 the attention writes proj's bf16 A rows itself (D padded to even).
  const bool proj16 = proj_w.packed_bf16 != nullptr;
  const int64_t dp = D + D % 2;
  Scratch attn_buf = scratch(proj16 ? (M * dp + 1) / 2 : M * D);  // row r of the attention output at r * D (dp)
  uint16_t* a16 = proj16 ? reinterpret_cast<uint16_t*>(attn_buf.get()) : nullptr;
  if (proj16 && dp > D) {
    for (int64_t r = 0; r < M; ++r) a16[r * dp + D] = 0;
  }
  sp_attention_forward_impl(q, k, v, omega, gh, gw, num_prefix, scale, bf16, proj16 ? nullptr : attn_buf.get(), a16,
                            dp);
  const float* ap = attn_buf.get();

  // 3. a = x + attn . Wproj^T + b: x + b is the GEMM's starting value (read as it stores its tiles).
  Scratch a_buf = scratch(M * D);
  float* app = a_buf.get();
  const Tensor a = from_blob(app, {M, D}, {D, 1});
  const RowInit proj_init{xp, D, pbp};
  if (split_columns(M, proj_w)) {
    if (proj16) {
      gemm_nt_columns_bf16a(M, D, dp, a16, dp, proj_w, app, D, false, {}, &proj_init);
    } else {
      gemm_nt_columns(M, D, D, ap, D, proj_w, app, D, false, {}, &proj_init);
    }
  } else {
    const int64_t tile = forward_tile_rows(M, proj_w.prepacked()), tiles = (M + tile - 1) / tile;
    parallel_tasks(tiles, [&](auto& queue) {
      for (int64_t t; (t = queue.next()) >= 0;) {
        const int64_t r0 = t * tile, rows = std::min(tile, M - r0);
        const RowInit init = proj_init.shifted(r0, 0);
        if (proj16) {
          gemm_packed_bf16_nt(rows, D, dp, a16 + r0 * dp, dp, proj_w.packed_bf16, app + r0 * D, D, false, 0, &init);
        } else {
          gemm_nt(rows, D, D, ap + r0 * D, D, proj_w, app + r0 * D, D, false, &init);
        }
      }
    });
  }

  // 4. y = a + fc2(act(fc1(LayerNorm2(a)))).
  const Tensor y = layernorm_mlp_forward_cpu(a, ln2_w, ln2_b, fc1_w, fc1_b, std::nullopt, std::nullopt, fc2_w, fc2_b,
                                             eps2, act, false, kGluNone, true, false, fc1_packed, std::nullopt,
                                             fc2_packed)[0];
  return to(view_of(y, {B, N, D}), dt);
}

}  // namespace vitkern
