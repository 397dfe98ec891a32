// Fused patch embedding (docs/DESIGN.md §1.1), CPU kernels.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace vitkern {

// images (B, C, gh*P, gw*P), weight (D, C, P, P), bias (D,), pos_embed (N, D) -> (B, N, D).
at::Tensor patch_embed_forward_cpu(const at::Tensor& images, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& pos_embed);

// Returns {d images (or undefined), d weight (or undefined)}; d bias / d pos_embed are plain sums of dout.
std::vector<at::Tensor> patch_embed_backward_cpu(const at::Tensor& dout, const at::Tensor& images,
                                                 const at::Tensor& weight, bool need_images, bool need_weight);

}  // namespace vitkern
