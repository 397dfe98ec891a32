// Spatial-prior self-attention (docs/DESIGN.md §1.2), flash-style CPU kernels.
#pragma once

#include "stable.h"

#include <vector>

namespace vitkern {

// Returns {out (B, H, N, Dh) in q's dtype, lse (B, H, N) fp32}.
std::vector<Tensor> sp_attention_forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const OptTensor& omega, int64_t gh, int64_t gw,
                                                 int64_t num_prefix, double scale);

// The same with the two tile products on bf16 operands (vitkern's bf16 GEMM: K times the scale and
// V packed as bf16, the Q rows and the softmax probabilities rounded to bf16, fp32 sums) where
// `bf16_products` is set and the bf16 route is active: the one-call block's bf16 inference.
// out_into: where given, the output is written there ((B, N, H, Dh) fp32 rows: the block's pooled
// scratch) and the returned output is a view of it, valid while that buffer is; then no
// log-sum-exp is computed (the returned lse is empty: inference has no backward). out16_into
// (the bf16 route only): the output instead goes there as bf16 rows, ld16 elements apart (token
// r's head h at r * ld16 + h * Dh): the block's proj reads them as its A rows; no fp32 output.
std::vector<Tensor> sp_attention_forward_impl(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const OptTensor& omega, int64_t gh, int64_t gw, int64_t num_prefix,
                                              double scale, bool bf16_products,
                                              float* out_into = nullptr, uint16_t* out16_into = nullptr,
                                              int64_t ld16 = 0);

// Returns {dq, dk, dv, domega (undefined when omega is None)}.
std::vector<Tensor> sp_attention_backward_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                  const Tensor& v, const OptTensor& omega,
                                                  const Tensor& out, const Tensor& lse, int64_t gh, int64_t gw,
                                                  int64_t num_prefix, double scale);

}  // namespace vitkern
