#include "spatial_prior.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "checks.h"

namespace vitkern {

void check_spatial_prior_args(const at::Tensor& omega, int64_t gh, int64_t gw, int64_t num_prefix) {
  TORCH_CHECK(gh > 0 && gw > 0, "grid must be positive, got (", gh, ", ", gw, ")");
  TORCH_CHECK(num_prefix >= 0, "num_prefix_tokens must be >= 0, got ", num_prefix);
  VK_CHECK_FLOATING(omega);
  check_shape(omega, "omega", {-1, 2 * gh - 1, 2 * gw - 1});
}

void check_spatial_prior_grad(const at::Tensor& grad, int64_t heads, int64_t gh, int64_t gw, int64_t num_prefix) {
  TORCH_CHECK(gh > 0 && gw > 0, "grid must be positive, got (", gh, ", ", gw, ")");
  TORCH_CHECK(num_prefix >= 0, "num_prefix_tokens must be >= 0, got ", num_prefix);
  VK_CHECK_FLOATING(grad);
  const int64_t n = num_prefix + gh * gw;
  check_shape(grad, "grad", {heads, n, n});
}

at::Tensor spatial_prior_forward_cpu(const at::Tensor& omega_in, int64_t gh, int64_t gw, int64_t num_prefix) {
  VK_CHECK_CPU(omega_in);
  check_spatial_prior_args(omega_in, gh, gw, num_prefix);
  const at::Tensor omega = omega_in.contiguous();
  const int64_t heads = omega.size(0);
  const int64_t n = num_prefix + gh * gw;
  const int64_t tw = 2 * gw - 1, th = 2 * gh - 1;
  at::Tensor out = at::empty({heads, n, n}, omega.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, omega.scalar_type(), "spatial_prior_forward_cpu", [&] {
    const scalar_t* tab = omega.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // One task per (head, query row): each row is written exactly once.
    at::parallel_for(0, heads * n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t hi = begin; hi < end; ++hi) {
        const int64_t h = hi / n, i = hi % n;
        scalar_t* row = o + hi * n;
        if (i < num_prefix) {
          for (int64_t j = 0; j < n; ++j) row[j] = scalar_t(1);
          continue;
        }
        const int64_t ri = (i - num_prefix) / gw, ci = (i - num_prefix) % gw;
        for (int64_t j = 0; j < num_prefix; ++j) row[j] = scalar_t(1);
        // Row ry of the table for key row rj is (rj - ri + gh - 1); columns run
        // contiguously, so a key row copies a contiguous slice of the table row.
        const scalar_t* tab_h = tab + h * th * tw;
        for (int64_t rj = 0; rj < gh; ++rj) {
          const scalar_t* src = tab_h + (rj - ri + gh - 1) * tw + (gw - 1 - ci);
          scalar_t* dst = row + num_prefix + rj * gw;
          for (int64_t cj = 0; cj < gw; ++cj) dst[cj] = src[cj];
        }
      }
    });
  });
  return out;
}

at::Tensor spatial_prior_backward_cpu(const at::Tensor& grad_in, int64_t gh, int64_t gw, int64_t num_prefix) {
  VK_CHECK_CPU(grad_in);
  const int64_t heads = grad_in.dim() == 3 ? grad_in.size(0) : -1;
  check_spatial_prior_grad(grad_in, heads, gh, gw, num_prefix);
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = num_prefix + gh * gw;
  const int64_t tw = 2 * gw - 1, th = 2 * gh - 1;
  at::Tensor out = at::empty({heads, th, tw}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "spatial_prior_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // One task per table cell (head, dy, dx): it sums, in a fixed order, every
    // (query, key) pair with that offset, so the result is deterministic.
    at::parallel_for(0, heads * th * tw, 8, [&](int64_t begin, int64_t end) {
      for (int64_t cell = begin; cell < end; ++cell) {
        const int64_t h = cell / (th * tw);
        const int64_t dy = (cell / tw) % th - (gh - 1);
        const int64_t dx = cell % tw - (gw - 1);
        const scalar_t* gh_ptr = g + h * n * n;
        acc_t acc = 0;
        const int64_t r0 = std::max<int64_t>(0, -dy), r1 = std::min<int64_t>(gh, gh - dy);
        const int64_t c0 = std::max<int64_t>(0, -dx), c1 = std::min<int64_t>(gw, gw - dx);
        for (int64_t ri = r0; ri < r1; ++ri) {
          for (int64_t ci = c0; ci < c1; ++ci) {
            const int64_t i = num_prefix + ri * gw + ci;
            const int64_t j = num_prefix + (ri + dy) * gw + (ci + dx);
            acc += static_cast<acc_t>(gh_ptr[i * n + j]);
          }
        }
        o[cell] = static_cast<scalar_t>(acc);
      }
    });
  });
  return out;
}

}  // namespace vitkern
