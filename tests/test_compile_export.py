"""torch.compile(fullgraph=True) and torch.export.export of vitkern.ViT and SP-ViT on
every backend this process can run, inference and training, with no graph break.
(The Triton backend: tests/kernels/test_kernel_models.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close_rel, randn

import vitkern

BACKENDS = [b for b in ("reference", "cpu") if vitkern.available_backends()[b] is None]
CFG = dict(img_size=(32, 48), patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = vitkern.ViT(spatial_prior=True, sp_layers=2, **CFG) if kind == "sp_vit" else vitkern.ViT(reg_tokens=1, **CFG)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _grads(model, fn, x):
    model.zero_grad()
    fn(x).logsumexp(-1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["vit", "sp_vit"])
def test_compile_fullgraph_inference_and_training(kind, backend, gen):
    torch._dynamo.reset()
    model = _model(kind)
    x = randn(2, 3, 32, 48, gen=gen)
    with vitkern.use_backend(backend):
        model.eval()
        with torch.no_grad():
            eager = model(x)
            # aot_eager: dynamo capture + AOTAutograd with the fake kernels, no C++ codegen
            # (the inductor path is test_cpu_model.py's slow test).
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        assert_close_rel(compiled, eager, 1e-6, "compiled logits")
        model.train()
        cmodel = torch.compile(model, fullgraph=True, backend="aot_eager")
        g_compiled = _grads(model, cmodel, x)
        g_eager = _grads(model, model, x)
    for n, g in g_eager.items():
        assert_close_rel(g_compiled[n], g, 1e-5, f"compiled grad {n}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["vit", "sp_vit"])
def test_torch_export_inference_and_training(kind, backend, gen):
    model = _model(kind)
    x = randn(2, 3, 32, 48, gen=gen)
    with vitkern.use_backend(backend):
        model.eval()
        ep = torch.export.export(model, (x,))
        calls = [n for n in ep.graph.nodes if n.op == "call_function"]
        ops = {str(n.target) for n in calls}
        if backend == "cpu":  # the fused kernels are in the graph as custom ops, the backend their last argument
            assert any(str(n.target) == "vitkern.sp_attention.default" and n.args[-1] == "cpu" for n in calls), ops
            assert any(str(n.target) == "vitkern.layernorm_mlp.default" and n.args[-1] == "cpu" for n in calls), ops
        x2 = randn(2, 3, 32, 48, gen=gen)
        with torch.no_grad():
            assert_close_rel(ep.module()(x2), model(x2), 1e-6, "exported logits")
        # Training: export in train mode, then backward through the exported module.
        model.train()
        ep_train = torch.export.export(copy.deepcopy(model), (x,))
        emod = ep_train.module()  # keeps the train-mode graph it was exported with
        emod.zero_grad()
        emod(x2).logsumexp(-1).sum().backward()
        g_export = {n: p.grad.clone() for n, p in emod.named_parameters()}
        g_eager = _grads(model, model, x2)
    assert g_export.keys() == g_eager.keys()
    for n, g in g_eager.items():
        assert_close_rel(g_export[n], g, 1e-5, f"exported grad {n}")
