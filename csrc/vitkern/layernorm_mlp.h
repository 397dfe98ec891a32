// Fused LayerNorm (or RMSNorm, rms) + MLP (docs/DESIGN.md §1.4), CPU kernels. act: the
// activation code of simd.h (1 GELU, 2 GELU tanh, 3 QuickGELU, 4 SiLU).
#pragma once

#include "stable.h"

#include <vector>

namespace vitkern {

// glu: the MLP's form. kGluNone: the plain MLP, y = x + fc2(act(fc1(norm(x)))), fc1 is w1a (H, D)
// (w1b None). Otherwise the gated MLP, y = x + fc2(act(gate) * value): fc1 is w1a (2H, D)
// packed (w1b None), the gate rows [0, H) (kGluGateFirst) or [H, 2H) (kGluGateLast), or
// w1a = gate and w1b = value, (H, D) each (kGluGateFirst).
constexpr int64_t kGluNone = 0, kGluGateFirst = 1, kGluGateLast = 2;

// w1a_packed / w1b_packed / w2_packed: the weights packed by pack_gemm_weight (gemm.h), or None
// (then the GEMMs call BLAS). x: (M, D). Returns {out (M, D) in x's dtype, mean (M), rstd (M),
// and when saving for backward the pre-activation (M, H) plain or (M, 2H) gated, the activation output (M, H) (act(pre) or
// act(gate) * value), the LN output (M, D) (else (0,) each)}.
std::vector<Tensor> layernorm_mlp_forward_cpu(const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                                              const Tensor& w1a, const OptTensor& b1a, const OptTensor& w1b,
                                              const OptTensor& b1b, const Tensor& fc2_weight, const OptTensor& fc2_bias,
                                              double eps, int64_t act, bool rms, int64_t glu, bool residual,
                                              bool save_for_backward, const OptTensor& w1a_packed,
                                              const OptTensor& w1b_packed, const OptTensor& w2_packed);

// The forward's row passes, shared with block_cpu.cpp. ln_rows: LayerNorm (RMSNorm when rms) of
// `rows` rows of d: mean and 1/std into mean / rstd, the normalised rows times w plus b (either
// may be null) into h. (A residual + bias starting value goes to the GEMMs as a RowInit, gemm.h.)
void ln_rows(const float* x, int64_t rows, int64_t d, float eps, const float* w, const float* b, bool rms, float* mean,
             float* rstd, float* h);
// ln_rows of m rows in row chunks on all threads (the column split's LayerNorm, which every column
// task reads in full); with h16, ln_rows_bf16 into bf16 rows ldh apart instead of h.
void ln_rows_threaded(const float* x, int64_t m, int64_t d, float eps, const float* w, const float* b, bool rms,
                      float* mean, float* rstd, float* h, uint16_t* h16 = nullptr, int64_t ldh = 0);
// Rows per row tile of a forward over m rows: the packed route's small tiles (packed_tile_rows), on
// BLAS one tile per thread of 64 to 1024 rows (MKL repacks the weights on every call).
int64_t forward_tile_rows(int64_t m, bool packed);

// Returns {dx, d ln_weight, d ln_bias, d w1a, d b1a, d w1b, d b1b, d fc2_weight, d fc2_bias}
// (undefined where there is no such parameter).
std::vector<Tensor> layernorm_mlp_backward_cpu(const Tensor& dout, const Tensor& x, const OptTensor& ln_weight,
                                               const OptTensor& ln_bias, const Tensor& w1a, const OptTensor& w1b,
                                               const Tensor& fc2_weight, const Tensor& mean, const Tensor& rstd,
                                               const Tensor& pre, const Tensor& act_out, const Tensor& ln_out,
                                               int64_t act, bool rms, int64_t glu, bool residual);

}  // namespace vitkern
