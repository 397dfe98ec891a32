// Fused patch embedding on the CPU (docs/DESIGN.md §1.1):
//
//   out[b, n, :] = W . patch(b, n) + bias (+ pos_embed[n])
//
// Work is split into chunks of patch rows. A chunk gathers its patches straight
// from the image into a small L2-resident tile (chunk x C*P*P; never the whole
// im2col matrix), its output rows are pre-filled with bias + pos_embed, and one
// GEMM accumulates W . patches on top (beta = 1), so bias and position
// embedding cost no extra pass over the output.
// Backward: d images is the same tiling in reverse (d tile = d out . W,
// scattered back to the patch's pixels; patches do not overlap, so chunks write
// disjoint pixels); d W accumulates chunk by chunk in a fixed order
// (deterministic), the GEMM threaded by BLAS; d bias and d pos_embed are sums.
#include <algorithm>
#include <vector>

#include "blas.h"
#include "checks.h"
#include "gemm.h"
#include "patch_embed.h"

namespace vitkern {
namespace {

struct Geometry {
  int64_t B, C, P, gh, gw, N, K, D;
  int64_t img_h, img_w;
};

Geometry geometry(const Tensor& images, const Tensor& weight) {
  VK_CHECK_CPU(images);
  VK_CHECK_FLOATING(images);
  VK_CHECK(images.dim() == 4, "images must have shape (batch, channels, height, width), got ", shape_str(images));
  VK_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3),
           "weight must have shape (embed_dim, channels, P, P), got ", shape_str(weight));
  Geometry g{};
  g.B = images.size(0);
  g.C = images.size(1);
  g.D = weight.size(0);
  g.P = weight.size(2);
  VK_CHECK(weight.size(1) == g.C, "images has ", g.C, " channels but weight expects ", weight.size(1));
  g.img_h = images.size(2);
  g.img_w = images.size(3);
  VK_CHECK(g.img_h % g.P == 0 && g.img_w % g.P == 0, "image size (", g.img_h, ", ", g.img_w,
           ") is not divisible by the patch size ", g.P);
  g.gh = g.img_h / g.P;
  g.gw = g.img_w / g.P;
  g.N = g.gh * g.gw;
  g.K = g.C * g.P * g.P;
  return g;
}

// Rows per chunk: equal chunks, a multiple of the thread count, each at most 1024 rows. Smaller
// chunks re-pack W per chunk on the BLAS route and run the GEMM below its speed (measured:
// 256-row chunks cost 1.76x the plain GEMM).
int64_t chunk_rows(int64_t rows) { return even_tile_rows(rows, 1024); }

// Copies patch rows [r0, r0 + rows) (row = b * N + n) into tile (rows x K), (c, py, px) order.
void gather(const Geometry& g, const float* img, int64_t r0, int64_t rows, float* tile) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = (r0 + r) / g.N, n = (r0 + r) % g.N, gy = n / g.gw, gx = n % g.gw;
    float* dst = tile + r * g.K;
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t py = 0; py < g.P; ++py) {
        const float* src = img + ((b * g.C + c) * g.img_h + gy * g.P + py) * g.img_w + gx * g.P;
        std::copy(src, src + g.P, dst + (c * g.P + py) * g.P);
      }
  }
}

void scatter(const Geometry& g, const float* tile, int64_t r0, int64_t rows, float* img) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = (r0 + r) / g.N, n = (r0 + r) % g.N, gy = n / g.gw, gx = n % g.gw;
    const float* src = tile + r * g.K;
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t py = 0; py < g.P; ++py) {
        float* dst = img + ((b * g.C + c) * g.img_h + gy * g.P + py) * g.img_w + gx * g.P;
        std::copy(src + (c * g.P + py) * g.P, src + (c * g.P + py + 1) * g.P, dst);
      }
  }
}

}  // namespace

Tensor patch_embed_forward_cpu(const Tensor& images_in, const Tensor& weight_in, const OptTensor& bias_in,
                               const OptTensor& pos_in, const OptTensor& weight_packed) {
  const Geometry g = geometry(images_in, weight_in);
  const Tensor img = f32c(images_in);
  const GemmWeight w = gemm_weight(weight_in, weight_packed, "weight_packed", g.D, g.K);
  const Tensor bias = opt_f32(bias_in);
  const Tensor pos = pos_in.has_value() ? view_of(f32c(*pos_in), {g.N, g.D}) : Tensor();
  if (bias.defined()) check_shape(bias, "bias", {g.D});
  Tensor out = empty({g.B, g.N, g.D});
  const float* ip = f32_ptr(img);
  const float* bp = f32_ptr_or_null(bias);
  const float* pp = f32_ptr_or_null(pos);
  float* op = f32_ptr(out);
  // BLAS repacks the weight per call: one chunk per thread; the packed route takes smaller tasks.
  const int64_t total = g.B * g.N, chunk = w.prepacked() ? packed_tile_rows(total) : chunk_rows(total);
  const int64_t chunks = (total + chunk - 1) / chunk;
  parallel_tasks(chunks, [&](auto& queue) {
    Scratch tile = scratch(chunk * g.K);
    for (int64_t ch; (ch = queue.next()) >= 0;) {
      const int64_t r0 = ch * chunk, rows = std::min(chunk, total - r0);
      gather(g, ip, r0, rows, tile.get());
      float* o = op + r0 * g.D;
      for (int64_t r = 0; r < rows; ++r) {  // epilogue terms first: bias + pos_embed
        const float* pr = pp ? pp + ((r0 + r) % g.N) * g.D : nullptr;
        for (int64_t t = 0; t < g.D; ++t) o[r * g.D + t] = (bp ? bp[t] : 0.f) + (pr ? pr[t] : 0.f);
      }
      gemm_nt(rows, g.D, g.K, tile.get(), g.K, w, o, g.D, true);
    }
  });
  return to(out, images_in.scalar_type());
}

std::vector<Tensor> patch_embed_backward_cpu(const Tensor& dout_in, const Tensor& images_in, const Tensor& weight_in,
                                             bool need_images, bool need_weight) {
  const Geometry g = geometry(images_in, weight_in);
  check_shape(dout_in, "dout", {g.B, g.N, g.D});
  const Tensor dout = f32c(dout_in);
  const float* dp = f32_ptr(dout);
  const int64_t total = g.B * g.N, chunk = chunk_rows(total), chunks = (total + chunk - 1) / chunk;
  Tensor dimg, dw;
  if (need_images) {
    const Tensor w = view_of(f32c(weight_in), {g.D, g.K});
    const float* wp = f32_ptr(w);
    dimg = empty({g.B, g.C, g.img_h, g.img_w});
    float* dip = f32_ptr(dimg);
    parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      Scratch tile = scratch(chunk * g.K);
      for (int64_t ch = begin; ch < end; ++ch) {
        const int64_t r0 = ch * chunk, rows = std::min(chunk, total - r0);
        // d tile (rows x K) = d out (rows x D) . W (D x K)
        sgemm(false, false, g.K, rows, g.D, 1.f, wp, g.K, dp + r0 * g.D, g.D, 0.f, tile.get(), g.K);
        scatter(g, tile.get(), r0, rows, dip);
      }
    });
    dimg = to(dimg, images_in.scalar_type());
  }
  if (need_weight) {
    const Tensor img = f32c(images_in);
    const float* ip = f32_ptr(img);
    dw = zeros({g.D, g.K});
    float* dwp = f32_ptr(dw);
    const int64_t wchunk = 512;  // fixed, thread-independent order: deterministic
    Scratch tile = scratch(wchunk * g.K);
    for (int64_t r0 = 0; r0 < total; r0 += wchunk) {
      const int64_t rows = std::min(wchunk, total - r0);
      gather(g, ip, r0, rows, tile.get());
      // d W (D x K) += d out^T (D x rows) . tile (rows x K)
      sgemm(false, true, g.K, g.D, rows, 1.f, tile.get(), g.K, dp + r0 * g.D, g.D, 1.f, dwp, g.K);
    }
    dw = to(view_of(dw, {g.D, g.C, g.P, g.P}), weight_in.scalar_type());
  }
  return {dimg, dw};
}

}  // namespace vitkern
