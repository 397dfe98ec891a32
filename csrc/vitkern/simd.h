// The two row primitives of the CPU softmax: a row maximum and an in-place
// exp(x - shift) that returns the row sum. AVX2+FMA versions are compiled with
// function-level target attributes and chosen at run time, so the extension
// runs (more slowly) on a CPU without AVX2 and never executes an illegal
// instruction (AVX-512 > AVX2+FMA > scalar). NaN propagates as in std::exp;
// exp(-inf) is exactly 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace vitkern::simd {

inline float row_max_scalar(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = (x[i] > m || std::isnan(x[i])) ? x[i] : m;
  return m;
}

inline float exp_sub_sum_scalar(float* x, int64_t n, float shift) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    s += x[i];
  }
  return s;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) inline float row_max_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan_seen = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m = _mm256_max_ps(m, v);
  }
  alignas(32) float buf[8];
  _mm256_store_ps(buf, m);
  float r = buf[0];
  for (int k = 1; k < 8; ++k) r = buf[k] > r ? buf[k] : r;
  if (_mm256_movemask_ps(nan_seen)) return std::numeric_limits<float>::quiet_NaN();
  for (; i < n; ++i) r = (x[i] > r || std::isnan(x[i])) ? x[i] : r;
  return r;
}

// Cephes-style expf: 2^round(x log2 e) * p(r), |rel err| ~ 2e-7.
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365478515625f);
  const __m256 is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 xc = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), underflow);
  return _mm256_blendv_ps(y, x, is_nan);  // NaN in, NaN out
}

__attribute__((target("avx2,fma"))) inline float exp_sub_sum_avx2(float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 y = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    _mm256_storeu_ps(x + i, y);
    acc = _mm256_add_ps(acc, y);
  }
  alignas(32) float buf[8];
  _mm256_store_ps(buf, acc);
  float s = ((buf[0] + buf[1]) + (buf[2] + buf[3])) + ((buf[4] + buf[5]) + (buf[6] + buf[7]));
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    s += x[i];
  }
  return s;
}

// AVX-512: 16 lanes, and vscalefps does the 2^n scaling with correct
// underflow to 0 / overflow to inf, so no exponent-bit arithmetic or blends.
__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  // Operand order keeps NaN: max_ps/min_ps return the second operand if either is NaN.
  x = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, fx);
}

__attribute__((target("avx512f"))) inline float exp_sub_sum_avx512(float* x, int64_t n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 y = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh));
    _mm512_storeu_ps(x + i, y);
    acc = _mm512_add_ps(acc, y);
  }
  if (i < n) {  // masked tail: no scalar loop
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 y = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), sh));
    _mm512_mask_storeu_ps(x + i, m, y);
    acc = _mm512_mask_add_ps(acc, m, acc, y);
  }
  return _mm512_reduce_add_ps(acc);
}

__attribute__((target("avx512f"))) inline float row_max_avx512(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan_seen = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan_seen |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), k, x + i);
    nan_seen |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  if (nan_seen) return std::numeric_limits<float>::quiet_NaN();
  return _mm512_reduce_max_ps(m);
}

inline bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
inline bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}
#else
inline bool has_avx2() { return false; }
inline bool has_avx512() { return false; }
#endif

inline float row_max(const float* x, int64_t n) {
#if defined(__x86_64__)
  if (has_avx512()) return row_max_avx512(x, n);
  if (has_avx2()) return row_max_avx2(x, n);
#endif
  return row_max_scalar(x, n);
}

// x[i] = exp(x[i] - shift) in place; returns the sum of the new x.
inline float exp_sub_sum(float* x, int64_t n, float shift) {
#if defined(__x86_64__)
  if (has_avx512()) return exp_sub_sum_avx512(x, n, shift);
  if (has_avx2()) return exp_sub_sum_avx2(x, n, shift);
#endif
  return exp_sub_sum_scalar(x, n, shift);
}

}  // namespace vitkern::simd
