// Spatial-prior self-attention (docs/DESIGN.md §1.2), flash-style CPU kernels.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace vitkern {

// Returns {out (B, H, N, Dh) in q's dtype, lse (B, H, N) fp32}.
std::vector<at::Tensor> sp_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& omega, int64_t gh, int64_t gw,
                                                 int64_t num_prefix, double scale);

// Returns {dq, dk, dv, domega (undefined when omega is None)}.
std::vector<at::Tensor> sp_attention_backward_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const c10::optional<at::Tensor>& omega,
                                                  const at::Tensor& out, const at::Tensor& lse, int64_t gh, int64_t gw,
                                                  int64_t num_prefix, double scale);

}  // namespace vitkern
