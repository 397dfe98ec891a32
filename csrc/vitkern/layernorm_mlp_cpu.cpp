// Fused LayerNorm + GELU-MLP on the CPU (SPEC.md 1.4):
//
//   y = x + fc2(GELU(fc1(LayerNorm(x))))
//
// Forward: each thread takes a tile of rows through LN -> fc1 -> bias+GELU ->
// fc2 -> bias+residual; the normalised rows live only in the tile buffer, and
// bias, GELU and residual are applied in the GEMMs' prologue/epilogue passes
// over the tile, never as separate full-tensor ops. With a gradient wanted,
// the LN output, the pre-activation fc1(LN(x)) + b1 and its GELU are stored,
// copied out of the tile while it is in cache (the same tensors eager PyTorch
// keeps), so the backward recomputes nothing.
// Backward: full-height GEMMs (the weight gradients sum over every row) with
// the elementwise parts (GELU', LayerNorm backward) fused in C++ loops.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "blas.h"
#include "checks.h"
#include "layernorm_mlp.h"
#include "simd.h"

namespace vitkern {
namespace {

// Row tiles: one per thread (up to 1024 rows). Small tiles re-pack the weights
// for every tile and run the GEMMs at a fraction of their speed (benchmarks/NOTES.md).
inline int64_t tile_rows(int64_t m) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::clamp<int64_t>((m + threads - 1) / threads, 64, 1024);
}

at::Tensor f32c(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }
const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
at::Tensor opt_f32(const c10::optional<at::Tensor>& t) { return t.has_value() ? f32c(*t) : at::Tensor(); }

// One row: mean and 1/std (biased variance, as LayerNorm), two-pass in fp32.
inline void row_stats(const float* x, int64_t d, float eps, float* mean, float* rstd) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t t = 0; t < d; ++t) s += x[t];
  const float mu = s / d;
  float v = 0.f;
#pragma omp simd reduction(+ : v)
  for (int64_t t = 0; t < d; ++t) v += (x[t] - mu) * (x[t] - mu);
  *mean = mu;
  *rstd = 1.f / std::sqrt(v / d + eps);
}

void check_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  VK_CHECK_CPU(x);
  VK_CHECK_FLOATING(x);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (rows, dim), got ", shape_str(x.sizes()));
  const int64_t d = x.size(1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == d, "fc1_weight must have shape (hidden, ", d, "), got ",
              shape_str(w1.sizes()));
  check_shape(w2, "fc2_weight", {d, w1.size(0)});
}

}  // namespace

std::vector<at::Tensor> layernorm_mlp_forward_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& lnw_in,
                                                  const c10::optional<at::Tensor>& lnb_in, const at::Tensor& w1_in,
                                                  const c10::optional<at::Tensor>& b1_in, const at::Tensor& w2_in,
                                                  const c10::optional<at::Tensor>& b2_in, double eps_d, bool tanh_approx,
                                                  bool residual, bool save_for_backward) {
  check_args(x_in, w1_in, w2_in);
  const int64_t M = x_in.size(0), D = x_in.size(1), Hd = w1_in.size(0);
  const at::Tensor x = f32c(x_in), w1 = f32c(w1_in), w2 = f32c(w2_in);
  const at::Tensor lnw = opt_f32(lnw_in), lnb = opt_f32(lnb_in), b1 = opt_f32(b1_in), b2 = opt_f32(b2_in);
  const float eps = static_cast<float>(eps_d);
  auto f32 = x.options();
  at::Tensor out = at::empty({M, D}, f32);
  at::Tensor mean = at::empty({M}, f32), rstd = at::empty({M}, f32);
  at::Tensor pre = save_for_backward ? at::empty({M, Hd}, f32) : at::empty({0}, f32);
  at::Tensor gsave = save_for_backward ? at::empty({M, Hd}, f32) : at::empty({0}, f32);
  at::Tensor hnsave = save_for_backward ? at::empty({M, D}, f32) : at::empty({0}, f32);
  const float *xp = x.data_ptr<float>(), *w1p = w1.data_ptr<float>(), *w2p = w2.data_ptr<float>();
  const float *lnwp = ptr_or_null(lnw), *lnbp = ptr_or_null(lnb), *b1p = ptr_or_null(b1), *b2p = ptr_or_null(b2);
  float *op = out.data_ptr<float>(), *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  float* prep = save_for_backward ? pre.data_ptr<float>() : nullptr;
  float* gsp = save_for_backward ? gsave.data_ptr<float>() : nullptr;
  float* hnsp = save_for_backward ? hnsave.data_ptr<float>() : nullptr;
  const int64_t kTileM = tile_rows(M);
  const int64_t tiles = (M + kTileM - 1) / kTileM;

  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hn(kTileM * D), hid(kTileM * Hd);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile * kTileM, rows = std::min(kTileM, M - r0);
      // LayerNorm prologue into the tile buffer.
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = xp + (r0 + r) * D;
        float mu, rs;
        row_stats(xr, D, eps, &mu, &rs);
        mp[r0 + r] = mu;
        rp[r0 + r] = rs;
        float* h = hn.data() + r * D;
        for (int64_t t = 0; t < D; ++t) {
          const float v = (xr[t] - mu) * rs;
          h[t] = v * (lnwp ? lnwp[t] : 1.f) + (lnbp ? lnbp[t] : 0.f);
        }
      }
      // fc1: hid (rows x Hd) = hn . W1^T, then bias + GELU in place (epilogue).
      sgemm(true, false, Hd, rows, D, 1.f, w1p, D, hn.data(), D, 0.f, hid.data(), Hd);
      for (int64_t r = 0; r < rows; ++r) {
        simd::bias_gelu(hid.data() + r * Hd, b1p, Hd, tanh_approx, prep ? prep + (r0 + r) * Hd : nullptr);
      }
      if (save_for_backward) {
        std::copy(hid.data(), hid.data() + rows * Hd, gsp + r0 * Hd);
        std::copy(hn.data(), hn.data() + rows * D, hnsp + r0 * D);
      }
      // fc2 with bias and residual: out rows start as x + b2, GEMM accumulates (beta = 1).
      float* o = op + r0 * D;
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = xp + (r0 + r) * D;
        float* orow = o + r * D;
        for (int64_t t = 0; t < D; ++t) orow[t] = (residual ? xr[t] : 0.f) + (b2p ? b2p[t] : 0.f);
      }
      sgemm(true, false, D, rows, Hd, 1.f, w2p, Hd, hid.data(), Hd, 1.f, o, D);
    }
  });
  return {x_in.scalar_type() == at::kFloat ? out : out.to(x_in.scalar_type()), mean, rstd, pre, gsave, hnsave};
}

std::vector<at::Tensor> layernorm_mlp_backward_cpu(const at::Tensor& dout_in, const at::Tensor& x_in,
                                                   const c10::optional<at::Tensor>& lnw_in,
                                                   const c10::optional<at::Tensor>& lnb_in, const at::Tensor& w1_in,
                                                   const at::Tensor& w2_in, const at::Tensor& mean,
                                                   const at::Tensor& rstd, const at::Tensor& pre_in,
                                                   const at::Tensor& g_in, const at::Tensor& hn_in, bool tanh_approx,
                                                   bool residual) {
  check_args(x_in, w1_in, w2_in);
  const int64_t M = x_in.size(0), D = x_in.size(1), Hd = w1_in.size(0);
  check_shape(dout_in, "dout", {M, D});
  check_shape(pre_in, "pre", {M, Hd});
  check_shape(g_in, "gelu_out", {M, Hd});
  check_shape(hn_in, "ln_out", {M, D});
  check_shape(mean, "mean", {M});
  check_shape(rstd, "rstd", {M});
  const at::Tensor x = f32c(x_in), dy = f32c(dout_in), w1 = f32c(w1_in), w2 = f32c(w2_in), pre = f32c(pre_in);
  const at::Tensor g = f32c(g_in), hn = f32c(hn_in), lnw = opt_f32(lnw_in);
  const float* lnwp = ptr_or_null(lnw);
  const float *xp = x.data_ptr<float>(), *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const float* prep = pre.data_ptr<float>();
  auto f32 = x.options();

  // fc2: dW2 = dy^T g, db2 = colsum(dy), d pre = (dy W2) * GELU'(pre).
  at::Tensor dw2 = at::mm(dy.t(), g);
  at::Tensor db2 = dy.sum(0);
  at::Tensor da = at::mm(dy, w2);
  float* dap = da.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    simd::gelu_fwd_bwd(prep + b * Hd, nullptr, dap + b * Hd, (e - b) * Hd, tanh_approx);
  });
  at::Tensor dw1 = at::mm(da.t(), hn);
  at::Tensor db1 = da.sum(0);
  at::Tensor dhn = at::mm(da, w1);  // (M, D)
  // LayerNorm backward, row by row: dx = rstd (dxh - mean(dxh) - xhat mean(dxh xhat)), dxh = dhn * w.
  at::Tensor dx = at::empty({M, D}, f32), xhat = at::empty({M, D}, f32);
  float* xhp = xhat.data_ptr<float>();
  const float* dhp = dhn.data_ptr<float>();
  const float* dyp = dy.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* dh = dhp + r * D;
      const float* xr = xp + r * D;
      float* xh = xhp + r * D;
      float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t t = 0; t < D; ++t) {
        xh[t] = (xr[t] - mp[r]) * rp[r];  // x-hat from the saved statistics
        const float dxh = dh[t] * (lnwp ? lnwp[t] : 1.f);
        s1 += dxh;
        s2 += dxh * xh[t];
      }
      s1 /= D;
      s2 /= D;
      for (int64_t t = 0; t < D; ++t) {
        const float dxh = dh[t] * (lnwp ? lnwp[t] : 1.f);
        dxp[r * D + t] = rp[r] * (dxh - s1 - xh[t] * s2) + (residual ? dyp[r * D + t] : 0.f);
      }
    }
  });
  at::Tensor dlnw = lnw.defined() ? (dhn * xhat).sum(0) : at::Tensor();
  at::Tensor dlnb = lnb_in.has_value() ? dhn.sum(0) : at::Tensor();
  const auto dt = x_in.scalar_type();
  auto cast = [&](const at::Tensor& t, at::ScalarType s) { return t.defined() ? t.to(s) : t; };
  return {cast(dx, dt),
          cast(dlnw, lnw_in.has_value() ? lnw_in->scalar_type() : dt),
          cast(dlnb, lnb_in.has_value() ? lnb_in->scalar_type() : dt),
          cast(dw1, w1_in.scalar_type()),
          cast(db1, dt),
          cast(dw2, w2_in.scalar_type()),
          cast(db2, dt)};
}

}  // namespace vitkern
