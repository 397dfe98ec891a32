// Flash-style spatial-prior attention (SP-SA) on the CPU, forward and backward.
//
//   s_ij = (q_i . k_j) * scale * omega[h, ry(i,j), rx(i,j)]   (1 for prefix pairs)
//   out_i = sum_j softmax_j(s_ij) v_j
//
// Blocks of BM queries meet blocks of BN keys; the softmax is online (running
// max m and sum l per row, fp32), so no (N x N) buffer exists: per task the
// largest buffers are BM x BN tiles. The prior factor comes from the small
// per-head table, indexed by the relative offset computed on the fly.
// Block GEMMs run on vitkern's packed micro-kernel where that route is active (gemm.h: K, V,
// dO and Q packed per head or per query block), else on the BLAS torch uses (sgemm_, blas.h); fp32.
// Inputs of any floating dtype are computed in fp32 (fp64 is left to the
// reference path); outputs are cast back. Backward is deterministic: every
// (batch, head) task owns its dK/dV rows and its own d-omega partial table,
// and the partials are summed over the batch in a fixed order.

#include <cmath>
#include <limits>
#include <vector>

#include "blas.h"
#include "checks.h"
#include "gemm.h"
#include "simd.h"
#include "sp_attention.h"

namespace vitkern {
namespace {


// Tile sizes (measured, benchmarks/NOTES.md): 64 x 512 fp32 scores = 128 KiB,
// resident in L2; a 196- or 576-token sequence is one or two key blocks.
constexpr int64_t kBlockM = 64;   // queries per tile
constexpr int64_t kBlockN = 512;  // keys per tile

// Rows per query block (forward and backward): n queries in ceil(n / kBlockM) blocks of equal size,
// rounded up to a multiple of 6 (the packed GEMM's micro-kernel rows).
inline int64_t query_block_rows(int64_t n) {
  const int64_t blocks = std::max<int64_t>(1, (n + kBlockM - 1) / kBlockM);
  const int64_t rows = (n + blocks - 1) / blocks;
  return std::max<int64_t>(1, (rows + 5) / 6 * 6);
}

// Row stride of a score tile (forward and backward): the key block rounded up to 16, plus 16
// floats (197 keys: 224) — not kBlockN, whose 512-float rows all start on one of two L1 sets.
inline int64_t score_row_stride(int64_t n) { return (std::min(kBlockN, n) + 15) / 16 * 16 + 16; }

// Prior geometry. The factor of patch query (ri, ci) and patch key (rj, cj) is
// tab[rj - ri + gh - 1][cj - ci + gw - 1]. Unrolled once per call into an
// "expanded" table E[ci][r][cj] = tab[r][cj - ci + gw - 1] (gw x (2gh-1) x gw per
// head), the factors of query (ri, ci) for all patch keys in order are ONE
// contiguous slice, E[ci][gh-1-ri .. 2gh-2-ri][:], so a score row is multiplied
// by a plain vector loop instead of a gather over gh runs of gw entries (the runs
// cost more than the multiply: benchmarks/NOTES.md). d-omega accumulates into a
// per-task expanded gradient with the same layout, folded back after each task.
// Memory: H x gw x (2gh-1) x gw floats for E (21 KB per head at 14 x 14, 2 MB at
// 64 x 64, 17 MB at 128 x 128) and one expanded gradient per thread in the backward.
struct Prior {
  const float* expanded = nullptr;  // this head's E, or nullptr (no prior)
  int64_t gh = 1, gw = 1, num_prefix = 0;

  static int64_t expanded_size(int64_t gh, int64_t gw) { return gw * (2 * gh - 1) * gw; }

  // E for every head: (H, gw, 2gh-1, gw) from omega (H, 2gh-1, 2gw-1).
  static Tensor expand(const Tensor& omega, int64_t gh, int64_t gw) {
    const int64_t H = omega.size(0), th = 2 * gh - 1, tw = 2 * gw - 1;
    Tensor e = empty({H, gw, th, gw});
    const float* src = f32_ptr(omega);
    float* dst = f32_ptr(e);
    parallel_for(0, H * gw, 1, [&](int64_t b, int64_t end) {
      for (int64_t hc = b; hc < end; ++hc) {
        const int64_t h = hc / gw, ci = hc % gw;
        for (int64_t r = 0; r < th; ++r) {
          std::copy_n(src + (h * th + r) * tw + gw - 1 - ci, gw, dst + (hc * th + r) * gw);
        }
      }
    });
    return e;
  }

  // Adds an expanded gradient (gw, 2gh-1, gw) into the table gradient (2gh-1, 2gw-1),
  // in a fixed order.
  static void fold(const float* dexp, float* dtab, int64_t gh, int64_t gw) {
    const int64_t th = 2 * gh - 1, tw = 2 * gw - 1;
    for (int64_t ci = 0; ci < gw; ++ci) {
      for (int64_t r = 0; r < th; ++r) {
        const float* a = dexp + (ci * th + r) * gw;
        float* d = dtab + r * tw + gw - 1 - ci;
        for (int64_t cj = 0; cj < gw; ++cj) d[cj] += a[cj];
      }
    }
  }

  // Offset in E of patch query i's factor row (patch keys in order).
  inline int64_t row_offset(int64_t i) const {
    const int64_t pi = i - num_prefix, ri = pi / gw, ci = pi % gw;
    return (ci * (2 * gh - 1) + gh - 1 - ri) * gw;
  }

  // Multiplies row `i` of a tile, keys [j0, j1), by mult * factor in place
  // (mult = 1 skips the work for rows without a prior). If `logits` is given,
  // the row before the multiplication is copied there.
  inline void apply_row(float* s, int64_t i, int64_t j0, int64_t j1, float mult, float* logits = nullptr) const {
    const int64_t n = j1 - j0;
    if (logits) std::copy(s, s + n, logits);
    if (expanded == nullptr || i < num_prefix) {
      if (mult != 1.f) simd::scale(s, n, mult);
      return;
    }
    const int64_t jp = std::min(std::max(j0, num_prefix), j1);  // first patch key in the block
    if (mult != 1.f) simd::scale(s, jp - j0, mult);
    simd::mul_scaled(s + (jp - j0), expanded + row_offset(i) + (jp - num_prefix), j1 - jp, mult);
  }

  // d-omega for row i into the expanded gradient: dexp[r(i,j)] += ds[j] * logits[j].
  inline void accumulate_row(float* dexp, const float* ds, const float* logits, int64_t i, int64_t j0,
                             int64_t j1) const {
    if (i < num_prefix) return;
    const int64_t jp = std::min(std::max(j0, num_prefix), j1);
    simd::fma_acc(dexp + row_offset(i) + (jp - num_prefix), ds + (jp - j0), logits + (jp - j0), j1 - jp);
  }
};

// Row-major (rows x Dh) fp32 view of one (batch, head) slice.
struct Mat {
  const float* p;
  int64_t ld;
};

// C(rows_a x rows_b) = alpha * A(rows_a x k) . B(rows_b x k)^T, all row-major.
inline void gemm_abt(int64_t rows_a, int64_t rows_b, int64_t k, Mat a, Mat b, float* c, int64_t ldc,
                     float alpha = 1.f) {
  sgemm(true, false, rows_b, rows_a, k, alpha, b.p, b.ld, a.p, a.ld, 0.f, c, ldc);
}

// C(rows x k) (+)= P(rows x inner) . B(inner x k), row-major.
inline void gemm_ab(int64_t rows, int64_t inner, int64_t k, const float* p, int64_t ldp, Mat b, float beta, float* c,
                    int64_t ldc) {
  sgemm(false, false, k, rows, inner, 1.f, b.p, b.ld, p, ldp, beta, c, ldc);
}

// C(inner x k) += P(rows x inner)^T . B(rows x k), row-major.
inline void gemm_atb(int64_t rows, int64_t inner, int64_t k, const float* p, int64_t ldp, Mat b, float* c,
                     int64_t ldc) {
  sgemm(false, true, k, inner, rows, 1.f, b.p, b.ld, p, ldp, 1.f, c, ldc);
}

// fp32 tensor whose last dim is contiguous (a view when the input already is one).
Tensor as_fp32_rows(const Tensor& x) {
  const Tensor y = to(x, kFloat);
  return y.stride(y.dim() - 1) == 1 ? y : contig(y);
}

inline Mat slice(const Tensor& x, int64_t b, int64_t h) {
  return {f32_ptr(x) + b * x.stride(0) + h * x.stride(1), x.stride(2)};
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& omega, int64_t gh, int64_t gw,
                  int64_t num_prefix) {
  VK_CHECK_CPU(q);
  VK_CHECK_CPU(k);
  VK_CHECK_CPU(v);
  VK_CHECK_FLOATING(q);
  VK_CHECK(q.dim() == 4, "q must have shape (batch, heads, seqlen, head_dim), got ", shape_str(q));
  VK_CHECK(sizes_of(k) == sizes_of(q) && sizes_of(v) == sizes_of(q), "q, k and v must have the same shape, got q ",
           shape_str(q), ", k ", shape_str(k), ", v ", shape_str(v));
  VK_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k and v must share a dtype");
  if (omega.has_value()) {
    const auto& om = *omega;
    VK_CHECK_CPU(om);
    VK_CHECK(gh > 0 && gw > 0, "grid must be positive, got (", gh, ", ", gw, ")");
    VK_CHECK(num_prefix >= 0, "num_prefix_tokens must be >= 0, got ", num_prefix);
    check_shape(om, "omega", {q.size(1), 2 * gh - 1, 2 * gw - 1});
    VK_CHECK(num_prefix + gh * gw == q.size(2), "grid (", gh, ", ", gw, ") with ", num_prefix,
             " prefix tokens does not match seqlen ", q.size(2));
  }
}

}  // namespace

std::vector<Tensor> sp_attention_forward_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                             const OptTensor& omega_in, int64_t gh, int64_t gw, int64_t num_prefix,
                                             double scale_d) {
  return sp_attention_forward_impl(q_in, k_in, v_in, omega_in, gh, gw, num_prefix, scale_d, false);
}

std::vector<Tensor> sp_attention_forward_impl(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                              const OptTensor& omega_in, int64_t gh, int64_t gw, int64_t num_prefix,
                                              double scale_d, bool bf16_products, float* out_into,
                                              uint16_t* out16_into, int64_t ld16) {
  check_inputs(q_in, k_in, v_in, omega_in, gh, gw, num_prefix);
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), Dh = q_in.size(3);
  const Tensor q = as_fp32_rows(q_in), k = as_fp32_rows(k_in), v = as_fp32_rows(v_in);
  const Tensor omega = opt_f32(omega_in);
  const Tensor expanded = omega.defined() ? Prior::expand(omega, gh, gw) : Tensor();
  const float* expanded_p = f32_ptr_or_null(expanded);
  const int64_t esize = Prior::expanded_size(gh, gw);
  const float scale = static_cast<float>(scale_d);
  // The output is stored token-major, (B, N, H, Dh), and returned as a (B, H, N, Dh)
  // view: the usual transpose(1, 2).reshape(B, N, H*Dh) before the output
  // projection is then free instead of a copy.
  // fp32, cast at the end if needed; or the caller's (B, N, H, Dh) buffer (the one-call block's)
  // (or bf16 rows into out16_into, the one-call block's proj A rows: then no fp32 output at all)
  const bool to16 = out16_into != nullptr;
  Tensor out_tok = out_into != nullptr ? from_blob(out_into, {B, N, H, Dh}, {N * H * Dh, H * Dh, Dh, 1})
                                       : empty({to16 ? 0 : B, N, H, Dh});
  Tensor out = permuted(out_tok, {0, 2, 1, 3});
  // The log-sum-exp rows are for the backward: the one-call block (out_into, inference) has none.
  const bool want_lse = out_into == nullptr && !to16;
  Tensor lse = empty({want_lse ? B : 0, H, N});
  // Query blocks of about kBlockM rows, equal in size (197 tokens: 54, 54, 54, 35, not 64, 64,
  // 64, 5), in multiples of the GEMM micro-kernel's 6 rows.
  const int64_t bm = query_block_rows(N);
  const int64_t n_qblk = (N + bm - 1) / bm;
  float* out_p = f32_ptr(out_tok);
  float* lse_p = want_lse ? f32_ptr(lse) : nullptr;
  // Packed GEMM route (gemm.h): per (batch, head), K times the logit scale is packed once into
  // 16-key panels and V into 16-column panels, so both tile products, Q . K^T and P . V, run on
  // the micro-kernel over contiguous panels (V read in place had a row stride of 3 * H * Dh floats
  // from the fused qkv: a page per key). Elsewhere both are sgemm calls, the scale riding on alpha.
  const bool packed = packed_gemm_active();
  // bf16 products (the one-call block's bf16 inference): the packed panels hold bf16 (two per
  // float of the buffers below), K over Dh padded to even (dhp), V over N padded to even (np2).
  const bool bf = packed && bf16_products && bf16_gemm_active();
  const int64_t dhp = Dh + Dh % 2, np2 = N + N % 2;
  const int64_t kpk_size = bf ? (packed_weight_numel_bf16(N, Dh) + 1) / 2 : packed_weight_numel(N, Dh);
  const int64_t vpk_size = bf ? (packed_weight_numel_bf16(Dh, N) + 1) / 2 : packed_weight_numel(Dh, N);
  // With enough (batch, head) pairs for every thread, one task is a whole (batch, head): its
  // thread packs K and V into its own buffer and runs every query block while they are still in
  // its L2 (ViT-S batch 8: 48 heads x 100 KB packed, which a separate packing pass had pushed out
  // to L3 before the products read them). With few pairs (batch 1 on several threads) the packing
  // is a pass of its own and the tasks are query blocks, so the threads share every head.
  const bool per_head = packed && B * H >= 4 * std::max<int64_t>(1, num_threads());
  Tensor kvpk = packed && !per_head ? empty({B * H * (kpk_size + vpk_size)}) : Tensor();
  float* kpk_all = packed && !per_head ? f32_ptr(kvpk) : nullptr;
  float* vpk_all = packed && !per_head ? kpk_all + B * H * kpk_size : nullptr;
  auto pack_head = [&](int64_t bh, float* kpk, float* vpk) {
    const Mat km = slice(k, bh / H, bh % H), vm = slice(v, bh / H, bh % H);
    if (bf) {
      pack_rows_bf16(km.p, N, Dh, km.ld, reinterpret_cast<uint16_t*>(kpk), scale);
      pack_columns_bf16(vm.p, N, Dh, vm.ld, reinterpret_cast<uint16_t*>(vpk));
      return;
    }
    pack_weight(km.p, N, Dh, km.ld, kpk, scale);
    pack_columns(vm.p, N, Dh, vm.ld, vpk);
  };
  if (packed && !per_head) {
    parallel_tasks(B * H, [&](auto& queue) {
      for (int64_t bh; (bh = queue.next()) >= 0;) pack_head(bh, kpk_all + bh * kpk_size, vpk_all + bh * vpk_size);
    });
  }

  const int64_t lds = score_row_stride(N);
  // Query block qb of (batch, head) bh; kpk / vpk: that head's packed K and V (packed route).
  // q16 / p16: bf16 rows of the query block and of its probabilities (bf16 products only).
  auto query_block = [&](int64_t bh, int64_t qb, const float* kpk, const float* vpk, float* s_buf, float* acc,
                         float* m, float* l, uint16_t* q16, uint16_t* p16) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t i0 = qb * bm, rows = std::min(bm, N - i0);
    Prior prior{expanded_p ? expanded_p + h * esize : nullptr, gh, gw, num_prefix};
    Mat qm = slice(q, b, h), km = slice(k, b, h), vm = slice(v, b, h);
    qm.p += i0 * qm.ld;
    const uint16_t* k16 = reinterpret_cast<const uint16_t*>(kpk);
    const uint16_t* v16 = reinterpret_cast<const uint16_t*>(vpk);
    if (bf) rows_to_bf16(qm.p, rows, Dh, qm.ld, q16, dhp);
    std::fill(m, m + bm, -std::numeric_limits<float>::infinity());
    std::fill(l, l + bm, 0.f);
    std::fill(acc, acc + bm * Dh, 0.f);
    for (int64_t j0 = 0; j0 < N; j0 += kBlockN) {
      const int64_t cols = std::min(kBlockN, N - j0);
      if (bf) {
        gemm_packed_bf16_nt(rows, cols, dhp, q16, dhp, k16 + j0 * dhp, s_buf, lds, false);
      } else if (packed) {
        gemm_packed_nt(rows, cols, Dh, qm.p, qm.ld, kpk + j0 * Dh, s_buf, lds, false);
      } else {
        // The logit scale rides on the GEMM's alpha: no separate pass.
        gemm_abt(rows, cols, Dh, qm, {km.p + j0 * km.ld, km.ld}, s_buf, lds, scale);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* s = s_buf + r * lds;
        prior.apply_row(s, i0 + r, j0, j0 + cols, 1.f);
        const float mb = simd::row_max(s, cols);
        const float m_new = std::max(m[r], mb);
        // Rows whose logits are all -inf keep m = -inf; use 0 as the shift so exp gives 0, not NaN.
        const float shift = std::isinf(m_new) && m_new < 0 ? 0.f : m_new;
        const float alpha = std::exp(m[r] - shift);
        // (bf16 products: the probabilities go straight to the PV product's bf16 rows)
        const float rowsum = bf ? exp_sub_sum_bf16(s, cols, shift, p16 + r * (cols + cols % 2), cols + cols % 2)
                                : simd::exp_sub_sum(s, cols, shift);
        l[r] = l[r] * alpha + rowsum;
        m[r] = m_new;
        if (alpha != 1.f) {
          float* a = acc + r * Dh;
          for (int64_t t = 0; t < Dh; ++t) a[t] *= alpha;
        }
      }
      if (bf) {
        const int64_t cp = cols + cols % 2;  // (an odd count only in the last key block: its pad key is zero)
        gemm_packed_bf16_nt(rows, Dh, cp, p16, cp, v16 + j0 * kGemmNR, acc, Dh, true, kGemmNR * np2);
      } else if (packed) {
        gemm_packed_nt(rows, Dh, cols, s_buf, lds, vpk + j0 * kGemmNR, acc, Dh, true, kGemmNR * N);
      } else {
        gemm_ab(rows, cols, Dh, s_buf, lds, {vm.p + j0 * vm.ld, vm.ld}, 1.f, acc, Dh);
      }
    }
    if (to16) {  // the same products a[t] * (1 / l), rounded to bf16 as proj's A rows
      scale_rows_to_bf16(acc, rows, Dh, l, out16_into + (b * N + i0) * ld16 + h * Dh, ld16);
    } else {
      float* o = out_p + ((b * N + i0) * H + h) * Dh;  // token-major rows, stride H * Dh
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.f / l[r];
        const float* a = acc + r * Dh;
        for (int64_t t = 0; t < Dh; ++t) o[r * H * Dh + t] = a[t] * inv;
      }
    }
    if (lse_p != nullptr) {
      float* ls = lse_p + (b * H + h) * N + i0;
      for (int64_t r = 0; r < rows; ++r) ls[r] = m[r] + std::log(l[r]);
    }
  };

  const int64_t n_tasks = per_head ? B * H : B * H * n_qblk;
  parallel_tasks(n_tasks, [&](auto& queue) {
    Scratch s_buf = scratch(bm * lds), kv_buf = scratch(per_head ? kpk_size + vpk_size : 0);
    // The running output, max and sum, and the bf16 rows of Q and P, in one pooled buffer (five
    // vectors per call were five mallocs and frees on every thread; each is written before read).
    const int64_t q16_n = bf ? bm * dhp : 0, p16_n = bf ? bm * (std::min(kBlockN, N) + 1) : 0;
    Scratch work = scratch(bm * Dh + 2 * bm + (q16_n + 1) / 2 + (p16_n + 1) / 2);
    float* acc = work.get();
    float* m = acc + bm * Dh;
    float* l = m + bm;
    uint16_t* q16 = reinterpret_cast<uint16_t*>(l + bm);
    uint16_t* p16 = q16 + (q16_n + 1) / 2 * 2;
    for (int64_t task; (task = queue.next()) >= 0;) {
      if (per_head) {
        pack_head(task, kv_buf.get(), kv_buf.get() + kpk_size);
        for (int64_t qb = 0; qb < n_qblk; ++qb) {
          query_block(task, qb, kv_buf.get(), kv_buf.get() + kpk_size, s_buf.get(), acc, m, l, q16, p16);
        }
      } else {
        const int64_t qb = task % n_qblk, bh = task / n_qblk;
        query_block(bh, qb, packed ? kpk_all + bh * kpk_size : nullptr, packed ? vpk_all + bh * vpk_size : nullptr,
                    s_buf.get(), acc, m, l, q16, p16);
      }
    }
  });
  return {to(out, q_in.scalar_type()), lse};
}

std::vector<Tensor> sp_attention_backward_cpu(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                              const Tensor& v_in, const OptTensor& omega_in, const Tensor& out_in,
                                              const Tensor& lse_in, int64_t gh, int64_t gw, int64_t num_prefix,
                                              double scale_d) {
  check_inputs(q_in, k_in, v_in, omega_in, gh, gw, num_prefix);
  VK_CHECK(sizes_of(dout_in) == sizes_of(q_in) && sizes_of(out_in) == sizes_of(q_in),
           "dout and out must match q's shape");
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), Dh = q_in.size(3);
  check_shape(lse_in, "lse", {B, H, N});
  const Tensor q = as_fp32_rows(q_in), k = as_fp32_rows(k_in), v = as_fp32_rows(v_in);
  const Tensor dout = as_fp32_rows(dout_in), out = as_fp32_rows(out_in);
  const Tensor lse = f32c(lse_in);
  const bool has_prior = omega_in.has_value();
  const Tensor omega = opt_f32(omega_in);
  const Tensor expanded = has_prior ? Prior::expand(omega, gh, gw) : Tensor();
  const float* expanded_p = f32_ptr_or_null(expanded);
  const int64_t esize = Prior::expanded_size(gh, gw);
  const float scale = static_cast<float>(scale_d);
  const int64_t tsize = (2 * gh - 1) * (2 * gw - 1);

  Tensor dq = empty({B, H, N, Dh}), dk = empty({B, H, N, Dh}), dv = empty({B, H, N, Dh});
  Tensor dtab_partial = has_prior ? zeros({B, H, tsize}) : Tensor();
  float* dtab_p = f32_ptr_or_null(dtab_partial);
  const float* lse_base = f32_ptr(lse);
  float *dq_base = f32_ptr(dq), *dk_base = f32_ptr(dk), *dv_base = f32_ptr(dv);

  // Packed GEMM route (gemm.h): per (batch, head), K (times the scale) and V are packed as
  // "weights" for P = scale Q . K^T and dP = dO . V^T, and K by columns for dQ += dS . K; per
  // query block, dO and Q by columns for dV += P^T . dO and dK += dS^T . Q, which read P and dS
  // transposed in place (gemm_packed_tn). Query blocks as in the forward (197: 54, 54, 54, 35).
  // Elsewhere the five products are sgemm calls on the same blocks.
  const bool packed = packed_gemm_active();
  const int64_t bm = query_block_rows(N), lds = score_row_stride(N);  // the forward's tile geometry
  const int64_t kw_size = packed_weight_numel(N, Dh), kc_size = packed_weight_numel(Dh, N);
  const int64_t blk_size = packed_weight_numel(Dh, bm);

  parallel_tasks(B * H, [&](auto& queue) {
    Scratch p_buf = scratch(bm * lds), dp_buf = scratch(bm * lds), logit_buf = scratch(kBlockN);
    // Packed operands: K (scaled) and V as weights, K by columns; dO and Q blocks by columns.
    Scratch pk_buf = scratch(packed ? 2 * kw_size + kc_size + 2 * blk_size : 0);
    float* kw = pk_buf.get();
    float* vw = kw + kw_size;
    float* kcol = vw + kw_size;
    float* docol = kcol + kc_size;
    float* qcol = docol + blk_size;
    std::vector<float> delta(N);
    std::vector<float> dexp(has_prior ? esize : 0);  // this task's expanded d-omega
    for (int64_t bh; (bh = queue.next()) >= 0;) {
      const int64_t b = bh / H, h = bh % H;
      Prior prior{has_prior ? expanded_p + h * esize : nullptr, gh, gw, num_prefix};
      float* dtab = has_prior ? dtab_p + bh * tsize : nullptr;
      std::fill(dexp.begin(), dexp.end(), 0.f);
      const Mat qm = slice(q, b, h), km = slice(k, b, h), vm = slice(v, b, h);
      const Mat dom = slice(dout, b, h), om = slice(out, b, h);
      const float* lse_p = lse_base + bh * N;
      float* dq_p = dq_base + bh * N * Dh;
      float* dk_p = dk_base + bh * N * Dh;
      float* dv_p = dv_base + bh * N * Dh;
      std::fill(dk_p, dk_p + N * Dh, 0.f);
      std::fill(dv_p, dv_p + N * Dh, 0.f);
      if (packed) {
        pack_weight(km.p, N, Dh, km.ld, kw, scale);
        pack_weight(vm.p, N, Dh, vm.ld, vw);
        pack_columns(km.p, N, Dh, km.ld, kcol);
      }
      // delta_i = rowsum(dO_i * O_i), the softmax backward's correction term.
      for (int64_t i = 0; i < N; ++i) {
        const float* a = dom.p + i * dom.ld;
        const float* c = om.p + i * om.ld;
        float d = 0.f;
        for (int64_t t = 0; t < Dh; ++t) d += a[t] * c[t];
        delta[i] = d;
      }
      for (int64_t i0 = 0; i0 < N; i0 += bm) {
        const int64_t rows = std::min(bm, N - i0);
        const Mat qb{qm.p + i0 * qm.ld, qm.ld}, dob{dom.p + i0 * dom.ld, dom.ld};
        float* dq_blk = dq_p + i0 * Dh;
        std::fill(dq_blk, dq_blk + rows * Dh, 0.f);
        if (packed) {
          pack_columns(dob.p, rows, Dh, dob.ld, docol);
          pack_columns(qb.p, rows, Dh, qb.ld, qcol);
        }
        for (int64_t j0 = 0; j0 < N; j0 += kBlockN) {
          const int64_t cols = std::min(kBlockN, N - j0);
          const Mat kb{km.p + j0 * km.ld, km.ld}, vb{vm.p + j0 * vm.ld, vm.ld};
          if (packed) {
            gemm_packed_nt(rows, cols, Dh, qb.p, qb.ld, kw + j0 * Dh, p_buf.get(), lds, false);     // scale * q.k
            gemm_packed_nt(rows, cols, Dh, dob.p, dob.ld, vw + j0 * Dh, dp_buf.get(), lds, false);  // dP = dO . V^T
          } else {
            gemm_abt(rows, cols, Dh, qb, kb, p_buf.get(), lds, scale);
            gemm_abt(rows, cols, Dh, dob, vb, dp_buf.get(), lds);
          }
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = i0 + r;
            float* p = p_buf.get() + r * lds;
            float* ds = dp_buf.get() + r * lds;
            prior.apply_row(p, i, j0, j0 + cols, 1.f, has_prior ? logit_buf.get() : nullptr);
            const float li = lse_p[i], di = delta[i];
            simd::exp_sub_sum(p, cols, li);
            // dS = P * (dP - delta): gradient of the post-prior logit.
            for (int64_t t = 0; t < cols; ++t) ds[t] = p[t] * (ds[t] - di);
            if (has_prior) prior.accumulate_row(dexp.data(), ds, logit_buf.get(), i, j0, j0 + cols);
            // Chain through the prior and the scale: d(q.k) = dS * scale * factor.
            prior.apply_row(ds, i, j0, j0 + cols, scale);
          }
          if (packed) {
            gemm_packed_tn(cols, Dh, rows, p_buf.get(), lds, docol, dv_p + j0 * Dh, Dh, true);   // dV += P^T dO
            gemm_packed_nt(rows, Dh, cols, dp_buf.get(), lds, kcol + j0 * kGemmNR, dq_blk, Dh, true,
                           kGemmNR * N);                                                          // dQ += dS . K
            gemm_packed_tn(cols, Dh, rows, dp_buf.get(), lds, qcol, dk_p + j0 * Dh, Dh, true);  // dK += dS^T Q
          } else {
            gemm_atb(rows, cols, Dh, p_buf.get(), lds, dob, dv_p + j0 * Dh, Dh);  // dV += P^T dO
            gemm_ab(rows, cols, Dh, dp_buf.get(), lds, kb, 1.f, dq_blk, Dh);      // dQ += dQK . K
            gemm_atb(rows, cols, Dh, dp_buf.get(), lds, qb, dk_p + j0 * Dh, Dh);  // dK += dQK^T . Q
          }
        }
      }
      if (has_prior) Prior::fold(dexp.data(), dtab, gh, gw);
    }
  });

  Tensor domega;
  if (has_prior) {
    // Fixed-order reduction over the batch: deterministic.
    domega = to(view_of(sum0(dtab_partial), {H, 2 * gh - 1, 2 * gw - 1}), omega_in->scalar_type());
  }
  const auto dt = q_in.scalar_type();
  return {to(dq, dt), to(dk, dt), to(dv, dt), domega};
}

}  // namespace vitkern
