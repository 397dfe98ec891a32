"""backend="cpu" patch_embed and layernorm_mlp (csrc/) against the float64
reference: output and every gradient, fp32 and bf16, ragged shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_close_rel, randn

import vitkern
from vitkern._ext import extension_error, load_extension
from vitkern.ops import layernorm_mlp, patch_embed

pytestmark = pytest.mark.skipif(load_extension() is None, reason=f"_C not built: {extension_error()}")
DTYPES = [torch.float32, torch.bfloat16]


def _check_op_and_grads(fn, inputs, gen, dtype):
    """Run fn on `inputs` (dtype) with backend cpu and on float64 copies with the
    reference; compare the output and the gradient of every tensor input."""
    leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves, backend="cpu")
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    ref = fn(*ref_leaves, backend="reference")
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close_rel(out, ref, TOL[dtype], "out")
    dout = randn(*out.shape, gen=gen).to(dtype)
    live = [i for i, t in enumerate(leaves) if t is not None]
    grads = torch.autograd.grad(out, [leaves[i] for i in live], dout)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[i] for i in live], dout.double())
    for i, g, rg in zip(live, grads, ref_grads, strict=True):
        assert g.dtype == leaves[i].dtype and g.shape == leaves[i].shape
        assert_close_rel(g, rg, TOL[dtype], f"grad of input {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,C,grid,P,D,use_bias,pos",
    [
        (2, 3, (14, 14), 16, 48, True, "3d"),  # ViT geometry, N = 196
        (1, 3, (3, 5), 4, 24, True, "2d"),  # non-square grid, batch 1
        (3, 1, (7, 7), 2, 8, False, None),  # no bias, no pos_embed
        (2, 4, (5, 3), 14, 40, True, "2d"),  # patch 14, odd grid
    ],
)
def test_patch_embed_cpu(B, C, grid, P, D, use_bias, pos, dtype, gen, poison_empty):
    gh, gw = grid
    inputs = [
        randn(B, C, gh * P, gw * P, dtype=torch.float64, gen=gen),
        randn(D, C, P, P, dtype=torch.float64, gen=gen) * 0.1,
        randn(D, dtype=torch.float64, gen=gen) if use_bias else None,
        None if pos is None else randn(*((1,) if pos == "3d" else ()), gh * gw, D, dtype=torch.float64, gen=gen),
    ]
    _check_op_and_grads(patch_embed, inputs, gen, dtype)
    assert vitkern.last_backend("patch_embed") == "reference"  # the last call was the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "activation,norm",
    [("gelu", "layernorm"), ("gelu_tanh", "layernorm"), ("quick_gelu", "layernorm"), ("silu", "rmsnorm")],
)
@pytest.mark.parametrize(
    "shape,D,Hd,residual,affine,biases",
    [
        ((2, 197), 64, 256, True, True, True),  # ViT block geometry, N = 197
        ((1, 5), 24, 72, False, True, True),  # batch 1, no residual
        ((131,), 80, 240, True, False, False),  # 2-D input, no LN affine, no biases
        ((3, 7, 11), 48, 96, True, True, True),  # 4-D input
    ],
)
def test_layernorm_mlp_cpu(shape, D, Hd, residual, affine, biases, activation, norm, dtype, gen, poison_empty):
    def fn(x, lw, lb, w1, b1, w2, b2, backend):
        return layernorm_mlp(
            x, lw, lb, w1, b1, w2, b2, activation=activation, norm=norm, residual=residual, backend=backend
        )

    f64 = dict(dtype=torch.float64, gen=gen)
    inputs = [
        randn(*shape, D, **f64),
        randn(D, **f64) * 0.5 + 1 if affine else None,
        randn(D, **f64) if affine and norm == "layernorm" else None,
        randn(Hd, D, **f64) * 0.2,
        randn(Hd, **f64) if biases else None,
        randn(D, Hd, **f64) * 0.2,
        randn(D, **f64) if biases else None,
    ]
    _check_op_and_grads(fn, inputs, gen, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "gated,shape,D,Hd,residual,affine,biases,activation,norm",
    [
        ("gate_last", (2, 197), 64, 100, True, True, True, "silu", "layernorm"),  # ViT geometry, ragged hidden
        ("gate_first", (1, 5), 24, 36, False, True, True, "gelu_tanh", "layernorm"),  # batch 1, no residual
        ("split", (131,), 40, 72, True, False, False, "gelu", "layernorm"),  # 2-D, no LN affine, no biases
        ("split", (3, 7, 11), 48, 60, True, True, True, "silu", "rmsnorm"),  # 4-D input, RMSNorm (aimv2)
        ("gate_last", (2, 9), 32, 40, True, True, True, "quick_gelu", "rmsnorm"),
    ],
)
def test_layernorm_mlp_gated_cpu(
    gated, shape, D, Hd, residual, affine, biases, activation, norm, dtype, gen, poison_empty
):
    """layernorm_mlp(gated=...) on the cpu kernel: output and every gradient (x, LN affine, the
    fc1 weight(s) and bias(es), fc2) against float64."""

    def fn(x, lw, lb, w1, b1, w2, b2, gw, gb, backend):
        return layernorm_mlp(
            x,
            lw,
            lb,
            w1,
            b1,
            w2,
            b2,
            activation=activation,
            norm=norm,
            residual=residual,
            backend=backend,
            gated=gated,
            fc1_gate_weight=gw,
            fc1_gate_bias=gb,
        )

    f64 = dict(dtype=torch.float64, gen=gen)
    H1 = Hd if gated == "split" else 2 * Hd
    inputs = [
        randn(*shape, D, **f64),
        randn(D, **f64) * 0.5 + 1 if affine else None,
        randn(D, **f64) if affine and norm == "layernorm" else None,
        randn(H1, D, **f64) * 0.2,
        randn(H1, **f64) if biases else None,
        randn(D, Hd, **f64) * 0.2,
        randn(D, **f64) if biases else None,
        randn(Hd, D, **f64) * 0.2 if gated == "split" else None,
        randn(Hd, **f64) if gated == "split" and biases else None,
    ]
    _check_op_and_grads(fn, inputs, gen, dtype)
    assert vitkern.last_backend("layernorm_mlp_gated") == "reference"  # the last call was the reference


def test_layernorm_mlp_gated_cpu_inference_auto_picks_cpu_and_is_deterministic(gen):
    x = randn(3, 50, 32, gen=gen)
    w1, b1, w2 = randn(96, 32, gen=gen) * 0.2, randn(96, gen=gen), randn(32, 48, gen=gen) * 0.2
    with torch.no_grad():
        y = layernorm_mlp(x, None, None, w1, b1, w2, None, gated="gate_first")
    assert vitkern.last_backend("layernorm_mlp_gated") == "cpu"
    ref = layernorm_mlp(
        x.double(), None, None, w1.double(), b1.double(), w2.double(), None, gated="gate_first", backend="reference"
    )
    assert_close_rel(y, ref, TOL[torch.float32])
    leaves = [t.requires_grad_() for t in (x, w1, b1, w2)]
    runs = []
    for _ in range(2):
        out = layernorm_mlp(leaves[0], None, None, *leaves[1:], None, gated="gate_first", backend="cpu")
        runs.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_layernorm_mlp_gated_compiles_fullgraph(gen):
    """torch.compile(fullgraph=True) traces the gated op on the cpu backend (no graph break in
    the dispatch), forward and backward, and matches eager."""
    torch._dynamo.reset()
    x = randn(2, 9, 16, gen=gen).requires_grad_()
    params = [randn(16, gen=gen), None, randn(24, 16, gen=gen), randn(24, gen=gen), randn(16, 24, gen=gen), None]
    gate = randn(24, 16, gen=gen).requires_grad_()
    params = [p.requires_grad_() if p is not None else None for p in params]

    def f(x, *params, gate):
        return layernorm_mlp(x, *params, gated="split", fc1_gate_weight=gate, activation="silu", norm="rmsnorm")

    seen = []

    def backend(gm, example_inputs):  # records the captured graph's calls, runs it as traced
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    out = torch.compile(f, fullgraph=True, backend=backend)(x, *params, gate=gate)
    assert any("vitkern.layernorm_mlp.default" in t for t in seen), seen
    leaves = [x, gate, params[0], params[2]]
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref = f(x, *params, gate=gate)
    assert_close_rel(out, ref, TOL[torch.float32])
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), leaves), strict=True):
        assert_close_rel(g, r, TOL[torch.float32])


def test_layernorm_mlp_cpu_inference_saves_nothing_and_auto_picks_cpu(gen):
    x = randn(4, 16, gen=gen)
    w1, w2 = randn(64, 16, gen=gen), randn(16, 64, gen=gen)
    with torch.no_grad():
        y = layernorm_mlp(x, None, None, w1, None, w2, None)
    assert vitkern.last_backend("layernorm_mlp") == "cpu"
    ref = layernorm_mlp(x.double(), None, None, w1.double(), None, w2.double(), None, backend="reference")
    assert_close_rel(y, ref, TOL[torch.float32])


def test_saved_outputs_are_not_differentiable_and_get_no_zero_gradients(gen):
    """The statistics and activations the custom ops return for their backward are marked
    non-differentiable, and autograd does not zero-fill gradients for them (that cost 12 ms of a
    53 ms LN-MLP backward at D 384 before: benchmarks/NOTES.md, third pass)."""
    x = randn(6, 16, gen=gen).requires_grad_()
    w1, w2 = randn(64, 16, gen=gen).requires_grad_(), randn(16, 64, gen=gen).requires_grad_()
    outs = torch.ops.vitkern.layernorm_mlp(
        x, None, None, w1, None, None, None, w2, None, 1e-6, 1, False, 0, True, True, "cpu"
    )
    assert outs[0].requires_grad and not any(t.requires_grad for t in outs[1:])
    q, k, v = (randn(1, 2, 5, 8, gen=gen).requires_grad_() for _ in range(3))
    out, lse = torch.ops.vitkern.sp_attention(q, k, v, None, 1, 1, 0, 8**-0.5, "cpu")
    assert out.requires_grad and not lse.requires_grad
    zero_fills = []

    class _Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default, torch.ops.aten.fill_.Scalar):
                zero_fills.append(func)
            return func(*args, **(kwargs or {}))

    dy = randn(6, 16, gen=gen)
    with _Watch():
        grads = torch.autograd.grad(outs[0], (x, w1, w2), dy)
    assert not zero_fills, zero_fills
    y_ref = layernorm_mlp(x.double(), None, None, w1.double(), None, w2.double(), None, backend="reference")
    ref = torch.autograd.grad(y_ref, (x, w1, w2), dy.double())
    for g, r in zip(grads, ref, strict=True):
        assert_close_rel(g, r, TOL[torch.float32])


@pytest.mark.parametrize("op", ["patch_embed", "layernorm_mlp"])
def test_backward_is_bitwise_deterministic(op, gen):
    if op == "patch_embed":
        leaves = [randn(4, 3, 32, 48, gen=gen), randn(32, 3, 8, 8, gen=gen), randn(32, gen=gen), randn(24, 32, gen=gen)]
        fn = patch_embed
    else:
        leaves = [
            randn(3, 50, 32, gen=gen),
            randn(32, gen=gen),
            randn(32, gen=gen),
            randn(128, 32, gen=gen),
            randn(128, gen=gen),
            randn(32, 128, gen=gen),
            randn(32, gen=gen),
        ]
        fn = layernorm_mlp
    leaves = [t.requires_grad_() for t in leaves]
    runs = []
    for _ in range(3):
        out = fn(*leaves, backend="cpu")
        runs.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)
