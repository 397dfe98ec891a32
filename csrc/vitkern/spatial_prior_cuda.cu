// CUDA versions of the spatial-prior expansion (see spatial_prior.h).
// Compiled when setup.py finds nvcc and a CUDA build of torch; it cannot run
// on the GPU-less development machines, where the CPU kernels are used.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "spatial_prior.h"

namespace vitkern {
namespace {

template <typename scalar_t>
__global__ void spatial_prior_forward_kernel(const scalar_t* __restrict__ tab,  // (H, 2gh-1, 2gw-1)
                                             scalar_t* __restrict__ out,        // (H, N, N)
                                             int64_t heads, int64_t gh, int64_t gw, int64_t num_prefix) {
  const int64_t n = num_prefix + gh * gw;
  const int64_t tw = 2 * gw - 1, th = 2 * gh - 1;
  const int64_t total = heads * n * n;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = idx % n, i = (idx / n) % n, h = idx / (n * n);
    if (i < num_prefix || j < num_prefix) {
      out[idx] = scalar_t(1);
    } else {
      const int64_t pi = i - num_prefix, pj = j - num_prefix;
      const int64_t ry = pj / gw - pi / gw + gh - 1;
      const int64_t rx = pj % gw - pi % gw + gw - 1;
      out[idx] = tab[(h * th + ry) * tw + rx];
    }
  }
}

template <typename scalar_t>
__global__ void spatial_prior_backward_kernel(const scalar_t* __restrict__ grad,  // (H, N, N)
                                              scalar_t* __restrict__ out,         // (H, 2gh-1, 2gw-1)
                                              int64_t heads, int64_t gh, int64_t gw, int64_t num_prefix) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = num_prefix + gh * gw;
  const int64_t tw = 2 * gw - 1, th = 2 * gh - 1;
  const int64_t cells = heads * th * tw;
  // One thread per table cell, fixed summation order: deterministic, no atomics.
  for (int64_t cell = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; cell < cells;
       cell += (int64_t)gridDim.x * blockDim.x) {
    const int64_t h = cell / (th * tw);
    const int64_t dy = (cell / tw) % th - (gh - 1);
    const int64_t dx = cell % tw - (gw - 1);
    const int64_t r0 = dy < 0 ? -dy : 0, r1 = dy > 0 ? gh - dy : gh;
    const int64_t c0 = dx < 0 ? -dx : 0, c1 = dx > 0 ? gw - dx : gw;
    acc_t acc = 0;
    for (int64_t ri = r0; ri < r1; ++ri)
      for (int64_t ci = c0; ci < c1; ++ci) {
        const int64_t i = num_prefix + ri * gw + ci;
        const int64_t j = num_prefix + (ri + dy) * gw + (ci + dx);
        acc += static_cast<acc_t>(grad[(h * n + i) * n + j]);
      }
    out[cell] = static_cast<scalar_t>(acc);
  }
}

inline int blocks_for(int64_t total, int threads) {
  const int64_t b = (total + threads - 1) / threads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535));
}

}  // namespace

at::Tensor spatial_prior_forward_cuda(const at::Tensor& omega_in, int64_t gh, int64_t gw, int64_t num_prefix) {
  VK_CHECK_CUDA(omega_in);
  check_spatial_prior_args(omega_in, gh, gw, num_prefix);
  const c10::cuda::CUDAGuard guard(omega_in.device());
  const at::Tensor omega = omega_in.contiguous();
  const int64_t heads = omega.size(0), n = num_prefix + gh * gw;
  at::Tensor out = at::empty({heads, n, n}, omega.options());
  if (out.numel() == 0) return out;
  constexpr int threads = 256;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, omega.scalar_type(), "spatial_prior_forward_cuda", [&] {
    spatial_prior_forward_kernel<scalar_t><<<blocks_for(out.numel(), threads), threads, 0, stream>>>(
        omega.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), heads, gh, gw, num_prefix);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor spatial_prior_backward_cuda(const at::Tensor& grad_in, int64_t gh, int64_t gw, int64_t num_prefix) {
  VK_CHECK_CUDA(grad_in);
  const int64_t heads = grad_in.dim() == 3 ? grad_in.size(0) : -1;
  check_spatial_prior_grad(grad_in, heads, gh, gw, num_prefix);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = at::empty({heads, 2 * gh - 1, 2 * gw - 1}, grad.options());
  if (out.numel() == 0) return out;
  constexpr int threads = 128;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "spatial_prior_backward_cuda", [&] {
    spatial_prior_backward_kernel<scalar_t><<<blocks_for(out.numel(), threads), threads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), heads, gh, gw, num_prefix);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace vitkern
