// Spatial-prior self-attention (docs/DESIGN.md §1.2), flash-style CPU kernels.
#pragma once

#include "stable.h"

#include <vector>

namespace vitkern {

// Returns {out (B, H, N, Dh) in q's dtype, lse (B, H, N) fp32}.
std::vector<Tensor> sp_attention_forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const OptTensor& omega, int64_t gh, int64_t gw,
                                                 int64_t num_prefix, double scale);

// Returns {dq, dk, dv, domega (undefined when omega is None)}.
std::vector<Tensor> sp_attention_backward_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                  const Tensor& v, const OptTensor& omega,
                                                  const Tensor& out, const Tensor& lse, int64_t gh, int64_t gw,
                                                  int64_t num_prefix, double scale);

}  // namespace vitkern
