"""Whole models on the Triton backend: a ViT and an SP-ViT forward and backward against
the same model in float64 on the reference backend, then traced by torch.compile
(fullgraph) and torch.export; and the Triton custom ops' schema, fake kernels and
autograd registration (torch.library.opcheck)."""

from __future__ import annotations

import copy

import pytest
import torch

import vitkern
from vitkern import testing


@pytest.mark.parametrize("name", ["vit", "sp_vit"])
def test_whole_model_matches_reference(name, backend, device, seed, poison_empty):
    cfg = dict(img_size=(48, 80), patch_size=16, embed_dim=64, depth=3, num_heads=2, num_classes=5)
    torch.manual_seed(seed)
    if name == "vit":
        model = vitkern.ViT(reg_tokens=1, **cfg)
    else:
        model = vitkern.ViT(spatial_prior=True, sp_layers=2, **cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref_model = copy.deepcopy(model).double().to(device)
    model = model.to(device)
    x = torch.randn(2, 3, 48, 80, device=device)
    dout = torch.randn(2, 5, device=device)
    err, tol = testing.rel_err, testing.tolerance(torch.float32, device)

    with vitkern.use_backend(backend):
        out = model(x)
    used = {op: vitkern.backend_report()[op].backend for op in ("patch_embed", "sp_attention", "layernorm_mlp")}
    assert set(used.values()) == {backend}, used
    with vitkern.use_backend("reference"):
        ref = ref_model(x.double())
    out.backward(dout)
    ref.backward(dout.double())
    ref_params = dict(ref_model.named_parameters())
    grad_errs = {n: err(p.grad, ref_params[n].grad) for n, p in model.named_parameters()}
    assert err(out, ref) < tol
    worst = max(grad_errs, key=grad_errs.get)
    assert grad_errs[worst] < tol, (worst, grad_errs[worst])

    # torch.compile(fullgraph=True) traces the model on this backend: no graph break
    # (aot_eager: the graph capture and the fake kernels, without C++ code generation).
    torch._dynamo.reset()
    model.zero_grad()
    with vitkern.use_backend(backend):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        cout = compiled(x)
        cout.backward(dout)
    assert err(cout, ref) < tol
    assert max(err(p.grad, ref_params[n].grad) for n, p in model.named_parameters()) < tol

    # torch.export: the Triton custom ops appear in the exported graph; forward + backward.
    with vitkern.use_backend(backend):
        ep = torch.export.export(model, (x,))
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    exported_ops = sorted({str(n.target) for n in calls if "vitkern" in str(n.target)})
    # One custom op per computation, the backend its last argument.
    for op in ("sp_attention", "patch_embed", "layernorm_mlp"):
        assert any(str(n.target) == f"vitkern.{op}.default" and n.args[-1] == "triton" for n in calls), exported_ops
    emod = ep.module()
    model.zero_grad()  # the exported module shares the model's parameter tensors
    emod.zero_grad()
    eout = emod(x)
    eout.backward(dout)
    assert err(eout, ref) < tol
    assert max(err(p.grad, ref_params[n].grad) for n, p in emod.named_parameters()) < tol


def test_triton_custom_ops_pass_opcheck(device, seed):
    from vitkern.ops.layernorm_mlp import _layernorm_mlp_op
    from vitkern.ops.patch_embed import _patch_embed_op

    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).to(device).requires_grad_()

    img, w, b, pos = r(2, 3, 8, 12), r(16, 3, 4, 4), r(16), r(6, 16)
    torch.library.opcheck(_patch_embed_op, (img, w, b, pos, "triton"))
    xs = r(10, 16)
    params = [r(*s) for s in ((16,), (16,), (32, 16), (32,), (16, 32), (16,))]
    plain = (*params[:4], None, None, *params[4:])  # the plain MLP: no second fc1 weight, glu 0
    torch.library.opcheck(_layernorm_mlp_op, (xs, *plain, 1e-6, 1, False, 0, True, True, "triton"))
    # RMSNorm (no LN bias) with QuickGELU, no residual
    torch.library.opcheck(_layernorm_mlp_op, (xs, params[0], None, *plain[2:], 1e-5, 3, True, 0, False, True, "triton"))
    # The gated MLP: packed fc1 (gate last, glu 2) and split fc1 (gate first, glu 1; SiLU, RMSNorm).

    x, lw, lb, w2, b2 = r(10, 16), r(16), r(16), r(16, 24), r(16)
    packed = (x, lw, lb, r(48, 16), r(48), None, None, w2, b2, 1e-6, 1, False, 2, True, True, "triton")
    split = (x, lw, None, r(24, 16), None, r(24, 16), r(24), w2, None, 1e-5, 4, True, 1, False, True, "triton")
    torch.library.opcheck(_layernorm_mlp_op, packed)
    torch.library.opcheck(_layernorm_mlp_op, split)
