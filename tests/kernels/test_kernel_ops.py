"""Every op case of vitkern/testing.py (the cases `vitkern selftest` draws on) on the
Triton backend: output and every gradient against the float64 reference, outputs
poisoned (torch.empty fills NaN, so an element a kernel forgets to write fails)."""

from __future__ import annotations

import pytest
import torch

from vitkern import testing


@pytest.fixture
def tf32_through_the_new_api(device, op_case):
    """On the interpreter, for the GEMM ops: TF32 set through torch's current API, after
    which the legacy ``allow_tf32`` flag raises; the fp32 GEMM launches must read the
    setting without raising (issue #13, defect 4). On a GPU fp32 stays IEEE (tolerance 1e-5)."""
    matmul = torch.backends.cuda.matmul
    prev = matmul.fp32_precision
    if device == "cpu" and op_case["op"] in ("patch_embed", "layernorm_mlp"):
        matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = prev


def test_op_matches_reference(op_case, dtype, backend, device, seed, poison_empty, tf32_through_the_new_api):
    errors = testing.case_errors(op_case, backend, dtype, device, seed)
    assert "out" in errors and len(errors) >= 3, errors  # the output and at least two gradients
    tol = testing.tolerance(dtype, device)
    for name, e in errors.items():
        assert e < tol, f"{op_case['op']} {op_case['shape']} {dtype}: {name} relative error {e:.2e} >= {tol:.0e}"


@pytest.mark.ops("sp_attention")
def test_attention_backward_is_bitwise_repeatable(op_case, dtype, backend, device, seed):
    """In deterministic mode every gradient (d-omega included) is bit-identical across runs."""
    g = torch.Generator().manual_seed(seed)
    fn, leaves64, _ = testing.build_case(op_case, g)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in leaves64]
    dout = None
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = fn(*leaves, backend=backend)
            if dout is None:
                dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            runs.append(torch.autograd.grad(out, leaves, dout))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
