// Fused LayerNorm (or RMSNorm, rms) + MLP (docs/DESIGN.md §1.4), CPU kernels. act: the
// activation code of simd.h (1 GELU, 2 GELU tanh, 3 QuickGELU, 4 SiLU).
#pragma once

#include "stable.h"

#include <vector>

namespace vitkern {

// x: (M, D). Returns {out (M, D) in x's dtype, mean (M), rstd (M), and when saving for
// backward pre-activation (M, Hd), GELU output (M, Hd), LN output (M, D) (else (0,) each)}.
std::vector<Tensor> layernorm_mlp_forward_cpu(const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                                              const Tensor& fc1_weight, const OptTensor& fc1_bias,
                                              const Tensor& fc2_weight, const OptTensor& fc2_bias, double eps,
                                              int64_t act, bool rms, bool residual, bool save_for_backward);

// Returns {dx, d ln_weight, d ln_bias, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias}
// (undefined where the parameter is None).
std::vector<Tensor> layernorm_mlp_backward_cpu(const Tensor& dout, const Tensor& x, const OptTensor& ln_weight,
                                               const OptTensor& ln_bias, const Tensor& fc1_weight,
                                               const Tensor& fc2_weight, const Tensor& mean, const Tensor& rstd,
                                               const Tensor& pre, const Tensor& gelu_out, const Tensor& ln_out,
                                               int64_t act, bool rms, bool residual);

// Gated MLP (GLU family): y = x + fc2(act(gate) * value). fc1 is w1a (2H, D) packed (w1b None;
// gate_first: the gate is rows [0, H)) or w1a = gate, w1b = value (H, D) each. act and rms as
// above. Returns {out, mean, rstd, and when saving pre-activation (M, 2H), gated
// activation (M, H), LN output (M, D) (else (0,) each)}.
std::vector<Tensor> layernorm_glu_forward_cpu(const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                                              const Tensor& w1a, const OptTensor& b1a, const OptTensor& w1b,
                                              const OptTensor& b1b, const Tensor& fc2_weight, const OptTensor& fc2_bias,
                                              double eps, int64_t act, bool rms, bool gate_first, bool residual,
                                              bool save_for_backward);

// Returns {dx, d ln_weight, d ln_bias, d w1a, d b1a, d w1b, d b1b, d fc2_weight, d fc2_bias}
// (undefined where there is no such parameter).
std::vector<Tensor> layernorm_glu_backward_cpu(const Tensor& dout, const Tensor& x, const OptTensor& ln_weight,
                                               const OptTensor& ln_bias, const Tensor& w1a, const OptTensor& w1b,
                                               const Tensor& fc2_weight, const Tensor& mean, const Tensor& rstd,
                                               const Tensor& pre, const Tensor& hidden, const Tensor& ln_out,
                                               int64_t act, bool rms, bool gate_first, bool residual);

}  // namespace vitkern
