// One pre-norm ViT block (LayerNorm -> attention -> proj + residual, LayerNorm -> MLP + residual)
// for eager CPU inference in one call: the fast path of vitkern.models.layers.Block (block_cpu.cpp).
#pragma once

#include "stable.h"

namespace vitkern {

// x (B, N, D). Attention: heads heads of D / heads, qkv_weight (3D, D) in timm's (q, k, v) x head
// row order, proj_weight (D, D); omega (H, 2gh-1, 2gw-1) or None (plain attention; then gh, gw and
// num_prefix only need N = num_prefix + gh * gw when omega is given). norm1 / norm2: LayerNorm
// with eps1 / eps2, affine parameters (D,) or None. MLP: fc1 (H, D), fc2 (D, H), activation code
// act (simd.h). *_packed: the weight packed by pack_gemm_weight, or None (BLAS). x and every
// parameter must be fp32 CPU tensors (RuntimeError naming the argument otherwise). Returns y (B, N, D).
Tensor block_forward_cpu(const Tensor& x, const OptTensor& ln1_weight, const OptTensor& ln1_bias, double eps1,
                         const Tensor& qkv_weight, const OptTensor& qkv_bias, const OptTensor& qkv_packed,
                         const Tensor& proj_weight, const OptTensor& proj_bias, const OptTensor& proj_packed,
                         const OptTensor& omega, int64_t gh, int64_t gw, int64_t num_prefix, int64_t heads,
                         double scale, const OptTensor& ln2_weight, const OptTensor& ln2_bias, double eps2,
                         const Tensor& fc1_weight, const OptTensor& fc1_bias, const OptTensor& fc1_packed,
                         const Tensor& fc2_weight, const OptTensor& fc2_bias, const OptTensor& fc2_packed,
                         int64_t act);

}  // namespace vitkern
