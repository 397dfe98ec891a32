// The operator library of vitkern._C: schemas in the `vitkern_C` namespace and their
// CPU kernels, registered through the LibTorch stable ABI when the library is loaded
// (module.cpp's `import vitkern._C` does that). Python calls them as
// torch.ops.vitkern_C.<name> (vitkern/_ext.py binds them for the launchers).
// The namespace is not `vitkern`: the Python custom ops (torch.library.custom_op)
// already live in vitkern::.
//
// Every kernel validates its inputs with VK_CHECK (RuntimeError in Python); the Python
// launchers validate first. The ops are registered for the CPU dispatch key only: a
// CUDA tensor gets the dispatcher's "could not run ... with arguments from the 'CUDA'
// backend" error.
#include <string>
#include <vector>

#include "block.h"
#include "checks.h"
#include "gemm.h"
#include "layernorm_mlp.h"
#include "patch_embed.h"
#include "sp_attention.h"
#include "spatial_prior.h"

namespace {

void check_shape_op(const vitkern::Tensor& x, std::string name, std::vector<int64_t> expected) {
  vitkern::check_shape(x, name.c_str(), expected);
}

}  // namespace

STABLE_TORCH_LIBRARY(vitkern_C, m) {
  // Raises RuntimeError unless x has the expected shape (-1 = any).
  m.def("check_shape(Tensor x, str name, int[] expected) -> ()");
  // flash-style SP-SA forward -> [out, lse]; backward -> [dq, dk, dv, domega or None]
  m.def(
      "sp_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? omega, int gh, int gw, int num_prefix, "
      "float scale) -> Tensor[]");
  m.def(
      "sp_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? omega, Tensor out, Tensor lse, "
      "int gh, int gw, int num_prefix, float scale) -> Tensor[]");
  // fused LayerNorm (rms: RMSNorm) + MLP, plain (glu 0) or gated (glu 1 / 2: gate first / last;
  // fc1 is w1a, or w1a = gate and w1b = value; layernorm_mlp.h); act: 1 GELU, 2 GELU tanh,
  // 3 QuickGELU, 4 SiLU (simd.h). forward -> [out, mean, rstd, pre, act_out, ln_out];
  // backward -> [dx, dlnw, dlnb, dw1a, db1a, dw1b, db1b, dw2, db2] (None where there is no such parameter)
  m.def(
      "layernorm_mlp_forward(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor w1a, Tensor? b1a, Tensor? w1b, "
      "Tensor? b1b, Tensor fc2_weight, Tensor? fc2_bias, float eps, int act, bool rms, int glu, "
      "bool residual, bool save_for_backward, Tensor? w1a_packed, Tensor? w1b_packed, Tensor? w2_packed) "
      "-> Tensor[]");
  // an (n, k) weight packed for the GEMMs' packed route (gemm.h) -> fp32 (ceil(n / 16) * 16 * k,)
  m.def("pack_gemm_weight(Tensor weight) -> Tensor");
  m.def("pack_gemm_weight_bf16(Tensor weight) -> Tensor");
  m.def("packed_matmul(Tensor a, Tensor b, bool trans_a) -> Tensor");
  // x (M, K) . weight (N, K)^T + bias on the packed route (gemm.h) -> (M, N); inference only
  m.def("linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? weight_packed) -> Tensor");
  // one pre-norm ViT block for eager inference: x + proj(attn(qkv(LN1(x)))), then + fc2(act(fc1(LN2(.))))
  m.def(
      "block_forward(Tensor x, Tensor? ln1_weight, Tensor? ln1_bias, float eps1, Tensor qkv_weight, "
      "Tensor? qkv_bias, Tensor? qkv_packed, Tensor proj_weight, Tensor? proj_bias, Tensor? proj_packed, "
      "Tensor? omega, int gh, int gw, int num_prefix, int heads, float scale, Tensor? ln2_weight, "
      "Tensor? ln2_bias, float eps2, Tensor fc1_weight, Tensor? fc1_bias, Tensor? fc1_packed, "
      "Tensor fc2_weight, Tensor? fc2_bias, Tensor? fc2_packed, int act) -> Tensor");
  m.def(
      "layernorm_mlp_backward(Tensor dout, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor w1a, Tensor? w1b, "
      "Tensor fc2_weight, Tensor mean, Tensor rstd, Tensor pre, Tensor act_out, Tensor ln_out, int act, bool rms, "
      "int glu, bool residual) -> Tensor[]");
  // fused patchify + projection + bias + pos_embed -> (B, N, D); backward -> [d images, d weight]
  m.def(
      "patch_embed_forward(Tensor images, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? weight_packed) "
      "-> Tensor");
  m.def(
      "patch_embed_backward(Tensor dout, Tensor images, Tensor weight, bool need_images, bool need_weight) "
      "-> Tensor[]");
  // omega (H, 2gh-1, 2gw-1) -> dense prior (H, N, N); backward: grad (H, N, N) -> d omega, deterministic
  m.def("spatial_prior_forward(Tensor omega, int gh, int gw, int num_prefix) -> Tensor");
  m.def("spatial_prior_backward(Tensor grad, int gh, int gw, int num_prefix) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(vitkern_C, CPU, m) {
  m.impl("check_shape", TORCH_BOX(&check_shape_op));
  m.impl("sp_attention_forward", TORCH_BOX(&vitkern::sp_attention_forward_cpu));
  m.impl("sp_attention_backward", TORCH_BOX(&vitkern::sp_attention_backward_cpu));
  m.impl("layernorm_mlp_forward", TORCH_BOX(&vitkern::layernorm_mlp_forward_cpu));
  m.impl("pack_gemm_weight", TORCH_BOX(&vitkern::pack_gemm_weight_cpu));
  m.impl("pack_gemm_weight_bf16", TORCH_BOX(&vitkern::pack_gemm_weight_bf16_cpu));
  m.impl("packed_matmul", TORCH_BOX(&vitkern::packed_matmul_cpu));
  m.impl("linear_forward", TORCH_BOX(&vitkern::linear_forward_cpu));
  m.impl("block_forward", TORCH_BOX(&vitkern::block_forward_cpu));
  m.impl("layernorm_mlp_backward", TORCH_BOX(&vitkern::layernorm_mlp_backward_cpu));
  m.impl("patch_embed_forward", TORCH_BOX(&vitkern::patch_embed_forward_cpu));
  m.impl("patch_embed_backward", TORCH_BOX(&vitkern::patch_embed_backward_cpu));
  m.impl("spatial_prior_forward", TORCH_BOX(&vitkern::spatial_prior_forward_cpu));
  m.impl("spatial_prior_backward", TORCH_BOX(&vitkern::spatial_prior_backward_cpu));
}
