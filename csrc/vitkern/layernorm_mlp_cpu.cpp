// Fused LayerNorm (or RMSNorm) + MLP on the CPU (docs/DESIGN.md §1.4):
//
//   y = x + fc2(act(fc1(LayerNorm(x))))      act: GELU (erf / tanh), QuickGELU or SiLU
//   y = x + fc2(act(gate) * value)           the gated MLP (glu != 0): [gate | value] or
//                                            [value | gate] = fc1(LayerNorm(x))
//
// The gated fc1 is w1a (2H, D) packed (w1b undefined), or w1a = gate and w1b = value, (H, D)
// each (then the gate comes first). Its pre-activation row is 2H contiguous floats in w1a's (or
// [w1a; w1b]'s) row order, the gate half at column 0 (gate first) or H (gate last).
// An RMSNorm runs through the same code with mean 0 (saved as such) and no bias.
// Forward: each thread takes a tile of rows through LN -> fc1 -> bias + activation (plain) or
// bias + act(gate) * value (gated) -> fc2 -> bias + residual; the normalised rows live only in
// the tile buffer, and bias, activation and residual are applied in the GEMMs' prologue/epilogue
// passes over the tile, never as separate full-tensor ops. With a gradient wanted, the tile's
// LN output, pre-activation and activation output are the saved tensors themselves (the GEMMs
// and epilogues write into them; the same tensors eager PyTorch keeps), so the backward
// recomputes nothing. Backward: full-height GEMMs (the weight gradients sum over every row) with
// the elementwise parts (act' or the gated product's derivative with the fc1-bias sum, LayerNorm
// backward with the LN-affine sums) fused in C++ loops.
#include <algorithm>
#include <cmath>
#include <vector>

#include "blas.h"
#include "checks.h"
#include "gemm.h"
#include "layernorm_mlp.h"
#include "simd.h"

namespace vitkern {

// LayerNorm of `rows` rows: mean and 1/std (biased variance, two-pass, fp32) into
// mean/rstd, normalised and affine rows into h. RMSNorm (rms): mean 0, 1/sqrt(mean(x^2) + eps).
VK_TARGET_CLONES void ln_rows(const float* x, int64_t rows, int64_t d, float eps, const float* w, const float* b,
                              bool rms, float* mean, float* rstd, float* h) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    simd::ln_row_stats(xr, d, rms, eps, mean + r, rstd + r);
    const float mu = mean[r], rs = rstd[r];
    float* hr = h + r * d;
#pragma omp simd
    for (int64_t t = 0; t < d; ++t) hr[t] = (xr[t] - mu) * rs * (w ? w[t] : 1.f) + (b ? b[t] : 0.f);
  }
}

void ln_rows_threaded(const float* x, int64_t m, int64_t d, float eps, const float* w, const float* b, bool rms,
                      float* mean, float* rstd, float* h, uint16_t* h16, int64_t ldh) {
  const int64_t rt = task_rows(m, 64, 8, 1);
  parallel_tasks((m + rt - 1) / rt, [&](auto& queue) {
    for (int64_t t; (t = queue.next()) >= 0;) {
      const int64_t r0 = t * rt, rows = std::min(rt, m - r0);
      if (h16 != nullptr) {
        ln_rows_bf16(x + r0 * d, rows, d, eps, w, b, rms, mean + r0, rstd + r0, h16 + r0 * ldh, ldh);
      } else {
        ln_rows(x + r0 * d, rows, d, eps, w, b, rms, mean + r0, rstd + r0, h + r0 * d);
      }
    }
  });
}

// Rows per tile of the forward. BLAS route: one tile per thread (64 to 1024 rows; MKL repacks the
// weights on every call, so fewer, larger calls). Packed route (gemm.h, packed_tile_rows): up to
// 256 rows, which keeps a tile's hidden activations (rows x H) nearer the core between fc1 and fc2.
int64_t forward_tile_rows(int64_t m, bool packed) {
  if (packed) return packed_tile_rows(m);
  const int64_t threads = std::max<int64_t>(1, num_threads());
  return std::clamp<int64_t>((m + threads - 1) / threads, 64, 1024);
}

namespace {

// Rows per partial column sum in the backward (fixed, so the sums are deterministic).
constexpr int64_t kSumRows = 32;

const float* ptr_or_null(const Tensor& t) { return f32_ptr_or_null(t); }

// acc[t] += a[t]
VK_TARGET_CLONES void add_to(float* acc, const float* a, int64_t n) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) acc[t] += a[t];
}

// LayerNorm backward of rows [r0, r1): dx = rstd (dxh - mean(dxh) - xhat mean(dxh xhat)) (+ dy),
// dxh = dhn * w; d ln_weight += dhn * xhat and d ln_bias += dhn into aw / ab (when given).
// RMSNorm (rms): no mean was subtracted, so no mean(dxh) term.
VK_TARGET_CLONES void ln_backward_rows(const float* x, const float* dhn, const float* dy, const float* mean,
                                       const float* rstd, const float* w, bool rms, int64_t r0, int64_t r1, int64_t d,
                                       float* xh, float* dx, float* aw, float* ab) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* dh = dhn + r * d;
    const float* xr = x + r * d;
    const float mu = mean[r], rs = rstd[r];
    float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t t = 0; t < d; ++t) {
      xh[t] = (xr[t] - mu) * rs;  // x-hat from the saved statistics
      const float dxh = dh[t] * (w ? w[t] : 1.f);
      s1 += dxh;
      s2 += dxh * xh[t];
    }
    s1 = rms ? 0.f : s1 / d;
    s2 /= d;
    float* dxr = dx + r * d;
    const float* dyr = dy ? dy + r * d : nullptr;
#pragma omp simd
    for (int64_t t = 0; t < d; ++t) {
      const float dxh = dh[t] * (w ? w[t] : 1.f);
      dxr[t] = rs * (dxh - s1 - xh[t] * s2) + (dyr ? dyr[t] : 0.f);
    }
    if (aw) {
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) aw[t] += dh[t] * xh[t];
    }
    if (ab) {
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) ab[t] += dh[t];
    }
  }
}

// The norm's backward over all M rows from d LN-output dhn: dx (+ dy when given, the residual),
// d ln_weight (when lnw) and d ln_bias (when want_dlnb), undefined otherwise. The column sums
// are partial sums over fixed blocks of kSumRows rows added in block order: deterministic.
struct NormGrads {
  Tensor dx, dlnw, dlnb;
};
NormGrads ln_backward_all(const float* xp, const float* dhn, const float* dy, const float* mp, const float* rp,
                          const float* lnw, bool want_dlnb, bool rms, int64_t M, int64_t D) {
  const int64_t nblk = (M + kSumRows - 1) / kSumRows;
  const bool want_dlnw = lnw != nullptr;
  Tensor dx = empty({M, D});
  Tensor lnw_part = empty({want_dlnw ? nblk : 0, D}), lnb_part = empty({want_dlnb ? nblk : 0, D});
  float* lnwpp = want_dlnw ? f32_ptr(lnw_part) : nullptr;
  float* lnbpp = want_dlnb ? f32_ptr(lnb_part) : nullptr;
  float* dxp = f32_ptr(dx);
  parallel_for(0, nblk, 1, [&](int64_t b, int64_t e) {
    std::vector<float> xh(D);
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t r0 = blk * kSumRows, r1 = std::min(M, r0 + kSumRows);
      float* aw = lnwpp ? lnwpp + blk * D : nullptr;
      float* ab = lnbpp ? lnbpp + blk * D : nullptr;
      if (aw) std::fill(aw, aw + D, 0.f);
      if (ab) std::fill(ab, ab + D, 0.f);
      ln_backward_rows(xp, dhn, dy, mp, rp, lnw, rms, r0, r1, D, xh.data(), dxp, aw, ab);
    }
  });
  return {dx, want_dlnw ? sum0(lnw_part) : Tensor(), want_dlnb ? sum0(lnb_part) : Tensor()};
}

void check_act(int64_t act) {
  VK_CHECK(act >= simd::kGelu && act <= simd::kSilu, "act must be an activation code 1..4 (gelu, gelu_tanh, ",
           "quick_gelu, silu), got ", act);
}

// Checks x, fc1 and fc2 of either MLP form; returns the hidden width H (the columns of fc2).
int64_t check_args(const Tensor& x, const Tensor& w1a, const OptTensor& w1b, const Tensor& w2, int64_t act,
                   int64_t glu) {
  VK_CHECK_CPU(x);
  VK_CHECK_FLOATING(x);
  VK_CHECK(x.dim() == 2, "x must be 2-D (rows, dim), got ", shape_str(x));
  check_act(act);
  VK_CHECK(glu >= kGluNone && glu <= kGluGateLast, "glu must be 0 (plain MLP), 1 (gate first) or 2 (gate last), got ",
           glu);
  const int64_t d = x.size(1);
  if (glu == kGluNone) {
    VK_CHECK(!w1b.has_value(), "the plain MLP has one fc1 weight: w1b must be None");
    VK_CHECK(w1a.dim() == 2 && w1a.size(1) == d, "fc1_weight must have shape (hidden, ", d, "), got ",
             shape_str(w1a));
    check_shape(w2, "fc2_weight", {d, w1a.size(0)});
    return w1a.size(0);
  }
  VK_CHECK(w2.dim() == 2 && w2.size(0) == d, "fc2_weight must have shape (", d, ", hidden), got ", shape_str(w2));
  const int64_t h = w2.size(1);
  if (w1b.has_value()) {
    VK_CHECK(glu == kGluGateFirst, "split fc1 weights are (gate, value): glu must be 1 (gate first)");
    check_shape(w1a, "fc1 gate weight", {h, d});
    check_shape(*w1b, "fc1 value weight", {h, d});
  } else {
    check_shape(w1a, "fc1_weight", {2 * h, d});
  }
  return h;
}

// Gated MLP: hid[t] = act(gate[t]) * value[t] over one row of n.
VK_TARGET_CLONES void gated_row(const float* gate, const float* value, float* hid, int64_t n, int64_t act) {
  simd::act_fwd_bwd(gate, hid, nullptr, n, act);
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) hid[t] *= value[t];
}

// Gated MLP, from dh = dy W2 (one row of n): d value = dh act(gate) into dv, d gate = dh value act'(gate) into dg.
VK_TARGET_CLONES void gated_row_backward(const float* gate, const float* value, const float* dh, float* dv, float* dg,
                                         int64_t n, int64_t act) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) dg[t] = dh[t] * value[t];
  simd::act_fwd_bwd(gate, dv, dg, n, act);
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) dv[t] *= dh[t];
}

}  // namespace

// The plain MLP and the gated one share every step but two: fc1's epilogue (bias + act, or bias
// then act(gate) * value) and its backward (act'(pre), or the gated product's two halves). The
// pre-activation has P = H columns (plain) or 2H (gated: gate and value halves at goff / voff).
std::vector<Tensor> layernorm_mlp_forward_cpu(const Tensor& x_in, const OptTensor& lnw_in, const OptTensor& lnb_in,
                                              const Tensor& w1a_in, const OptTensor& b1a_in, const OptTensor& w1b_in,
                                              const OptTensor& b1b_in, const Tensor& w2_in, const OptTensor& b2_in,
                                              double eps_d, int64_t act, bool rms, int64_t glu, bool residual,
                                              bool save_for_backward, const OptTensor& w1a_packed,
                                              const OptTensor& w1b_packed, const OptTensor& w2_packed) {
  const int64_t Hd = check_args(x_in, w1a_in, w1b_in, w2_in, act, glu);
  const bool gated = glu != kGluNone, split = w1b_in.has_value();
  const int64_t M = x_in.size(0), D = x_in.size(1), P = gated ? 2 * Hd : Hd;
  const Tensor x = f32c(x_in);
  const Tensor lnw = opt_f32(lnw_in), lnb = opt_f32(lnb_in), b1a = opt_f32(b1a_in), b1b = opt_f32(b1b_in);
  const Tensor b2 = opt_f32(b2_in);
  // Prepacked weights (gemm.h; vitkern/ops/_packed.py caches them per weight): the packed GEMM route.
  const GemmWeight w1a = gemm_weight(w1a_in, w1a_packed, "w1a_packed", w1a_in.size(0), D);
  const GemmWeight w1b = split ? gemm_weight(*w1b_in, w1b_packed, "w1b_packed", Hd, D) : GemmWeight{};
  const GemmWeight w2 = gemm_weight(w2_in, w2_packed, "w2_packed", D, Hd);
  const float eps = static_cast<float>(eps_d);
  Tensor out = empty({M, D});
  Tensor mean = empty({M}), rstd = empty({M});
  Tensor pre = save_for_backward ? empty({M, P}) : empty({0});
  Tensor hsave = save_for_backward ? empty({M, Hd}) : empty({0});
  Tensor hnsave = save_for_backward ? empty({M, D}) : empty({0});
  const float* xp = f32_ptr(x);
  const float *lnwp = ptr_or_null(lnw), *lnbp = ptr_or_null(lnb), *b2p = ptr_or_null(b2);
  const float *b1ap = ptr_or_null(b1a), *b1bp = ptr_or_null(b1b);
  float *op = f32_ptr(out), *mp = f32_ptr(mean), *rp = f32_ptr(rstd);
  float* prep = save_for_backward ? f32_ptr(pre) : nullptr;
  float* hsp = save_for_backward ? f32_ptr(hsave) : nullptr;
  float* hnsp = save_for_backward ? f32_ptr(hnsave) : nullptr;
  const int64_t kTileM = forward_tile_rows(M, w1a.prepacked());
  const int64_t tiles = (M + kTileM - 1) / kTileM;
  const int64_t goff = glu == kGluGateLast ? Hd : 0, voff = glu == kGluGateFirst ? Hd : 0;

  if (!gated && split_columns(M, w1a) && w2.prepacked()) {
    // Few rows on several threads (batch-1 inference): the LayerNorm over all rows, then fc1 and fc2
    // each threaded over column tasks that read their weight once in all (gemm.h, split_columns),
    // fc1's bias + activation on each task's columns. The same sums as the row tiles, bit for bit.
    // bf16 inference: the LayerNorm writes fc1's bf16 A rows, and each fc1 task takes the bias and
    // activation on each product tile while it is in L1 and stores its columns of the activation as
    // fc2's bf16 A rows (gemm_nt_columns_bf16_out, as the row tiles' gemm_nt_bf16_out): no fp32
    // hidden activation, and no serial conversion pass between the column tasks.
    const bool bf16 = !save_for_backward && w1a.packed_bf16 != nullptr && w2.packed_bf16 != nullptr;
    const int64_t dp = D + D % 2, hdp = Hd + Hd % 2;
    Scratch hn_buf = scratch(save_for_backward || bf16 ? 0 : M * D),
            hid_buf = scratch(save_for_backward || bf16 ? 0 : M * Hd);
    Scratch a16_buf = scratch(bf16 ? (M * dp + 1) / 2 : 0), h16_buf = scratch(bf16 ? (M * hdp + 1) / 2 : 0);
    uint16_t* a16 = reinterpret_cast<uint16_t*>(a16_buf.get());
    uint16_t* h16 = reinterpret_cast<uint16_t*>(h16_buf.get());
    float* hn = save_for_backward ? hnsp : hn_buf.get();
    float* hid = save_for_backward ? hsp : hid_buf.get();
    const auto fc1_epilogue = [&](int64_t c0, int64_t cols) {
      for (int64_t r = 0; r < M; ++r) {
        simd::bias_act(hid + r * Hd + c0, b1ap ? b1ap + c0 : nullptr, cols, act,
                       prep ? prep + r * Hd + c0 : nullptr);
      }
    };
    const RowInit init{residual ? xp : nullptr, D, b2p};
    if (bf16) {
      ln_rows_threaded(xp, M, D, eps, lnwp, lnbp, rms, mp, rp, nullptr, a16, dp);
      gemm_nt_columns_bf16_out(M, Hd, dp, a16, dp, w1a, h16, hdp,
                               [&](float* t, int64_t ldt, int64_t, int64_t nr, int64_t c0, int64_t nc) {
                                 for (int64_t r = 0; r < nr; ++r) {
                                   simd::bias_act(t + r * ldt, b1ap ? b1ap + c0 : nullptr, nc, act, nullptr);
                                 }
                               });
      if (hdp > Hd) {
        for (int64_t r = 0; r < M; ++r) h16[r * hdp + Hd] = 0;
      }
      gemm_nt_columns_bf16a(M, D, hdp, h16, hdp, w2, op, D, false, {}, &init);
      return {to(out, x_in.scalar_type()), mean, rstd, pre, hsave, hnsave};
    }
    ln_rows_threaded(xp, M, D, eps, lnwp, lnbp, rms, mp, rp, hn);
    gemm_nt_columns(M, Hd, D, hn, D, w1a, hid, Hd, false, fc1_epilogue);
    gemm_nt_columns(M, D, Hd, hid, Hd, w2, op, D, false, {}, &init);
    return {to(out, x_in.scalar_type()), mean, rstd, pre, hsave, hnsave};
  }
  // bf16 inference (both weights packed as bf16, no gradient): fc1's bias + activation run on each
  // product tile while it is in L1 and the hidden activations are stored once, as the bf16 rows fc2
  // reads (gemm_nt_bf16_out), instead of an fp32 (rows x H) tile that the activation pass and then
  // fc2's bf16 conversion each read back.
  const bool bf16_hidden = !gated && !save_for_backward && w1a.packed_bf16 != nullptr && w2.packed_bf16 != nullptr;
  const int64_t hdp = Hd + Hd % 2;  // bf16 hidden row: H padded to even (the pad column zero)
  parallel_tasks(tiles, [&](auto& queue) {
    // Without a gradient the tile lives in per-thread buffers; with one, the LN output, the
    // pre-activation and the activation output are written straight into the tensors saved for
    // the backward (same row-major layout), so keeping them costs no copy. The plain MLP's
    // pre-activation needs no tile of its own (its epilogue stores it on the way).
    const int64_t own = save_for_backward ? 0 : kTileM;
    Scratch hn_buf = scratch(bf16_hidden ? 0 : own * D), pre_buf = scratch(gated ? own * P : 0),
            hid_buf = scratch(bf16_hidden ? 0 : own * Hd);
    // (bf16 hidden rows, two per float of a pooled scratch buffer; not zeroed: written first)
    Scratch h16_buf = scratch(bf16_hidden ? (kTileM * hdp + 1) / 2 : 0);
    uint16_t* h16 = reinterpret_cast<uint16_t*>(h16_buf.get());
    // (and the LayerNorm's output as fc1's bf16 A rows, D padded to even)
    const int64_t dp = D + D % 2;
    Scratch a16_buf = scratch(bf16_hidden ? (kTileM * dp + 1) / 2 : 0);
    uint16_t* a16 = reinterpret_cast<uint16_t*>(a16_buf.get());
    for (int64_t tile; (tile = queue.next()) >= 0;) {
      const int64_t r0 = tile * kTileM, rows = std::min(kTileM, M - r0);
      float* hn = save_for_backward ? hnsp + r0 * D : hn_buf.get();
      float* hid = save_for_backward ? hsp + r0 * Hd : hid_buf.get();
      if (bf16_hidden) {
        // LayerNorm prologue straight into fc1's bf16 A rows.
        ln_rows_bf16(xp + r0 * D, rows, D, eps, lnwp, lnbp, rms, mp + r0, rp + r0, a16, dp);
        gemm_nt_bf16_out(rows, Hd, dp, a16, dp, w1a, h16, hdp,
                         [&](float* t, int64_t ldt, int64_t, int64_t nr, int64_t c0, int64_t nc) {
                           for (int64_t r = 0; r < nr; ++r) {
                             simd::bias_act(t + r * ldt, b1ap ? b1ap + c0 : nullptr, nc, act, nullptr);
                           }
                         });
        if (hdp > Hd) {
          for (int64_t r = 0; r < rows; ++r) h16[r * hdp + Hd] = 0;
        }
        const RowInit init{residual ? xp + r0 * D : nullptr, D, b2p};
        gemm_packed_bf16_nt(rows, D, hdp, h16, hdp, w2.packed_bf16, op + r0 * D, D, false, kGemmNR * hdp, &init);
        continue;
      }
      // LayerNorm prologue into the tile buffer.
      ln_rows(xp + r0 * D, rows, D, eps, lnwp, lnbp, rms, mp + r0, rp + r0, hn);
      if (!gated) {
        // fc1: hid (rows x Hd) = hn . W1^T, then bias + activation in place (epilogue).
        gemm_nt(rows, Hd, D, hn, D, w1a, hid, Hd, false);
        for (int64_t r = 0; r < rows; ++r) {
          simd::bias_act(hid + r * Hd, b1ap, Hd, act, prep ? prep + (r0 + r) * Hd : nullptr);
        }
      } else {
        // fc1 into the (rows x 2H) pre-activation tile: one GEMM, or one per half (ldc 2H);
        // then bias and act(gate) * value into hid.
        float* pt = save_for_backward ? prep + r0 * P : pre_buf.get();
        if (split) {
          gemm_nt(rows, Hd, D, hn, D, w1a, pt, P, false);
          gemm_nt(rows, Hd, D, hn, D, w1b, pt + Hd, P, false);
        } else {
          gemm_nt(rows, P, D, hn, D, w1a, pt, P, false);
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* pr = pt + r * P;
          if (b1ap) add_to(pr, b1ap, split ? Hd : P);
          if (b1bp) add_to(pr + Hd, b1bp, Hd);
          gated_row(pr + goff, pr + voff, hid + r * Hd, Hd, act);
        }
      }
      // fc2 with bias and residual: x + b2 is the GEMM's starting value.
      const RowInit init{residual ? xp + r0 * D : nullptr, D, b2p};
      gemm_nt(rows, D, Hd, hid, Hd, w2, op + r0 * D, D, false, &init);
    }
  });
  return {to(out, x_in.scalar_type()), mean, rstd, pre, hsave, hnsave};
}

std::vector<Tensor> layernorm_mlp_backward_cpu(const Tensor& dout_in, const Tensor& x_in, const OptTensor& lnw_in,
                                               const OptTensor& lnb_in, const Tensor& w1a_in, const OptTensor& w1b_in,
                                               const Tensor& w2_in, const Tensor& mean_in, const Tensor& rstd_in,
                                               const Tensor& pre_in, const Tensor& h_in, const Tensor& hn_in,
                                               int64_t act, bool rms, int64_t glu, bool residual) {
  const int64_t Hd = check_args(x_in, w1a_in, w1b_in, w2_in, act, glu);
  const bool gated = glu != kGluNone, split = w1b_in.has_value();
  const int64_t M = x_in.size(0), D = x_in.size(1), P = gated ? 2 * Hd : Hd;
  check_shape(dout_in, "dout", {M, D});
  check_shape(pre_in, "pre", {M, P});
  check_shape(h_in, "act_out", {M, Hd});
  check_shape(hn_in, "ln_out", {M, D});
  check_shape(mean_in, "mean", {M});
  check_shape(rstd_in, "rstd", {M});
  const Tensor x = f32c(x_in), dy = f32c(dout_in), w2 = f32c(w2_in), pre = f32c(pre_in);
  const Tensor h = f32c(h_in), hn = f32c(hn_in), lnw = opt_f32(lnw_in), mean = f32c(mean_in), rstd = f32c(rstd_in);
  const float* lnwp = ptr_or_null(lnw);
  const float *xp = f32_ptr(x), *mp = f32_ptr(mean), *rp = f32_ptr(rstd);
  const float* prep = f32_ptr(pre);
  const int64_t goff = glu == kGluGateLast ? Hd : 0, voff = glu == kGluGateFirst ? Hd : 0;

  // Column sums (the bias and LayerNorm-affine gradients) are fused into the row passes as
  // partial sums over fixed blocks of kSumRows rows, added in block order afterwards: the
  // result does not depend on the thread count or on scheduling (bitwise deterministic).
  const int64_t nblk = (M + kSumRows - 1) / kSumRows;

  // fc2: dW2 = dy^T h, db2 = colsum(dy), dh = dy W2; then d pre (M, P) row by row: the plain
  // MLP's dh * act'(pre) in place, the gated MLP's two halves into their own buffer.
  // On the packed route the plain MLP's four products run on vitkern's micro-kernel (MKL's sgemm is
  // at ~43% of an AVX-512 core on AMD): dW2 as (h^T dy)^T, packing the narrower dy.
  const bool packed = !gated && packed_gemm_active();
  const float *dyp = f32_ptr(dy), *hp = f32_ptr(h);
  Tensor dw2 = packed ? contig(transposed(packed_mm_tn(Hd, D, M, hp, Hd, dyp, D))) : mm(transposed(dy), h);
  Tensor db2 = sum0(dy);
  Tensor dh = packed ? packed_mm(M, Hd, D, dyp, D, f32_ptr(w2), Hd) : mm(dy, w2);
  Tensor dpre = gated ? empty({M, P}) : dh;
  const float* dhp = f32_ptr(dh);
  float* dpp = f32_ptr(dpre);
  Tensor db1_part = empty({nblk, P});
  float* db1p = f32_ptr(db1_part);
  parallel_for(0, nblk, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t r0 = blk * kSumRows, r1 = std::min(M, r0 + kSumRows);
      float* acc = db1p + blk * P;
      std::fill(acc, acc + P, 0.f);
      for (int64_t r = r0; r < r1; ++r) {
        const float* pr = prep + r * P;
        float* dr = dpp + r * P;
        if (gated) {
          gated_row_backward(pr + goff, pr + voff, dhp + r * Hd, dr + voff, dr + goff, Hd, act);
        } else {
          simd::act_fwd_bwd(pr, nullptr, dr, Hd, act);
        }
        add_to(acc, dr, P);
      }
    }
  });
  Tensor db1 = sum0(db1_part);
  Tensor dw1a, dw1b, db1a, db1b, dhn;
  if (split) {
    const Tensor w1a = f32c(w1a_in), w1b = f32c(*w1b_in);
    // The gate and value halves of d pre as strided views (row stride 2H) of dpre's memory.
    const Tensor dg = from_blob(dpp, {M, Hd}, {P, 1}), dv = from_blob(dpp + Hd, {M, Hd}, {P, 1});
    dw1a = mm(transposed(dg), hn);
    dw1b = mm(transposed(dv), hn);
    dhn = mm(dg, w1a);
    const Tensor dhn_v = mm(dv, w1b);
    add_to(f32_ptr(dhn), f32_ptr(dhn_v), M * D);
    db1a = empty({Hd});
    db1b = empty({Hd});
    const float* db1s = f32_ptr(db1);
    std::copy(db1s, db1s + Hd, f32_ptr(db1a));
    std::copy(db1s + Hd, db1s + P, f32_ptr(db1b));
  } else {
    const Tensor w1 = f32c(w1a_in);
    dw1a = packed ? packed_mm_tn(Hd, D, M, dpp, Hd, f32_ptr(hn), D) : mm(transposed(dpre), hn);
    dhn = packed ? packed_mm(M, D, Hd, dpp, Hd, f32_ptr(w1), D) : mm(dpre, w1);
    db1a = db1;
  }
  // LayerNorm backward, row by row: dx = rstd (dxh - mean(dxh) - xhat mean(dxh xhat)), dxh = dhn * w;
  // d ln_weight = colsum(dhn * xhat), d ln_bias = colsum(dhn) in the same pass.
  auto [dx, dlnw, dlnb] = ln_backward_all(xp, f32_ptr(dhn), residual ? f32_ptr(dy) : nullptr, mp, rp, lnwp,
                                          lnb_in.has_value(), rms, M, D);
  const auto dt = x_in.scalar_type();
  auto cast = [](const Tensor& t, ScalarType s) { return to_or_undefined(t, s); };
  return {cast(dx, dt),
          cast(dlnw, lnw_in.has_value() ? lnw_in->scalar_type() : dt),
          cast(dlnb, lnb_in.has_value() ? lnb_in->scalar_type() : dt),
          cast(dw1a, w1a_in.scalar_type()),
          cast(db1a, dt),
          split ? cast(dw1b, w1b_in->scalar_type()) : Tensor(),
          split ? cast(db1b, dt) : Tensor(),
          cast(dw2, w2_in.scalar_type()),
          cast(db2, dt)};
}

}  // namespace vitkern
