// Fused patch embedding (docs/DESIGN.md §1.1), CPU kernels.
#pragma once

#include "stable.h"

#include <vector>

namespace vitkern {

// images (B, C, gh*P, gw*P), weight (D, C, P, P), bias (D,), pos_embed (N, D) -> (B, N, D).
// weight_packed: the weight as (D, C*P*P) packed by pack_gemm_weight (gemm.h), or None (BLAS).
Tensor patch_embed_forward_cpu(const Tensor& images, const Tensor& weight, const OptTensor& bias,
                               const OptTensor& pos_embed, const OptTensor& weight_packed);

// Returns {d images (or undefined), d weight (or undefined)}; d bias / d pos_embed are plain sums of dout.
std::vector<Tensor> patch_embed_backward_cpu(const Tensor& dout, const Tensor& images,
                                                 const Tensor& weight, bool need_images, bool need_weight);

}  // namespace vitkern
