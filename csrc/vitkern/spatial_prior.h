// Spatial prior matrix: expands the per-head relative-position table Omega
// (H, 2*gh-1, 2*gw-1) into the dense (H, N, N) prior of SP-SA (docs/DESIGN.md §1.2),
// and the backward that folds a dense gradient back into the table.
// Prefix tokens (the first `num_prefix` positions) get factor 1.
#pragma once

#include "stable.h"

namespace vitkern {

// Relative-offset index helpers of the CPU kernels.
// Token t >= num_prefix sits at row (t - P) / gw, col (t - P) % gw.
struct GridIndex {
  int64_t gh, gw, num_prefix;
  inline int64_t table_w() const { return 2 * gw - 1; }
};

Tensor spatial_prior_forward_cpu(const Tensor& omega, int64_t gh, int64_t gw, int64_t num_prefix);
Tensor spatial_prior_backward_cpu(const Tensor& grad, int64_t gh, int64_t gw, int64_t num_prefix);

// Shared argument validation (device-agnostic).
void check_spatial_prior_args(const Tensor& omega, int64_t gh, int64_t gw, int64_t num_prefix);
void check_spatial_prior_grad(const Tensor& grad, int64_t heads, int64_t gh, int64_t gw, int64_t num_prefix);

}  // namespace vitkern
