#include "spatial_prior.h"

#include <algorithm>
#include <type_traits>

#include "checks.h"

namespace vitkern {

namespace {

// The accumulation type (at::opmath_type): fp32 for the 16-bit floats.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>, float, T>;

// Calls f(T{}) with T the C++ type of `dtype` (double, float, Half, BFloat16).
template <typename F>
void dispatch_floating(ScalarType dtype, const char* name, const F& f) {
  switch (dtype) {
    case ScalarType::Double:
      return f(double{});
    case ScalarType::Float:
      return f(float{});
    case ScalarType::Half:
      return f(Half{});
    case ScalarType::BFloat16:
      return f(BFloat16{});
    default:
      detail::fail(name, " is not implemented for dtype ", dtype_name(dtype));
  }
}

}  // namespace

void check_spatial_prior_args(const Tensor& omega, int64_t gh, int64_t gw, int64_t num_prefix) {
  VK_CHECK(gh > 0 && gw > 0, "grid must be positive, got (", gh, ", ", gw, ")");
  VK_CHECK(num_prefix >= 0, "num_prefix_tokens must be >= 0, got ", num_prefix);
  VK_CHECK_FLOATING(omega);
  check_shape(omega, "omega", {-1, 2 * gh - 1, 2 * gw - 1});
}

void check_spatial_prior_grad(const Tensor& grad, int64_t heads, int64_t gh, int64_t gw, int64_t num_prefix) {
  VK_CHECK(gh > 0 && gw > 0, "grid must be positive, got (", gh, ", ", gw, ")");
  VK_CHECK(num_prefix >= 0, "num_prefix_tokens must be >= 0, got ", num_prefix);
  VK_CHECK_FLOATING(grad);
  const int64_t n = num_prefix + gh * gw;
  check_shape(grad, "grad", {heads, n, n});
}

Tensor spatial_prior_forward_cpu(const Tensor& omega_in, int64_t gh, int64_t gw, int64_t num_prefix) {
  VK_CHECK_CPU(omega_in);
  check_spatial_prior_args(omega_in, gh, gw, num_prefix);
  const Tensor omega = contig(omega_in);
  const int64_t heads = omega.size(0);
  const int64_t n = num_prefix + gh * gw;
  const int64_t tw = 2 * gw - 1, th = 2 * gh - 1;
  Tensor out = empty({heads, n, n}, omega.scalar_type());
  dispatch_floating(omega.scalar_type(), "spatial_prior_forward_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* tab = omega.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // One task per (head, query row): each row is written exactly once.
    parallel_for(0, heads * n, 16, [&](int64_t begin, int64_t end) {
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

Tensor spatial_prior_backward_cpu(const Tensor& grad_in, int64_t gh, int64_t gw, int64_t num_prefix) {
  VK_CHECK_CPU(grad_in);
  const int64_t heads = grad_in.dim() == 3 ? grad_in.size(0) : -1;
  check_spatial_prior_grad(grad_in, heads, gh, gw, num_prefix);
  const Tensor grad = contig(grad_in);
  const int64_t n = num_prefix + gh * gw;
  const int64_t tw = 2 * gw - 1, th = 2 * gh - 1;
  Tensor out = empty({heads, th, tw}, grad.scalar_type());
  dispatch_floating(grad.scalar_type(), "spatial_prior_backward_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // One task per table cell (head, dy, dx): it sums, in a fixed order, every
    // (query, key) pair with that offset, so the result is deterministic.
    parallel_for(0, heads * th * tw, 8, [&](int64_t begin, int64_t end) {
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
