"""backend="triton" sp_attention, verified on the CPU by the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported; this module runs its
checks in a subprocess that sets it, so the rest of the suite is unaffected
(no global state changed at import). bf16 runs only where CUDA exists: the
interpreter computes bf16 on raw bit patterns.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
from conftest import run_under_triton_interpreter

from vitkern import testing

pytest.importorskip("triton")

# B, H, grid, num_prefix, Dh, omega, dtype: the cases of vitkern/testing.py (shared with `vitkern selftest`).
CASES = [(*c["shape"], c["dtype"]) for c in testing.OP_CASES if c["op"] == "sp_attention"]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    import vitkern
    from vitkern.ops import sp_attention

    cases = json.loads(sys.argv[1])
    tol = {"float32": 1e-5, "float16": 2e-3}
    results = []
    for B, H, (gh, gw), P, Dh, use_omega, dt in cases:
        dtype = getattr(torch, dt)
        g = torch.Generator().manual_seed(1000 + len(results))
        N = P + gh * gw
        # q, k, v as strided views of a fused qkv projection, like the model passes them.
        qkv = torch.randn(B, N, 3, H, Dh, generator=g).to(dtype)
        q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
        omega = None
        if use_omega:
            omega = (torch.randn(H, 2 * gh - 1, 2 * gw - 1, generator=g) * 0.5 + 1).to(dtype).requires_grad_()
        leaves = [q, k, v] + ([omega] if use_omega else [])
        grid, prefix = ((gh, gw), P) if use_omega else (None, 0)
        out = sp_attention(q, k, v, omega, grid=grid, num_prefix_tokens=prefix, backend="triton")
        assert vitkern.last_backend("sp_attention") == "triton"
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref_omega = ref_leaves[3] if use_omega else None
        ref = sp_attention(*ref_leaves[:3], ref_omega, grid=grid, num_prefix_tokens=prefix, backend="reference")
        dout = torch.randn(ref.shape, generator=g).to(dtype)
        grads = torch.autograd.grad(out, leaves, dout)
        ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
        err = lambda a, b: float("inf") if torch.isnan(a).any() else ((a.double() - b).norm() / b.norm()).item()
        row = {"case": [B, H, [gh, gw], P, Dh, use_omega, dt], "out": err(out, ref)}
        row.update({f"d{n}": err(a, b) for n, a, b in zip("q k v omega".split(), grads, ref_grads)})
        row["tol"] = tol[dt]
        # Deterministic mode: d-omega from the atomics-free kernel; every gradient bit-identical across runs.
        torch.use_deterministic_algorithms(True)
        kw = dict(grid=grid, num_prefix_tokens=prefix, backend="triton")
        d1 = torch.autograd.grad(sp_attention(*leaves[:3], omega, **kw), leaves, dout)
        d2 = torch.autograd.grad(sp_attention(*leaves[:3], omega, **kw), leaves, dout)
        torch.use_deterministic_algorithms(False)
        row["det_bitwise"] = all(bool(torch.equal(a, b)) for a, b in zip(d1, d2))
        if use_omega:
            row["det_domega"] = err(d1[3], ref_grads[3])
        results.append(row)
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="interpreter run tested on Linux")
def test_triton_sp_attention_under_interpreter(tmp_path):
    rows = run_under_triton_interpreter(SCRIPT, CASES, tmp_path)
    assert len(rows) == len(CASES)
    for row in rows:
        for key in ("out", "dq", "dk", "dv", "domega", "det_domega"):
            if key in row:
                assert row[key] < row["tol"], f"{row['case']}: {key} error {row[key]:.2e} >= {row['tol']}"
        assert row["det_bitwise"], row["case"]


ROBUSTNESS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    sys.path.insert(0, sys.argv[2])
    import torch
    import test_robustness as tr

    # The numerical-robustness and determinism properties of tests/test_robustness.py, on "triton".
    g = torch.Generator().manual_seed(5)
    ran = []
    for scale in (1.0, 300.0, 5000.0):
        tr.test_large_logits_and_signed_omega("triton", scale, g)
        ran.append(f"large_logits_{scale}")
    tr.test_all_equal_scores_give_the_mean_of_v("triton", g)
    ran.append("all_equal")
    for where in ("q", "k", "v_inf", "omega"):
        tr.test_nan_and_inf_propagate_like_the_reference("triton", where, g)
        ran.append(f"nan_inf_{where}")
    tr.test_fp16_products_beyond_fp16_range_do_not_overflow("triton", g)
    tr.test_layernorm_mlp_extreme_rows("triton", g)
    tr.test_every_backward_is_bitwise_deterministic("triton", g)
    ran += ["fp16_overflow", "layernorm_extreme", "deterministic_backwards"]
    print("RESULTS " + json.dumps(ran))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="interpreter run tested on Linux")
def test_triton_robustness_and_determinism_under_interpreter(tmp_path):
    import os

    ran = run_under_triton_interpreter(ROBUSTNESS_SCRIPT, None, tmp_path, extra_args=[os.path.dirname(__file__)])
    assert len(ran) == 11, ran
