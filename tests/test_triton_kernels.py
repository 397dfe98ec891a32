"""backend="triton" patch_embed and layernorm_mlp, and whole models on the Triton
backend, verified on the CPU by the Triton interpreter (in a subprocess that sets
TRITON_INTERPRET=1; see tests/test_triton_sp_attention.py). Every output and every
gradient against a float64 reference, outputs poisoned (torch.empty fills NaN);
bf16 only where CUDA exists (the interpreter computes bf16 on raw bits)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from conftest import run_under_triton_interpreter

from vitkern import testing

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="interpreter run tested on Linux")

PRELUDE = textwrap.dedent(
    """
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    import torch.utils.deterministic as det
    import vitkern
    from vitkern.ops import layernorm_mlp, patch_embed

    # Poison: every torch.empty (the kernels' outputs included) comes back full of NaN.
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    cases = json.loads(sys.argv[1])
    TOL = {"float32": 1e-5, "float16": 2e-3}

    def err(a, b):
        a, b = a.detach().double(), b.detach().double()
        if torch.isnan(a).any() or a.shape != b.shape:
            return float("inf")
        return ((a - b).norm() / b.norm()).item()

    def compare(fn, leaves, dtype, g, op):
        # fn(*tensors, backend=...) with every leaf differentiable; float64 reference.
        leaves = [t.to(dtype).requires_grad_() for t in leaves]
        out = fn(*leaves, backend="triton")
        assert vitkern.last_backend(op) == "triton"
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref = fn(*ref_leaves, backend="reference")
        dout = torch.randn(ref.shape, generator=g).to(dtype)
        grads = torch.autograd.grad(out, leaves, dout)
        ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
        return [err(out, ref)] + [err(a, b) for a, b in zip(grads, ref_grads)]
    """
)

OP_SCRIPT = PRELUDE + textwrap.dedent(
    """
    # TF32 set through torch's current API, after which the legacy allow_tf32 flag raises:
    # the fp32 GEMM launches must read the setting without raising (issue #13, defect 4).
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    results = []
    for case in cases:
        g = torch.Generator().manual_seed(2000 + len(results))
        dtype = getattr(torch, case["dtype"])
        if case["op"] == "patch_embed":
            B, C, P, (gh, gw), D, bias, pos, layout = case["shape"]
            img = torch.randn(B, C, gh * P, gw * P, generator=g)
            if layout == "channels_last":
                img = img.to(memory_format=torch.channels_last)
            leaves = [img, torch.randn(D, C, P, P, generator=g) * (C * P * P) ** -0.5]
            if bias:
                leaves.append(torch.randn(D, generator=g) * 0.1)
            if pos:
                leaves.append(torch.randn(1, gh * gw, D, generator=g) * 0.1)

            def fn(img, w, *rest, backend):
                b = rest[0] if bias else None
                p = rest[-1] if pos else None
                return patch_embed(img, w, b, p, backend=backend)

            names = ["out", "dimages", "dweight"] + (["dbias"] if bias else []) + (["dpos"] if pos else [])
        else:
            lead, D, Hd, affine, approx, residual, *rest = case["shape"]
            norm = rest[0] if rest else "layernorm"
            act = dict(approximate=approx) if approx in ("none", "tanh") else dict(activation=approx)
            x = torch.randn(*lead, D, generator=g) * 2 + 0.5
            lnw, lnb = 1 + 0.2 * torch.randn(D, generator=g), 0.2 * torch.randn(D, generator=g)
            w1, b1 = torch.randn(Hd, D, generator=g) * D**-0.5, 0.2 * torch.randn(Hd, generator=g)
            w2, b2 = torch.randn(D, Hd, generator=g) * Hd**-0.5, 0.2 * torch.randn(D, generator=g)
            ln = ([lnw, lnb] if norm == "layernorm" else [lnw]) if affine else []
            leaves = [x, w1, b1, w2, b2] + ln

            def fn(x, w1, b1, w2, b2, *ln, backend):
                lw, lb = (*ln, None, None)[:2]
                return layernorm_mlp(x, lw, lb, w1, b1, w2, b2, norm=norm, residual=residual, backend=backend, **act)

            names = ["out", "dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"]
            names += ["dln_weight", "dln_bias"][: len(ln)]
        errs = compare(fn, leaves, dtype, g, case["op"])
        results.append({"case": case, "errors": dict(zip(names, errs)), "tol": TOL[case["dtype"]]})
    print("RESULTS " + json.dumps(results))
    """
)

# The numerical cases live in vitkern/testing.py, shared with `vitkern selftest`.
OP_CASES = [c for c in testing.OP_CASES if c["op"] in ("patch_embed", "layernorm_mlp")]


def test_triton_patch_embed_and_layernorm_mlp_under_interpreter(tmp_path):
    rows = run_under_triton_interpreter(OP_SCRIPT, OP_CASES, tmp_path)
    assert len(rows) == len(OP_CASES)
    for row in rows:
        assert len(row["errors"]) >= 3
        for name, e in row["errors"].items():
            assert e < row["tol"], f"{row['case']}: {name} error {e:.2e} >= {row['tol']}"


MODEL_SCRIPT = PRELUDE + textwrap.dedent(
    """
    import copy
    results = {}
    cfg = dict(img_size=(48, 80), patch_size=16, embed_dim=64, depth=3, num_heads=2, num_classes=5)
    for name in cases:
        torch.manual_seed(0)
        if name == "vit":
            model = vitkern.ViT(reg_tokens=1, **cfg)
        else:
            model = vitkern.ViT(spatial_prior=True, sp_layers=2, **cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        ref_model = copy.deepcopy(model).double()
        x = torch.randn(2, 3, 48, 80)
        with vitkern.use_backend("triton"):
            out = model(x)
        used = {op: vitkern.backend_report()[op].backend for op in ("patch_embed", "sp_attention", "layernorm_mlp")}
        with vitkern.use_backend("reference"):
            ref = ref_model(x.double())
        dout = torch.randn(out.shape)
        out.backward(dout)
        ref.backward(dout.double())
        ref_params = dict(ref_model.named_parameters())
        grad_errs = {n: err(p.grad, ref_params[n].grad) for n, p in model.named_parameters()}
        # torch.compile(fullgraph=True) traces the model on this backend: no graph break
        # (aot_eager: the graph capture and the fake kernels, without C++ code generation).
        torch._dynamo.reset()
        model.zero_grad()
        with vitkern.use_backend("triton"):
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            cout = compiled(x)
            cout.backward(dout)
        compiled_grad = max(err(p.grad, ref_params[n].grad) for n, p in model.named_parameters())
        # torch.export: the Triton custom ops appear in the exported graph; forward + backward.
        with vitkern.use_backend("triton"):
            ep = torch.export.export(model, (x,))
        calls = [n for n in ep.graph.nodes if n.op == "call_function" and "vitkern" in str(n.target)]
        exported_ops = sorted({f"{n.target} {n.args[-1]}" for n in calls})  # op and its last argument
        emod = ep.module()
        model.zero_grad()  # the exported module shares the model's parameter tensors
        emod.zero_grad()
        eout = emod(x)
        eout.backward(dout)
        export_grad = max(err(p.grad, ref_params[n].grad) for n, p in emod.named_parameters())
        results[name] = {
            "used": used,
            "logits": err(out, ref),
            "max_grad": max(grad_errs.values()),
            "worst": max(grad_errs, key=grad_errs.get),
            "compiled": err(cout, ref),
            "compiled_grad": compiled_grad,
            "exported": err(eout, ref),
            "export_grad": export_grad,
            "exported_ops": exported_ops,
        }
    # The custom ops' schema, fake (meta) kernels and autograd registration.
    from vitkern.ops.layernorm_mlp import _layernorm_mlp_triton
    from vitkern.ops.patch_embed import _patch_embed_op

    g = torch.Generator().manual_seed(7)
    img = torch.randn(2, 3, 8, 12, generator=g).requires_grad_()
    w = torch.randn(16, 3, 4, 4, generator=g).requires_grad_()
    b, pos = torch.randn(16, generator=g).requires_grad_(), torch.randn(6, 16, generator=g).requires_grad_()
    torch.library.opcheck(_patch_embed_op, (img, w, b, pos, "triton"))
    xs = torch.randn(10, 16, generator=g).requires_grad_()
    params = [torch.randn(*s, generator=g).requires_grad_() for s in ((16,), (16,), (32, 16), (32,), (16, 32), (16,))]
    torch.library.opcheck(_layernorm_mlp_triton, (xs, *params, 1e-6, 1, False, True, True))
    torch.library.opcheck(_layernorm_mlp_triton, (xs, params[0], None, *params[2:], 1e-5, 3, True, False, True))
    results["opcheck"] = True
    print("RESULTS " + json.dumps(results))
    """
)


def test_whole_models_on_triton_backend_match_reference(tmp_path):
    res = run_under_triton_interpreter(MODEL_SCRIPT, ["vit", "sp_vit"], tmp_path)
    assert res["opcheck"]
    for name in ("vit", "sp_vit"):
        r = res[name]
        assert set(r["used"].values()) == {"triton"}, r["used"]
        assert r["logits"] < 1e-5, (name, r)
        assert r["max_grad"] < 1e-5, (name, r)
        assert r["compiled"] < 1e-5, (name, r)
        assert r["compiled_grad"] < 1e-5, (name, r)
        assert r["exported"] < 1e-5 and r["export_grad"] < 1e-5, (name, r)
        assert "vitkern.sp_attention.default triton" in r["exported_ops"], r["exported_ops"]
        assert any("layernorm_mlp_triton" in o for o in r["exported_ops"]), r["exported_ops"]


def test_autotune_prune_keeps_configs_that_fit(monkeypatch):
    """The GEMM's autotune space: pruned to tiles no larger than the problem whose
    pipelined operand tiles fit in shared memory; one config on the interpreter."""
    import triton

    from vitkern.triton_kernels import gemm

    def names(cfgs):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) for c in cfgs]

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a16 = torch.empty(0, dtype=torch.float16)
    big = gemm._prune(gemm._AUTOTUNE_CONFIGS, {"M": 1576, "N": 1536, "A": a16})
    assert names(big) == names(gemm._AUTOTUNE_CONFIGS)  # all fit at fp16
    small = gemm._prune(gemm._AUTOTUNE_CONFIGS, {"M": 20, "N": 40, "A": a16})
    assert names(small) == [(32, 64, 32, 4)]  # no tile wider than the rounded-up problem
    assert all(c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_N"] <= 64 for c in small)
    for c in gemm._AUTOTUNE_CONFIGS:  # the shared-memory rule itself
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        need = c.num_stages * (bm * bk + bk * bn) * 4
        assert gemm.config_fits(bm, bn, bk, c.num_stages, 4, smem=need)
        assert not gemm.config_fits(bm, bn, bk, c.num_stages, 4, smem=need - 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert len(gemm._prune(gemm._AUTOTUNE_CONFIGS, {"M": 1576, "N": 1536, "A": a16})) == 1
    assert triton.next_power_of_2(20) == 32


def test_attention_autotune_space_follows_the_register_sweep(monkeypatch):
    """The flash kernels' autotuner may pick the spill-free tile of the head dim (from the
    register sweep) at each pipelining depth, or the smaller fallback tiles when those do
    not fit the device's shared memory; the interpreter keeps one."""
    from vitkern.triton_kernels import gemm
    from vitkern.triton_kernels import sp_attention as spk

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for kernel, kind in ((spk._sp_attn_fwd, "fwd"), (spk._sp_attn_bwd_dkdv, "dkdv"), (spk._sp_attn_bwd_dq, "dq")):
        prune = kernel.early_config_prune
        for dtype in (torch.float16, torch.float32):
            q = torch.empty(0, dtype=dtype)
            for head_dim in (32, 64, 80, 128):
                for prior in (True, False):
                    kept = prune(kernel.configs, {"Q": q}, HEAD_DIM=head_dim, HAS_PRIOR=prior)
                    got = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
                    assert got == spk.select_configs(kind, head_dim, prior, dtype.itemsize, gemm._SMEM_DEFAULT)
                    assert got and set(got) <= set(spk.attention_configs(kind, head_dim, prior, dtype.itemsize))
                    if dtype == torch.float16 and head_dim <= 64:  # sm_80 fits the sweep tile at every depth
                        assert got == spk.attention_configs(kind, head_dim, prior)[: len(got)]
                        assert len({g[:3] for g in got}) == 1
        assert kernel.keys[:4] == ["N", "HEAD_DIM", "HAS_PRIOR", "IEEE"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    prune, q = spk._sp_attn_fwd.early_config_prune, torch.empty(0, dtype=torch.float16)
    assert len(prune(spk._sp_attn_fwd.configs, {"Q": q}, HEAD_DIM=64, HAS_PRIOR=True)) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton needs a GPU (the interpreter cannot run bf16)")
def test_triton_bf16_on_gpu(gen):
    from conftest import assert_close_rel

    from vitkern.ops import layernorm_mlp, patch_embed

    img = torch.randn(2, 3, 64, 48, generator=gen).cuda().bfloat16()
    w = (torch.randn(96, 3, 16, 16, generator=gen) * 0.05).cuda().bfloat16()
    b = torch.randn(96, generator=gen).cuda().bfloat16()
    out = patch_embed(img, w, b, backend="triton")
    assert_close_rel(out, patch_embed(img.double(), w.double(), b.double(), backend="reference"), 1e-2, "pe bf16")
    x = torch.randn(2, 197, 96, generator=gen).cuda().bfloat16()
    ps = [
        torch.randn(*s, generator=gen).cuda().bfloat16() * 0.1
        for s in ((96,), (96,), (384, 96), (384,), (96, 384), (96,))
    ]
    out = layernorm_mlp(x, *ps, backend="triton")
    ref = layernorm_mlp(x.double(), *(p.double() for p in ps), backend="reference")
    assert_close_rel(out, ref, 1e-2, "lnmlp bf16")
