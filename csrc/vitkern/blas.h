// Column-major fp32 GEMM for the CPU kernels' block products.
//
// The BLAS that torch uses is reached through the Fortran symbol `sgemm_`,
// which torch's x86 wheels export (MKL is linked into libtorch_cpu). No ABI,
// stable or not, covers it: the symbol is weak, and on a torch build without it
// (or with VITKERN_BLAS=aten in the environment, read once: the tests use it)
// the block products go through aten::mm by the stable dispatcher call instead
// (same math, more overhead: a product tensor per call).
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "stable.h"

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace vitkern {

// Uninitialised fp32 scratch for tiles that are written in full before being read.
// (std::vector<float>(n) zero-fills: for the LN-MLP forward's hidden tile that was a
// 9.7 MB memset per call, ~3 % of the op at D 384.)
using Scratch = std::unique_ptr<float[]>;
inline Scratch scratch(int64_t n) { return Scratch(new float[std::max<int64_t>(n, 1)]); }

inline bool use_sgemm() {
  static const bool use = [] {
    const char* env = std::getenv("VITKERN_BLAS");
    return sgemm_ != nullptr && !(env != nullptr && std::strcmp(env, "aten") == 0);
  }();
  return use;
}

inline const char* blas_backend() {
  if (use_sgemm()) return "sgemm_ (torch's BLAS)";
  return sgemm_ != nullptr ? "aten::mm (VITKERN_BLAS=aten)" : "aten::mm (torch exports no sgemm_)";
}

// C(m x n) = alpha * op(A)(m x k) . op(B)(k x n) + beta * C, all column-major.
inline void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (use_sgemm()) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  // Column-major (rows x cols) with leading dim ld is the strided view {rows, cols} / {1, ld}.
  auto view = [](const float* p, int64_t rows, int64_t cols, int64_t ld) {
    return from_blob(const_cast<float*>(p), {rows, cols}, {1, ld});
  };
  const Tensor A = trans_a ? transposed(view(a, k, m, lda)) : view(a, m, k, lda);
  const Tensor B = trans_b ? transposed(view(b, n, k, ldb)) : view(b, k, n, ldb);
  const Tensor prod = contig(mm(A, B));  // (m, n) row-major
  const float* p = f32_ptr(prod);
  for (int64_t j = 0; j < n; ++j) {
    float* cj = c + j * ldc;
    if (beta == 0.f) {  // BLAS semantics: C is not read (it may hold garbage)
      for (int64_t i = 0; i < m; ++i) cj[i] = alpha * p[i * n + j];
    } else {
      for (int64_t i = 0; i < m; ++i) cj[i] = alpha * p[i * n + j] + beta * cj[i];
    }
  }
}

}  // namespace vitkern
