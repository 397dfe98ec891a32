// Column-major fp32 GEMM for the CPU kernels' block products.
//
// The BLAS that torch uses is reached through the Fortran symbol `sgemm_`,
// which torch's x86 wheels export (MKL is linked into libtorch_cpu).
// at::native::cpublas::gemm would be nicer but is not exported. The symbol
// is weak: on a torch build without it the block products fall back to
// at::mm_out / at::addmm_out on borrowed memory (same math, more overhead).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <memory>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace vitkern {

// Uninitialised fp32 scratch for tiles that are written in full before being read.
// (std::vector<float>(n) zero-fills: for the LN-MLP forward's hidden tile that was a
// 9.7 MB memset per call, ~3 % of the op at D 384.)
using Scratch = std::unique_ptr<float[]>;
inline Scratch scratch(int64_t n) { return Scratch(new float[std::max<int64_t>(n, 1)]); }

inline const char* blas_backend() { return sgemm_ != nullptr ? "sgemm_ (torch's BLAS)" : "aten mm_out"; }

// C(m x n) = alpha * op(A)(m x k) . op(B)(k x n) + beta * C, all column-major.
inline void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ != nullptr) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  // Column-major (rows x cols) with leading dim ld is a strided view {rows, cols} / {1, ld}.
  auto view = [&](const float* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<float*>(p), {rows, cols}, {1, ld}, opts);
  };
  at::Tensor A = trans_a ? view(a, k, m, lda).t() : view(a, m, k, lda);
  at::Tensor B = trans_b ? view(b, n, k, ldb).t() : view(b, k, n, ldb);
  at::Tensor C = view(c, m, n, ldc);
  if (beta == 0.f) {
    at::Tensor prod = at::mm(A, B);
    C.copy_(alpha == 1.f ? prod : prod.mul_(alpha));
  } else {
    C.mul_(beta).add_(at::mm(A, B), alpha);
  }
}

}  // namespace vitkern
