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
//
// The buffers come from a small per-thread pool and go back to it when the Scratch dies, so a
// kernel called again reuses the same pages. Allocating them per call let glibc hand the memory
// back to the kernel between calls (a freed buffer at the top of a heap is trimmed, the more so
// after other code ran in between: a timm model, another engine, the application itself), and
// the next call page-faulted it back in: SP-ViT-S batch 1 on two threads took 300-3000 faults per
// forward, ~1 ms each 1000 (benchmarks/NOTES.md, "Ninth session"). A thread keeps at most
// kScratchPoolBuffers buffers and kScratchPoolBytes in its pool; a buffer beyond that is freed.
constexpr int kScratchPoolBuffers = 8;
constexpr int64_t kScratchPoolBytes = int64_t{64} << 20;

class ScratchPool {
 public:
  ~ScratchPool() {
    for (int i = 0; i < count_; ++i) delete[] bufs_[i].p;
  }
  // The smallest pooled buffer of at least n floats, or a new one (capacity in *cap).
  float* take(int64_t n, int64_t* cap) {
    int best = -1;
    for (int i = 0; i < count_; ++i) {
      if (bufs_[i].cap >= n && (best < 0 || bufs_[i].cap < bufs_[best].cap)) best = i;
    }
    if (best < 0) {
      *cap = n;
      return new float[n];
    }
    float* p = bufs_[best].p;
    *cap = bufs_[best].cap;
    bytes_ -= *cap * static_cast<int64_t>(sizeof(float));
    bufs_[best] = bufs_[--count_];
    return p;
  }
  void give(float* p, int64_t cap) {
    const int64_t b = cap * static_cast<int64_t>(sizeof(float));
    if (count_ == kScratchPoolBuffers || bytes_ + b > kScratchPoolBytes) {
      delete[] p;
      return;
    }
    bufs_[count_++] = {p, cap};
    bytes_ += b;
  }
  static ScratchPool& local() {
    thread_local ScratchPool pool;
    return pool;
  }

 private:
  struct Buf {
    float* p;
    int64_t cap;
  };
  Buf bufs_[kScratchPoolBuffers] = {};
  int count_ = 0;
  int64_t bytes_ = 0;
};

class Scratch {
 public:
  Scratch() = default;
  explicit Scratch(int64_t n) { p_ = ScratchPool::local().take(std::max<int64_t>(n, 1), &cap_); }
  ~Scratch() { release(); }
  Scratch(Scratch&& o) noexcept : p_(o.p_), cap_(o.cap_) {
    o.p_ = nullptr;
    o.cap_ = 0;
  }
  Scratch& operator=(Scratch&& o) noexcept {
    if (this != &o) {
      release();
      p_ = o.p_;
      cap_ = o.cap_;
      o.p_ = nullptr;
      o.cap_ = 0;
    }
    return *this;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* get() const { return p_; }
  float& operator[](int64_t i) const { return p_[i]; }

 private:
  void release() {
    if (p_ != nullptr) ScratchPool::local().give(p_, cap_);  // (the pool of the thread it dies on)
    p_ = nullptr;
    cap_ = 0;
  }
  float* p_ = nullptr;
  int64_t cap_ = 0;
};
inline Scratch scratch(int64_t n) { return Scratch(n); }

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
