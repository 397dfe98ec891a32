// SIMD row primitives of the CPU kernels: the softmax's row maximum and in-place
// exp(x - shift) with its sum, the spatial prior's row multiply / accumulate and the
// MLP activations (forward and derivative). Each has an AVX-512, an AVX2+FMA and a
// scalar version; the vector ones are compiled with function-level target attributes
// and chosen at run time (AVX-512 > AVX2+FMA > scalar, capped by VITKERN_SIMD), so the
// extension runs on any x86-64 CPU and never executes an illegal instruction. NaN
// propagates as in std::exp; exp(-inf) is exactly 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

// VITKERN_GENERIC_SIMD (build switch VITKERN_GENERIC_SIMD=1) compiles none of the
// x86 intrinsics or target clones: only the portable scalar loops below, which is
// what a non-x86 (e.g. aarch64) build gets anyway. The tests run against it in CI.
#if defined(__x86_64__) && !defined(VITKERN_GENERIC_SIMD)
#define VK_X86_SIMD 1
#else
#define VK_X86_SIMD 0
#endif

#if VK_X86_SIMD
#include <immintrin.h>
#endif

// Plain row loops (LayerNorm, residual init, column sums) are compiled for AVX-512,
// AVX2 and baseline x86-64 and picked at load time (GCC/Clang function multiversioning);
// the extension itself is built for baseline x86-64, where they would be 4-wide SSE.
#if VK_X86_SIMD && defined(__GNUC__) && !defined(VITKERN_NO_TARGET_CLONES)
#define VK_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VK_TARGET_CLONES
#endif

namespace vitkern::simd {

// The SIMD code paths compiled into this build (reported by `vitkern info`).
inline const char* compiled_paths() { return VK_X86_SIMD ? "avx512f, avx2+fma, scalar (picked at run time)" : "scalar only (generic build)"; }

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

#if VK_X86_SIMD
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
  if (i < n) {  // masked tail (a scalar std::exp per element cost more than the vector loop
               // on 197-token rows)
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)), lane);
    const __m256 y = exp_avx2(_mm256_sub_ps(_mm256_maskload_ps(x + i, mask), sh));
    _mm256_maskstore_ps(x + i, mask, y);
    acc = _mm256_add_ps(acc, _mm256_and_ps(y, _mm256_castsi256_ps(mask)));
  }
  alignas(32) float buf[8];
  _mm256_store_ps(buf, acc);
  return ((buf[0] + buf[1]) + (buf[2] + buf[3])) + ((buf[4] + buf[5]) + (buf[6] + buf[7]));
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

// LayerNorm's row statistics: mean (0 for RMSNorm) and the mean square deviation from it, two
// passes over the row in four independent accumulators, each reduced as a tree. (The plain
// `omp simd` reduction kept one accumulator chain and reduced it lane by lane in scalar adds:
// ~100 cycles a row at d = 384, 1% of a bf16 ViT-S forward.)
template <bool Square>
__attribute__((target("avx512f"))) inline __m512 ln_term_avx512(__m512 v, __m512 m) {
  v = _mm512_sub_ps(v, m);
  return Square ? _mm512_mul_ps(v, v) : v;
}
template <bool Square>
__attribute__((target("avx512f"))) inline float ln_pass_avx512(const float* x, int64_t n, float mu) {
  const __m512 m = _mm512_set1_ps(mu);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, ln_term_avx512<Square>(_mm512_loadu_ps(x + i), m));
    a1 = _mm512_add_ps(a1, ln_term_avx512<Square>(_mm512_loadu_ps(x + i + 16), m));
    a2 = _mm512_add_ps(a2, ln_term_avx512<Square>(_mm512_loadu_ps(x + i + 32), m));
    a3 = _mm512_add_ps(a3, ln_term_avx512<Square>(_mm512_loadu_ps(x + i + 48), m));
  }
  for (; i + 16 <= n; i += 16) a0 = _mm512_add_ps(a0, ln_term_avx512<Square>(_mm512_loadu_ps(x + i), m));
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1u);
    a1 = _mm512_mask_add_ps(a1, k, a1, ln_term_avx512<Square>(_mm512_maskz_loadu_ps(k, x + i), m));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
__attribute__((target("avx512f"))) inline void ln_stats_avx512(const float* x, int64_t n, bool rms, float* mean,
                                                               float* var) {
  const float mu = rms ? 0.f : ln_pass_avx512<false>(x, n, 0.f) / static_cast<float>(n);
  *mean = mu;
  *var = ln_pass_avx512<true>(x, n, mu) / static_cast<float>(n);
}

// VITKERN_SIMD=avx2 or =scalar in the environment (read once) caps the path picked at run
// time below what the CPU offers, so the AVX2 and scalar code is testable on an AVX-512
// machine (tests/test_simd_paths.py). The compiler-multiversioned row loops
// (VK_TARGET_CLONES) are not affected: their clones compute the same thing.
inline int simd_cap() {  // 2 = avx512, 1 = avx2, 0 = scalar
  static const int cap = [] {
    const char* env = std::getenv("VITKERN_SIMD");
    if (env == nullptr || *env == 0) return 2;
    if (std::strcmp(env, "scalar") == 0) return 0;
    if (std::strcmp(env, "avx2") == 0) return 1;
    return 2;  // "avx512", or a value vitkern/_ext.py warns about
  }();
  return cap;
}
inline bool has_avx2() {
  static const bool ok = simd_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
inline bool has_avx512() {
  static const bool ok = simd_cap() >= 2 && __builtin_cpu_supports("avx512f");
  return ok;
}
#else
inline bool has_avx2() { return false; }
inline bool has_avx512() { return false; }
#endif

// The path the dispatchers below take on this CPU (after the VITKERN_SIMD cap).
inline const char* active_path() {
  if (has_avx512()) return "avx512f";
  if (has_avx2()) return "avx2+fma";
  return "scalar";
}

inline float row_max(const float* x, int64_t n) {
#if VK_X86_SIMD
  if (has_avx512()) return row_max_avx512(x, n);
  if (has_avx2()) return row_max_avx2(x, n);
#endif
  return row_max_scalar(x, n);
}

// mean (0 when rms) and mean((x - mean)^2) of a row of n.
inline void ln_stats(const float* x, int64_t n, bool rms, float* mean, float* var) {
#if VK_X86_SIMD
  if (has_avx512()) return ln_stats_avx512(x, n, rms, mean, var);
#endif
  float s = 0.f;
  if (!rms) {
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < n; ++t) s += x[t];
  }
  const float mu = s / static_cast<float>(n);
  float v = 0.f;
#pragma omp simd reduction(+ : v)
  for (int64_t t = 0; t < n; ++t) v += (x[t] - mu) * (x[t] - mu);
  *mean = mu;
  *var = v / static_cast<float>(n);
}

// One LayerNorm row's statistics as the kernels keep them: mean (0 for RMSNorm) and 1/sqrt(var + eps).
inline void ln_row_stats(const float* x, int64_t n, bool rms, float eps, float* mean, float* rstd) {
  float mu, var;
  ln_stats(x, n, rms, &mu, &var);
  *mean = mu;
  *rstd = 1.f / std::sqrt(var + eps);
}

// x[i] = exp(x[i] - shift) in place; returns the sum of the new x.
inline float exp_sub_sum(float* x, int64_t n, float shift) {
#if VK_X86_SIMD
  if (has_avx512()) return exp_sub_sum_avx512(x, n, shift);
  if (has_avx2()) return exp_sub_sum_avx2(x, n, shift);
#endif
  return exp_sub_sum_scalar(x, n, shift);
}


inline void scale(float* x, int64_t n, float k) {
  for (int64_t t = 0; t < n; ++t) x[t] *= k;
}

// ----------------------------------------------------------------------------- activations
// The MLP's nonlinearity, by code (the same codes as the Triton kernels' ACT constexpr,
// vitkern/triton_kernels/gemm.py ACT_*):
//   kGelu      gelu(a) = a/2 (1 + erf(a/sqrt2))
//   kGeluTanh  a/2 (1 + tanh(sqrt(2/pi)(a + 0.044715 a^3)))
//   kQuickGelu a sigmoid(1.702 a)      (CLIP)
//   kSilu      a sigmoid(a)            (SwiGLU's gate)
// erf on the vector paths: a rational minimax fit, |abs err| < 5e-7 (simd_rows.inc).
enum Act : int64_t { kGelu = 1, kGeluTanh = 2, kQuickGelu = 3, kSilu = 4 };

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kQuickGeluK = 1.702f;

// The sigmoid slope of the sigmoid-gated activations.
inline float sigmoid_slope(int64_t act) { return act == kQuickGelu ? kQuickGeluK : 1.f; }

inline float act_scalar(float a, int64_t act) {
  if (act == kGeluTanh) return 0.5f * a * (1.f + std::tanh(kSqrt2OverPi * (a + 0.044715f * a * a * a)));
  if (act == kQuickGelu || act == kSilu) return a / (1.f + std::exp(-sigmoid_slope(act) * a));
  return 0.5f * a * (1.f + std::erf(a * kInvSqrt2));
}

// d act / d a
inline float act_grad_scalar(float a, int64_t act) {
  if (act == kGeluTanh) {
    const float u = kSqrt2OverPi * (a + 0.044715f * a * a * a);
    const float t = std::tanh(u);
    return 0.5f * (1.f + t) + 0.5f * a * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * 0.044715f * a * a);
  }
  if (act == kQuickGelu || act == kSilu) {
    const float k = sigmoid_slope(act);
    const float s = 1.f / (1.f + std::exp(-k * a));
    return s + k * a * s * (1.f - s);
  }
  return 0.5f * (1.f + std::erf(a * kInvSqrt2)) + a * kInvSqrt2Pi * std::exp(-0.5f * a * a);
}

#if VK_X86_SIMD
// The vector row kernels (simd_rows.inc), once per instruction set.
__attribute__((target("avx512f"))) inline __m512 copysign_avx512(__m512 mag, __m512 sgn) {
  const __m512i s = _mm512_and_si512(_mm512_castps_si512(sgn), _mm512_set1_epi32(0x80000000));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag), s));
}
#define VK_TGT __attribute__((target("avx512f")))
#define VK_NAME(f) f##_avx512
#define VF __m512
#define VW 16
#define v_set1 _mm512_set1_ps
#define v_load _mm512_loadu_ps
#define v_store _mm512_storeu_ps
#define v_add _mm512_add_ps
#define v_sub _mm512_sub_ps
#define v_mul _mm512_mul_ps
#define v_div _mm512_div_ps
#define v_fmadd _mm512_fmadd_ps
#define v_fnmadd _mm512_fnmadd_ps
#define v_abs _mm512_abs_ps
#define v_min _mm512_min_ps
#define v_max _mm512_max_ps
#define v_exp exp_avx512
#define v_mask(n) static_cast<__mmask16>((1u << (n)) - 1u)
#define v_loadm(p, m) _mm512_maskz_loadu_ps(m, p)
#define v_storem(p, m, v) _mm512_mask_storeu_ps(p, m, v)
#define v_copysign copysign_avx512
#include "simd_rows.inc"

// AVX2: masked tails through vmaskmovps (a lane mask of n leading ones).
__attribute__((target("avx2,fma"))) inline __m256i mask_avx2(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
__attribute__((target("avx2,fma"))) inline __m256 copysign_avx2(__m256 mag, __m256 sgn) {
  const __m256 sign_bit = _mm256_set1_ps(-0.f);
  return _mm256_or_ps(_mm256_andnot_ps(sign_bit, mag), _mm256_and_ps(sign_bit, sgn));
}
__attribute__((target("avx2,fma"))) inline __m256 abs_avx2(__m256 x) {
  return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
}
#define VK_TGT __attribute__((target("avx2,fma")))
#define VK_NAME(f) f##_avx2
#define VF __m256
#define VW 8
#define v_set1 _mm256_set1_ps
#define v_load _mm256_loadu_ps
#define v_store _mm256_storeu_ps
#define v_add _mm256_add_ps
#define v_sub _mm256_sub_ps
#define v_mul _mm256_mul_ps
#define v_div _mm256_div_ps
#define v_fmadd _mm256_fmadd_ps
#define v_fnmadd _mm256_fnmadd_ps
#define v_abs abs_avx2
#define v_min _mm256_min_ps
#define v_max _mm256_max_ps
#define v_copysign copysign_avx2
#define v_exp exp_avx2
#define v_mask(n) mask_avx2(n)
#define v_loadm(p, m) _mm256_maskload_ps(p, m)
#define v_storem(p, m, v) _mm256_maskstore_ps(p, m, v)
#include "simd_rows.inc"
#endif

inline void mul_scaled(float* d, const float* f, int64_t n, float k) {
#if VK_X86_SIMD
  if (has_avx512()) return mul_scaled_avx512(d, f, n, k);
  if (has_avx2()) return mul_scaled_avx2(d, f, n, k);
#endif
  for (int64_t t = 0; t < n; ++t) d[t] *= k * f[t];
}

inline void fma_acc(float* d, const float* a, const float* b, int64_t n) {
#if VK_X86_SIMD
  if (has_avx512()) return fma_acc_avx512(d, a, b, n);
  if (has_avx2()) return fma_acc_avx2(d, a, b, n);
#endif
  for (int64_t t = 0; t < n; ++t) d[t] += a[t] * b[t];
}


// g[i] = act(a[i]) when g is not null; d[i] *= act'(a[i]) when d is not null.
inline void act_fwd_bwd(const float* a, float* g, float* d, int64_t n, int64_t act) {
#if VK_X86_SIMD
  if (has_avx512()) return act_fwd_bwd_avx512(a, g, d, n, act);
  if (has_avx2()) return act_fwd_bwd_avx2(a, g, d, n, act);
#endif
  for (int64_t i = 0; i < n; ++i) {
    if (g) g[i] = act_scalar(a[i], act);
    if (d) d[i] *= act_grad_scalar(a[i], act);
  }
}

// a[i] = act(a[i] + bias[i]) in place over one row of n; the pre-activation
// a + bias is stored to `pre` when it is not null (for the backward).
inline void bias_act(float* a, const float* bias, int64_t n, int64_t act, float* pre) {
#if VK_X86_SIMD
  if (has_avx512()) return bias_act_avx512(a, bias, n, act, pre);
  if (has_avx2()) return bias_act_avx2(a, bias, n, act, pre);
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float v = a[i] + (bias ? bias[i] : 0.f);
    if (pre) pre[i] = v;
    a[i] = act_scalar(v, act);
  }
}

}  // namespace vitkern::simd
