// Python bindings of vitkern._C. Every entry point validates its inputs with
// TORCH_CHECK (RuntimeError in Python); the Python launchers validate first.
#include <torch/extension.h>

#include "blas.h"
#include "checks.h"
#include "layernorm_mlp.h"
#include "patch_embed.h"
#include "simd.h"
#include "sp_attention.h"
#include "spatial_prior.h"

namespace {

at::Tensor spatial_prior_forward(const at::Tensor& omega, int64_t gh, int64_t gw, int64_t num_prefix) {
  TORCH_CHECK(omega.device().is_cpu(), "vitkern._C has CPU kernels only; omega is on ", omega.device());
  return vitkern::spatial_prior_forward_cpu(omega, gh, gw, num_prefix);
}

at::Tensor spatial_prior_backward(const at::Tensor& grad, int64_t gh, int64_t gw, int64_t num_prefix) {
  TORCH_CHECK(grad.device().is_cpu(), "vitkern._C has CPU kernels only; grad is on ", grad.device());
  return vitkern::spatial_prior_backward_cpu(grad, gh, gw, num_prefix);
}

void check_shape(const at::Tensor& x, const std::string& name, std::vector<int64_t> expected) {
  vitkern::check_shape(x, name.c_str(), std::move(expected));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vitkern compiled CPU kernels (C++)";
  m.def("simd_paths", &vitkern::simd::compiled_paths, "the x86 SIMD code paths compiled into this build");
  m.def("blas_backend", &vitkern::blas_backend, "how the CPU kernels reach BLAS");
  m.def("check_shape", &check_shape, "Raise RuntimeError unless x has the expected shape (-1 = any)",
        py::arg("x"), py::arg("name"), py::arg("expected"));
  m.def("sp_attention_forward", &vitkern::sp_attention_forward_cpu,
        "flash-style SP-SA forward on CPU tensors -> [out, lse]", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("omega"), py::arg("gh"), py::arg("gw"), py::arg("num_prefix"), py::arg("scale"));
  m.def("sp_attention_backward", &vitkern::sp_attention_backward_cpu,
        "SP-SA backward on CPU tensors -> [dq, dk, dv, domega or None]", py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("omega"), py::arg("out"), py::arg("lse"), py::arg("gh"), py::arg("gw"),
        py::arg("num_prefix"), py::arg("scale"));
  m.def("layernorm_mlp_forward", &vitkern::layernorm_mlp_forward_cpu,
        "fused LayerNorm+GELU-MLP forward on CPU -> [out, mean, rstd, pre, gelu_out, ln_out]", py::arg("x"), py::arg("ln_weight"),
        py::arg("ln_bias"), py::arg("fc1_weight"), py::arg("fc1_bias"), py::arg("fc2_weight"), py::arg("fc2_bias"),
        py::arg("eps"), py::arg("act"), py::arg("rms"), py::arg("residual"), py::arg("save_for_backward"));
  m.def("layernorm_mlp_backward", &vitkern::layernorm_mlp_backward_cpu,
        "LayerNorm+GELU-MLP backward on CPU -> [dx, dlnw, dlnb, dw1, db1, dw2, db2]", py::arg("dout"), py::arg("x"),
        py::arg("ln_weight"), py::arg("ln_bias"), py::arg("fc1_weight"), py::arg("fc2_weight"), py::arg("mean"),
        py::arg("rstd"), py::arg("pre"), py::arg("gelu_out"), py::arg("ln_out"), py::arg("act"), py::arg("rms"),
        py::arg("residual"));
  m.def("layernorm_glu_forward", &vitkern::layernorm_glu_forward_cpu,
        "fused LayerNorm + gated MLP forward on CPU -> [out, mean, rstd, pre, hidden, ln_out]", py::arg("x"),
        py::arg("ln_weight"), py::arg("ln_bias"), py::arg("w1a"), py::arg("b1a"), py::arg("w1b"), py::arg("b1b"),
        py::arg("fc2_weight"), py::arg("fc2_bias"), py::arg("eps"), py::arg("act"), py::arg("rms"), py::arg("gate_first"),
        py::arg("residual"), py::arg("save_for_backward"));
  m.def("layernorm_glu_backward", &vitkern::layernorm_glu_backward_cpu,
        "LayerNorm + gated MLP backward on CPU -> [dx, dlnw, dlnb, dw1a, db1a, dw1b, db1b, dw2, db2]",
        py::arg("dout"), py::arg("x"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("w1a"), py::arg("w1b"),
        py::arg("fc2_weight"), py::arg("mean"), py::arg("rstd"), py::arg("pre"), py::arg("hidden"), py::arg("ln_out"),
        py::arg("act"), py::arg("rms"), py::arg("gate_first"), py::arg("residual"));
  m.def("patch_embed_forward", &vitkern::patch_embed_forward_cpu,
        "fused patchify + projection + bias + pos_embed on CPU -> (B, N, D)", py::arg("images"), py::arg("weight"),
        py::arg("bias"), py::arg("pos_embed"));
  m.def("patch_embed_backward", &vitkern::patch_embed_backward_cpu, "patch embedding backward -> [d images, d weight]",
        py::arg("dout"), py::arg("images"), py::arg("weight"), py::arg("need_images"), py::arg("need_weight"));
  m.def("spatial_prior_forward", &spatial_prior_forward,
        "omega (H, 2gh-1, 2gw-1) -> dense prior (H, N, N), N = num_prefix + gh*gw", py::arg("omega"), py::arg("gh"),
        py::arg("gw"), py::arg("num_prefix"));
  m.def("spatial_prior_backward", &spatial_prior_backward,
        "grad (H, N, N) -> d omega (H, 2gh-1, 2gw-1), deterministic", py::arg("grad"), py::arg("gh"), py::arg("gw"),
        py::arg("num_prefix"));
}
