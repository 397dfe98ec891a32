"""backend="cpu" sp_attention (csrc/vitkern/sp_attention_cpu.cpp) against the
float64 reference: output and every gradient, fp32 and bf16, ragged shapes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import SUBPROCESS_CWD, TOL, assert_close_rel, randn, subprocess_env

import vitkern
from vitkern._ext import extension_error, load_extension
from vitkern.ops import sp_attention

pytestmark = pytest.mark.skipif(load_extension() is None, reason=f"_C not built: {extension_error()}")

CASES = [
    # B, H, grid, num_prefix, Dh, omega
    (1, 2, (14, 14), 1, 64, True),  # N = 197 with a class token, batch 1
    (2, 3, (3, 5), 0, 32, True),  # non-square grid, N = 15 below one block
    (2, 2, (5, 3), 5, 80, True),  # class + 4 registers, head dim 80
    (1, 2, (9, 9), 1, 96, True),
    (2, 1, (17, 19), 2, 128, True),  # N = 325
    (1, 1, (23, 23), 1, 32, True),  # N = 530 spans two key blocks of 512 (online rescaling)
    (1, 2, (22, 24), 5, 64, True),  # N = 533, non-square: the second key block starts mid grid row
    (1, 1, (1, 1), 0, 16, True),  # a single token
    (2, 3, (6, 7), 1, 24, True),  # head dim not a multiple of 16 (a partial packed panel)
    (1, 2, (5, 5), 0, 8, True),  # head dim 8: K by columns is one 16-wide panel, longer than K packed by rows
    (2, 2, (7, 7), 1, 64, False),  # omega=None: plain attention
    (1, 2, None, 0, 48, False),  # plain attention with no grid at all (N = 300)
]


def _inputs(B, H, grid, num_prefix, Dh, with_omega, dtype, gen, n_plain=300):
    N = num_prefix + grid[0] * grid[1] if grid else n_plain
    q, k, v = (randn(B, H, N, Dh, dtype=dtype, gen=gen) for _ in range(3))
    omega = None
    if with_omega:
        omega = (randn(H, 2 * grid[0] - 1, 2 * grid[1] - 1, gen=gen) * 0.5 + 1.0).to(dtype)
    return q, k, v, omega


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,grid,num_prefix,Dh,with_omega", CASES)
def test_forward_and_all_gradients(B, H, grid, num_prefix, Dh, with_omega, dtype, gen, poison_empty):
    q, k, v, omega = _inputs(B, H, grid, num_prefix, Dh, with_omega, dtype, gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([omega.clone().requires_grad_()] if with_omega else [])
    out = sp_attention(*leaves[:3], leaves[3] if with_omega else None, num_prefix_tokens=num_prefix, backend="cpu")
    assert vitkern.last_backend("sp_attention") == "cpu"
    assert out.dtype == dtype and out.shape == q.shape
    # Truth: the reference in float64 on the same (rounded) inputs.
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = sp_attention(
        *ref_leaves[:3], ref_leaves[3] if with_omega else None, num_prefix_tokens=num_prefix, backend="reference"
    )
    tol = TOL[dtype]
    assert_close_rel(out, ref, tol, "out")
    dout = randn(*out.shape, gen=gen).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    for name, g, rg in zip("q k v omega".split(), grads, ref_grads, strict=False):
        assert g.dtype == dtype
        if rg.norm() == 0:  # a single token: d q = d k = 0, up to rounding of dP - delta
            assert g.double().norm() <= tol * dout.double().norm() * v.double().norm(), name
        else:
            assert_close_rel(g, rg, tol, f"d{name}")


def test_strided_qkv_views_from_fused_projection(gen):
    B, N, H, Dh = 2, 1 + 6 * 7, 3, 32
    qkv = randn(B, N, 3 * H * Dh, gen=gen)
    q, k, v = qkv.reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    omega = randn(H, 11, 13, gen=gen)
    out = sp_attention(q, k, v, omega, num_prefix_tokens=1, backend="cpu")
    ref = sp_attention(q.double(), k.double(), v.double(), omega.double(), num_prefix_tokens=1, backend="reference")
    assert_close_rel(out, ref, TOL[torch.float32])
    # transposed (non-unit last stride) inputs are accepted too
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    out2 = sp_attention(qt, k, v, omega, num_prefix_tokens=1, backend="cpu")
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)


def test_backward_is_bitwise_deterministic(gen):
    q, k, v, omega = _inputs(3, 2, (14, 14), 1, 64, True, torch.float32, gen)
    leaves = [t.requires_grad_() for t in (q, k, v, omega)]
    dout = randn(*q.shape, gen=gen)
    runs = []
    for _ in range(3):
        out = sp_attention(*leaves, num_prefix_tokens=1, backend="cpu")
        runs.append(torch.autograd.grad(out, leaves, dout))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_plain_attention_training_is_routed_to_sdpa(gen):
    """Few (batch, head) pairs, or no packed GEMM route: SDPA's fused backward is the faster one."""
    q, k, v, _ = _inputs(1, 2, (4, 4), 0, 32, False, torch.float32, gen)
    with torch.no_grad():
        sp_attention(q, k, v)
    assert vitkern.last_backend("sp_attention") == "cpu"
    sp_attention(*(t.requires_grad_() for t in (q, k, v)))
    rec = vitkern.backend_report()["sp_attention"]
    assert rec.backend == "reference" and "SDPA" in rec.skipped["cpu"]
    sp_attention(q, k, v, backend="cpu")  # an explicit request still runs the kernel
    assert vitkern.last_backend("sp_attention") == "cpu"


def test_plain_attention_training_with_many_heads_follows_the_gemm_route(gen):
    """From 12 (batch, head) pairs up the kernel's packed-route backward beats SDPA's; where its
    products are BLAS calls (VITKERN_GEMM=blas, or AVX-512 CPUs) SDPA keeps plain training."""
    from vitkern.ops._packed import packed_route

    q, k, v, _ = _inputs(2, 6, (4, 4), 0, 32, False, torch.float32, gen)
    out = sp_attention(*(t.requires_grad_() for t in (q, k, v)))
    rec = vitkern.backend_report()["sp_attention"]
    if packed_route():
        assert rec.backend == "cpu", rec.skipped
        ref = sp_attention(q, k, v, backend="reference")
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        grads_ref = torch.autograd.grad(ref.sum(), (q, k, v))
        assert_close_rel(out, ref, TOL[torch.float32])
        for a, b in zip(grads, grads_ref, strict=True):
            assert_close_rel(a, b, TOL[torch.float32])
    else:
        assert rec.backend == "reference" and "SDPA" in rec.skipped["cpu"]
    code = (
        "import torch, vitkern\n"
        "from vitkern.ops import sp_attention\n"
        "q, k, v = (torch.randn(2, 6, 16, 32, requires_grad=True) for _ in range(3))\n"
        "sp_attention(q, k, v)\n"
        "rec = vitkern.backend_report()['sp_attention']\n"
        "assert rec.backend == 'reference' and 'SDPA' in rec.skipped['cpu'], rec\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(VITKERN_GEMM="blas"),
        cwd=SUBPROCESS_CWD,  # not the repository root: the installed vitkern, with its _C
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_auto_picks_cpu_for_cpu_tensors(gen):
    q, k, v, omega = _inputs(1, 2, (4, 4), 1, 32, True, torch.float32, gen)
    sp_attention(q, k, v, omega, num_prefix_tokens=1)
    assert vitkern.last_backend("sp_attention") == "cpu"
    # float64 is left to the reference, and the report says why.
    sp_attention(q.double(), k.double(), v.double(), omega.double(), num_prefix_tokens=1)
    rec = vitkern.backend_report()["sp_attention"]
    assert rec.backend == "reference" and "float64" in rec.skipped["cpu"]
    with pytest.raises(vitkern.BackendError, match="float64"):
        sp_attention(q.double(), k.double(), v.double(), omega.double(), num_prefix_tokens=1, backend="cpu")
