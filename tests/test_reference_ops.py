"""The reference ops against independent float64 formulations (docs/DESIGN.md §1)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_rel, randn

from vitkern.ops import layernorm_mlp, patch_embed, sp_attention, spatial_prior_matrix


# ----------------------------------------------------------------------------- sp_attention
def prior_pairwise(omega: torch.Tensor, gh: int, gw: int, num_prefix: int) -> torch.Tensor:
    """The N x N prior built pair by pair from the definition in docs/DESIGN.md §1.2 (no shared code)."""
    H = omega.shape[0]
    N = num_prefix + gh * gw
    prior = torch.ones(H, N, N, dtype=omega.dtype)
    for i in range(num_prefix, N):
        row_i, col_i = divmod(i - num_prefix, gw)
        for j in range(num_prefix, N):
            row_j, col_j = divmod(j - num_prefix, gw)
            dy, dx = row_j - row_i, col_j - col_i
            prior[:, i, j] = omega[:, dy + gh - 1, dx + gw - 1]
    return prior


def sp_attention_pairwise(q, k, v, omega, gh, gw, num_prefix, scale):
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if omega is not None:
        s = s * prior_pairwise(omega, gh, gw, num_prefix)
    s = s - s.amax(-1, keepdim=True)
    p = s.exp() / s.exp().sum(-1, keepdim=True)
    return torch.einsum("bhij,bhjd->bhid", p, v)


SP_CASES = [
    # B, H, grid, num_prefix, Dh
    (1, 2, (14, 14), 1, 32),  # N = 197 with a class token, batch 1
    (2, 3, (3, 5), 0, 16),  # non-square grid, no prefix
    (2, 2, (5, 3), 5, 80),  # tall grid, class + 4 register tokens, head dim 80
    (1, 1, (1, 1), 0, 8),  # a single patch
    (3, 2, (4, 4), 2, 64),
]


@pytest.mark.parametrize("B,H,grid,num_prefix,Dh", SP_CASES)
def test_sp_attention_matches_pairwise_float64(B, H, grid, num_prefix, Dh, gen):
    gh, gw = grid
    N = num_prefix + gh * gw
    q, k, v = (randn(B, H, N, Dh, dtype=torch.float64, gen=gen) for _ in range(3))
    omega = randn(H, 2 * gh - 1, 2 * gw - 1, dtype=torch.float64, gen=gen) + 1.0
    scale = Dh**-0.5
    ref = sp_attention_pairwise(q, k, v, omega, gh, gw, num_prefix, scale)
    out = sp_attention(q, k, v, omega, grid=grid, num_prefix_tokens=num_prefix, backend="reference")
    assert_close_rel(out, ref, 1e-12, "sp_attention float64")
    # The grid is inferred from omega's shape when not given.
    out2 = sp_attention(q, k, v, omega, num_prefix_tokens=num_prefix, backend="reference")
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sp_attention_dtypes(dtype, gen):
    B, H, gh, gw, P, Dh = 2, 2, 7, 5, 1, 64
    N = P + gh * gw
    q64, k64, v64 = (randn(B, H, N, Dh, dtype=torch.float64, gen=gen) for _ in range(3))
    omega64 = randn(H, 2 * gh - 1, 2 * gw - 1, dtype=torch.float64, gen=gen) * 0.5 + 1.0
    ref = sp_attention_pairwise(q64, k64, v64, omega64, gh, gw, P, Dh**-0.5)
    # Round the inputs to dtype first so the check measures the op, not input rounding.
    q, k, v, omega = (t.to(dtype) for t in (q64, k64, v64, omega64))
    ref = sp_attention_pairwise(*(t.double() for t in (q, k, v, omega)), gh, gw, P, Dh**-0.5)
    out = sp_attention(q, k, v, omega, num_prefix_tokens=P, backend="reference")
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert_close_rel(out, ref, tol, f"sp_attention {dtype}")


def test_sp_attention_omega_none_is_plain_attention(gen):
    q, k, v = (randn(2, 3, 17, 32, dtype=torch.float64, gen=gen) for _ in range(3))
    ref = sp_attention_pairwise(q, k, v, None, 0, 0, 0, 32**-0.5)
    assert_close_rel(sp_attention(q, k, v, backend="reference"), ref, 1e-12)
    # A custom scale.
    ref = sp_attention_pairwise(q, k, v, None, 0, 0, 0, 0.3)
    assert_close_rel(sp_attention(q, k, v, scale=0.3, backend="reference"), ref, 1e-12)


def test_sp_attention_omega_ones_equals_plain(gen):
    q, k, v = (randn(1, 2, 1 + 12, 16, dtype=torch.float64, gen=gen) for _ in range(3))
    ones = torch.ones(2, 5, 7, dtype=torch.float64)
    a = sp_attention(q, k, v, ones, num_prefix_tokens=1, backend="reference")
    b = sp_attention(q, k, v, backend="reference")
    assert_close_rel(a, b, 1e-13)


def test_sp_attention_accepts_fused_qkv_views(gen):
    B, N, H, Dh = 2, 1 + 9, 3, 16
    qkv = randn(B, N, 3 * H * Dh, dtype=torch.float64, gen=gen)
    q, k, v = qkv.reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    omega = randn(H, 5, 5, dtype=torch.float64, gen=gen)
    out = sp_attention(q, k, v, omega, num_prefix_tokens=1, backend="reference")
    ref = sp_attention_pairwise(q.contiguous(), k.contiguous(), v.contiguous(), omega, 3, 3, 1, Dh**-0.5)
    assert_close_rel(out, ref, 1e-12)


@pytest.mark.parametrize("grid,num_prefix", [((3, 2), 1), ((2, 3), 0)])
def test_sp_attention_gradcheck(grid, num_prefix, gen):
    gh, gw = grid
    B, H, Dh = 2, 2, 4
    N = num_prefix + gh * gw
    q, k, v = (randn(B, H, N, Dh, dtype=torch.float64, gen=gen).requires_grad_() for _ in range(3))
    omega = (randn(H, 2 * gh - 1, 2 * gw - 1, dtype=torch.float64, gen=gen) + 1).requires_grad_()

    def f(q, k, v, omega):
        return sp_attention(q, k, v, omega, num_prefix_tokens=num_prefix, backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v, omega))


def test_sp_attention_omega_grad_matches_spec_formula(gen):
    """d omega_h[r] = sum over pairs with relpos r of dS_ij * scale * (q_i . k_j)."""
    B, H, gh, gw, P, Dh = 2, 2, 3, 4, 1, 8
    N = P + gh * gw
    q, k, v = (randn(B, H, N, Dh, dtype=torch.float64, gen=gen) for _ in range(3))
    omega = (randn(H, 2 * gh - 1, 2 * gw - 1, dtype=torch.float64, gen=gen) + 1).requires_grad_()
    dout = randn(B, H, N, Dh, dtype=torch.float64, gen=gen)
    out = sp_attention(q, k, v, omega, num_prefix_tokens=P, backend="reference")
    (got,) = torch.autograd.grad(out, omega, dout)

    scale = Dh**-0.5
    qk = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    p = (qk * prior_pairwise(omega.detach(), gh, gw, P)).softmax(-1)
    dp = torch.einsum("bhid,bhjd->bhij", dout, v)
    ds = p * (dp - (dout * out.detach()).sum(-1, keepdim=True))
    expected = torch.zeros_like(omega)
    for i in range(P, N):
        ri, ci = divmod(i - P, gw)
        for j in range(P, N):
            rj, cj = divmod(j - P, gw)
            expected[:, rj - ri + gh - 1, cj - ci + gw - 1] += (ds[:, :, i, j] * qk[:, :, i, j]).sum(0)
    assert_close_rel(got, expected, 1e-12, "d omega")


# ----------------------------------------------------------------------------- spatial prior
@pytest.mark.parametrize("grid,num_prefix", [((3, 5), 0), ((4, 4), 1), ((5, 2), 3)])
def test_spatial_prior_matrix_reference(grid, num_prefix, gen):
    omega = randn(3, 2 * grid[0] - 1, 2 * grid[1] - 1, dtype=torch.float64, gen=gen)
    out = spatial_prior_matrix(omega, grid, num_prefix, backend="reference")
    torch.testing.assert_close(out, prior_pairwise(omega, *grid, num_prefix), rtol=0, atol=0)


# ----------------------------------------------------------------------------- patch_embed
def patch_embed_loops(images, weight, bias, pos):
    """Patch by patch: flatten each patch in (c, py, px) order and project it."""
    B, C, Hh, Ww = images.shape
    D, _, P, _ = weight.shape
    gh, gw = Hh // P, Ww // P
    W2 = weight.reshape(D, C * P * P)
    out = torch.empty(B, gh * gw, D, dtype=images.dtype)
    for r in range(gh):
        for c in range(gw):
            patch = images[:, :, r * P : (r + 1) * P, c * P : (c + 1) * P].reshape(B, -1)
            out[:, r * gw + c] = patch @ W2.T + (0 if bias is None else bias)
    return out + (0 if pos is None else pos.reshape(1, gh * gw, D))


@pytest.mark.parametrize(
    "B,C,grid,P,D,use_bias,pos_shape",
    [
        (2, 3, (3, 5), 4, 24, True, "2d"),
        (1, 1, (7, 7), 2, 8, False, None),
        (3, 4, (2, 3), 5, 10, True, "3d"),
    ],
)
def test_patch_embed_matches_loops(B, C, grid, P, D, use_bias, pos_shape, gen):
    gh, gw = grid
    images = randn(B, C, gh * P, gw * P, dtype=torch.float64, gen=gen)
    weight = randn(D, C, P, P, dtype=torch.float64, gen=gen)
    bias = randn(D, dtype=torch.float64, gen=gen) if use_bias else None
    pos = None
    if pos_shape:
        pos = randn(gh * gw, D, dtype=torch.float64, gen=gen)
        pos = pos[None] if pos_shape == "3d" else pos
    out = patch_embed(images, weight, bias, pos, backend="reference")
    assert_close_rel(out, patch_embed_loops(images, weight, bias, pos), 1e-13)


def test_patch_embed_gradcheck(gen):
    images = randn(2, 2, 6, 4, dtype=torch.float64, gen=gen).requires_grad_()
    weight = randn(3, 2, 2, 2, dtype=torch.float64, gen=gen).requires_grad_()
    bias = randn(3, dtype=torch.float64, gen=gen).requires_grad_()
    pos = randn(6, 3, dtype=torch.float64, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: patch_embed(*a, backend="reference"), (images, weight, bias, pos))


# ----------------------------------------------------------------------------- layernorm_mlp
def layernorm_mlp_manual(x, lw, lb, w1, b1, w2, b2, eps, activation, residual, norm="layernorm"):
    if norm == "rmsnorm":  # x / sqrt(mean(x^2) + eps) * w, no bias
        h = x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * lw
    else:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        h = (x - mu) / torch.sqrt(var + eps) * lw + lb
    a = h @ w1.T + b1
    if activation in ("tanh", "gelu_tanh"):
        g = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
    elif activation == "quick_gelu":
        g = a / (1 + torch.exp(-1.702 * a))
    elif activation == "silu":
        g = a / (1 + torch.exp(-a))
    else:
        g = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
    y = g @ w2.T + b2
    return x + y if residual else y


@pytest.mark.parametrize("shape,D,Hd", [((2, 197), 24, 72), ((1, 5), 16, 48), ((7,), 12, 36)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("residual", [True, False])
def test_layernorm_mlp_matches_manual(shape, D, Hd, approximate, residual, gen):
    x = randn(*shape, D, dtype=torch.float64, gen=gen)
    params = [
        randn(D, dtype=torch.float64, gen=gen) + 1,
        randn(D, dtype=torch.float64, gen=gen),
        randn(Hd, D, dtype=torch.float64, gen=gen) * 0.2,
        randn(Hd, dtype=torch.float64, gen=gen),
        randn(D, Hd, dtype=torch.float64, gen=gen) * 0.2,
        randn(D, dtype=torch.float64, gen=gen),
    ]
    out = layernorm_mlp(x, *params, eps=1e-6, approximate=approximate, residual=residual, backend="reference")
    ref = layernorm_mlp_manual(x, *params, 1e-6, approximate, residual)
    assert_close_rel(out, ref, 1e-12)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu", "silu"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_layernorm_mlp_variants_match_manual_and_timm(activation, norm, gen):
    """The activation / norm variants against hand-written math (float64) and against timm's
    own modules (QuickGELU, SiLU, GELUTanh, RmsNorm, Mlp), the definitions users convert from."""
    D, Hd, eps = 24, 72, 1e-5
    x = randn(2, 9, D, dtype=torch.float64, gen=gen)
    lw, lb = randn(D, dtype=torch.float64, gen=gen) + 1, randn(D, dtype=torch.float64, gen=gen)
    if norm == "rmsnorm":
        lb = None
    w1, b1 = randn(Hd, D, dtype=torch.float64, gen=gen) * 0.2, randn(Hd, dtype=torch.float64, gen=gen)
    w2, b2 = randn(D, Hd, dtype=torch.float64, gen=gen) * 0.2, randn(D, dtype=torch.float64, gen=gen)
    out = layernorm_mlp(x, lw, lb, w1, b1, w2, b2, eps=eps, activation=activation, norm=norm, backend="reference")
    ref = layernorm_mlp_manual(x, lw, lb, w1, b1, w2, b2, eps, activation, True, norm)
    assert_close_rel(out, ref, 1e-12)

    timm_layers = pytest.importorskip("timm.layers")
    acts = {
        "gelu": timm_layers.activations.GELU,
        "gelu_tanh": timm_layers.activations.GELUTanh,
        "quick_gelu": timm_layers.activations.QuickGELU,
        "silu": torch.nn.SiLU,
    }
    if norm == "rmsnorm":
        n = timm_layers.RmsNorm(D, eps=eps).double()
    else:
        n = timm_layers.LayerNorm(D, eps=eps).double()
    mlp = timm_layers.Mlp(D, Hd, act_layer=acts[activation]).double()
    with torch.no_grad():
        n.weight.copy_(lw)
        if lb is not None:
            n.bias.copy_(lb)
        mlp.fc1.weight.copy_(w1), mlp.fc1.bias.copy_(b1), mlp.fc2.weight.copy_(w2), mlp.fc2.bias.copy_(b2)
        assert_close_rel(out, x + mlp(n(x)), 1e-12)


def test_layernorm_mlp_gradcheck(gen):
    D, Hd = 6, 12
    x = randn(2, 3, D, dtype=torch.float64, gen=gen).requires_grad_()
    params = [
        (randn(D, dtype=torch.float64, gen=gen) + 1).requires_grad_(),
        randn(D, dtype=torch.float64, gen=gen).requires_grad_(),
        randn(Hd, D, dtype=torch.float64, gen=gen).requires_grad_(),
        randn(Hd, dtype=torch.float64, gen=gen).requires_grad_(),
        randn(D, Hd, dtype=torch.float64, gen=gen).requires_grad_(),
        randn(D, dtype=torch.float64, gen=gen).requires_grad_(),
    ]
    assert torch.autograd.gradcheck(lambda *a: layernorm_mlp(*a, backend="reference"), (x, *params))
