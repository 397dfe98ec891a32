"""Whole models on backend="cpu": match the reference model in inference and in a
training step; the custom ops pass torch.library.opcheck; torch.compile traces
the model with fullgraph=True (no graph break)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close_rel, randn

import vitkern
from vitkern._ext import extension_error, load_extension

pytestmark = pytest.mark.skipif(load_extension() is None, reason=f"_C not built: {extension_error()}")

CFG = dict(img_size=(48, 80), patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=7)


def _models():
    torch.manual_seed(0)
    plain = vitkern.ViT(reg_tokens=1, **CFG)
    sp = vitkern.ViT(spatial_prior=True, sp_layers=2, **CFG)
    for m in (plain, sp):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return {"vit": plain, "sp_vit": sp}


@pytest.mark.parametrize("name", ["vit", "sp_vit"])
def test_inference_and_training_step_match_reference(name, gen):
    model = _models()[name]
    x = randn(3, 3, 48, 80, gen=gen)
    ref_model = copy.deepcopy(model)
    # Inference.
    model.eval(), ref_model.eval()
    with torch.no_grad(), vitkern.use_backend("cpu"):
        out = model(x)
    report = vitkern.backend_report()
    assert {report[op].backend for op in ("patch_embed", "sp_attention", "layernorm_mlp")} == {"cpu"}
    with torch.no_grad(), vitkern.use_backend("reference"):
        ref = ref_model(x)
    assert_close_rel(out, ref, 1e-5, "logits")
    # One SGD step, then compare every parameter (Omega relation MLPs included).
    model.train(), ref_model.train()
    for m, backend in ((model, "cpu"), (ref_model, "reference")):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        with vitkern.use_backend(backend):
            loss = m(x).logsumexp(-1).mean()
        loss.backward()
        opt.step()
    ref_params = dict(ref_model.named_parameters())
    for pname, p in model.named_parameters():
        assert_close_rel(p.grad, ref_params[pname].grad, 1e-5, f"grad {pname}")
        assert_close_rel(p, ref_params[pname], 1e-5, f"param {pname}")


def test_custom_ops_pass_opcheck(gen):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration."""
    from vitkern.ops.layernorm_mlp import _layernorm_mlp_op
    from vitkern.ops.patch_embed import _patch_embed_op
    from vitkern.ops.sp_attention import _sp_attention_op
    from vitkern.ops.spatial_prior import _spatial_prior_op

    q, k, v = (randn(2, 2, 1 + 6, 16, gen=gen).requires_grad_() for _ in range(3))
    omega = randn(2, 3, 5, gen=gen).requires_grad_()
    torch.library.opcheck(_sp_attention_op, (q, k, v, omega, 2, 3, 1, 0.25, "cpu"))
    torch.library.opcheck(_sp_attention_op, (q, k, v, None, 1, 1, 0, 0.25, "cpu"))
    torch.library.opcheck(_spatial_prior_op, (omega, 2, 3, 1, "cpu"))
    img, w = randn(2, 3, 8, 12, gen=gen).requires_grad_(), randn(16, 3, 4, 4, gen=gen).requires_grad_()
    b, pos = randn(16, gen=gen).requires_grad_(), randn(6, 16, gen=gen).requires_grad_()
    torch.library.opcheck(_patch_embed_op, (img, w, b, pos, "cpu"))
    x = randn(10, 16, gen=gen).requires_grad_()
    params = [randn(*s, gen=gen).requires_grad_() for s in ((16,), (16,), (32, 16), (32,), (16, 32), (16,))]
    plain = (*params[:4], None, None, *params[4:])  # the plain MLP: no second fc1 weight, glu 0
    torch.library.opcheck(_layernorm_mlp_op, (x, *plain, 1e-6, 1, False, 0, True, True, "cpu"))
    # RMSNorm (no LN bias) with SiLU, no residual
    rms_params = [params[0], None, *plain[2:]]
    torch.library.opcheck(_layernorm_mlp_op, (x, *rms_params, 1e-5, 4, True, 0, False, True, "cpu"))
    # the gated MLP: packed fc1 with the gate last (glu 2), split fc1 (gate first, glu 1)

    w2 = randn(16, 24, gen=gen).requires_grad_()
    packed = (x, *params[:2], randn(48, 16, gen=gen).requires_grad_(), randn(48, gen=gen).requires_grad_())
    torch.library.opcheck(_layernorm_mlp_op, (*packed, None, None, w2, params[5], 1e-6, 1, False, 2, True, True, "cpu"))
    # split fc1, RMSNorm (weight only), SiLU, no residual
    gate, value = (randn(24, 16, gen=gen).requires_grad_() for _ in range(2))
    split = (x, params[0], None, gate, None, value, randn(24, gen=gen).requires_grad_(), w2, None, 1e-5, 4, True)
    torch.library.opcheck(_layernorm_mlp_op, (*split, 1, False, True, "cpu"))


@pytest.mark.slow
def test_torch_compile_fullgraph_inference_and_training(gen):
    torch._dynamo.reset()
    model = _models()["sp_vit"]
    x = randn(2, 3, 48, 80, gen=gen)
    model.eval()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert_close_rel(compiled, eager, 1e-5, "compiled logits")
    model.train()
    cmodel = torch.compile(model, fullgraph=True)
    cmodel(x).logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert_close_rel(grads[n], p.grad, 1e-4, f"compiled grad {n}")
