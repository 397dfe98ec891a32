"""Hardening, part 3: property-based tests (hypothesis) of every op on every backend
this process runs (reference, cpu) against the float64 reference, over shapes, strides
(non-contiguous and transposed views), dtypes and prefix counts; forward and every
gradient. The Triton backend gets the same properties under the interpreter
(test_triton_properties_under_interpreter). Example budgets keep CI time bounded."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch
from conftest import rel_err

import vitkern
from vitkern.ops import layernorm_mlp, patch_embed, sp_attention

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BACKENDS = [b for b in ("reference", "cpu") if vitkern.available_backends()[b] is None]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Fixed example sequence in CI (a landing must not depend on luck); VITKERN_HYPOTHESIS_RANDOM=1
# explores new examples on every run (how the cases documented in NOTES were found).
_RANDOM = os.environ.get("VITKERN_HYPOTHESIS_RANDOM") == "1"
SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=not _RANDOM
)


def _check(fn, leaves, dtype, seed, what, grad_tol=None):
    """fn(*leaves, backend=...) vs fn on float64 copies with backend="reference": output and
    the gradient of every leaf."""
    g = torch.Generator().manual_seed(seed)
    for backend in BACKENDS:
        if backend == "reference" and dtype != torch.float32:
            continue  # eager PyTorch's own bf16 rounding; the kernels are what is under test
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        out = fn(*xs, backend=backend)
        refs = [t.detach().double().requires_grad_() for t in leaves]
        ref = fn(*refs, backend="reference")
        assert out.dtype == dtype and out.shape == ref.shape
        # The same (dtype-rounded) upstream gradient for both: a float64 one would make the
        # reference solve a different problem wherever the gradient sum cancels.
        dout = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad(out, xs, dout)
        ref_grads = torch.autograd.grad(ref, refs, dout.double())
        tol = TOL[dtype]
        assert _err(out, ref) < tol, f"{what} {backend}: out"
        for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
            assert _err(a, b) < (grad_tol or tol), f"{what} {backend}: grad of input {i}"


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error, with an absolute floor (RMS 0.05; unit-variance inputs give O(1) values)
    for results that are zero in exact arithmetic (e.g. dq when a query sees a single key):
    rounding noise there is not an error."""
    if torch.isnan(a).any():
        return float("inf")
    floor = 0.05 * b.numel() ** 0.5
    return rel_err(a, b) * b.double().norm().item() / max(b.double().norm().item(), floor)


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` (B, H, N, Dh) behind different strides."""
    if kind == "token_major":  # (B, N, H, Dh) storage, the usual qkv-projection view
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "padded":  # a slice of a wider buffer: non-unit row stride
        big = torch.empty(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype)
        big[..., : t.shape[-1]] = t
        return big[..., : t.shape[-1]]
    return t.contiguous()


@SETTINGS
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    gh=st.integers(1, 5),
    gw=st.integers(1, 5),
    prefix=st.integers(0, 3),
    Dh=st.sampled_from([8, 16, 24, 32, 64]),
    use_omega=st.booleans(),
    layout=st.sampled_from(["contiguous", "token_major", "padded"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sp_attention_properties(B, H, gh, gw, prefix, Dh, use_omega, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    N = prefix + gh * gw
    qkv = [_layout(torch.randn(B, H, N, Dh, generator=g).to(dtype), layout) for _ in range(3)]
    leaves = list(qkv)
    if use_omega:
        leaves.append((torch.randn(H, 2 * gh - 1, 2 * gw - 1, generator=g) * 0.7 + 0.5).to(dtype))

    def fn(q, k, v, *om, backend):
        om = om[0] if om else None
        return sp_attention(
            q,
            k,
            v,
            om,
            grid=(gh, gw) if om is not None else None,
            num_prefix_tokens=prefix if om is not None else 0,
            backend=backend,
        )

    # bf16 over <= 4 keys: the softmax gradient dS = P (dP - rowsum(dO * O)) cancels, and O is
    # stored in bf16 (as in FlashAttention), so the gradients are ill-conditioned there: measured
    # over 150 random N = 2 cases, worst 7.6e-2 (cpu) and 1.4e-2 (eager bf16); N >= 5 stays
    # below 7e-3 (benchmarks/NOTES.md, hardening).
    grad_tol = {torch.bfloat16: 1e-1, torch.float16: 2e-2}.get(dtype) if N <= 4 else None
    _check(fn, leaves, dtype, seed, f"sp_attention B{B} H{H} {gh}x{gw}+{prefix} Dh{Dh} {layout}", grad_tol)


@SETTINGS
@given(
    B=st.integers(1, 2),
    C=st.integers(1, 4),
    P=st.sampled_from([1, 2, 3, 4, 8]),
    gh=st.integers(1, 4),
    gw=st.integers(1, 4),
    D=st.sampled_from([8, 16, 40]),
    bias=st.booleans(),
    pos=st.sampled_from([None, "2d", "3d"]),
    layout=st.sampled_from(["contiguous", "channels_last", "cropped"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_patch_embed_properties(B, C, P, gh, gw, D, bias, pos, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, C, gh * P + 3, gw * P + 2, generator=g).to(dtype)
    img = img[:, :, 3:, 2:] if layout == "cropped" else img[:, :, : gh * P, : gw * P].contiguous()
    if layout == "channels_last":
        img = img.contiguous(memory_format=torch.channels_last)
    leaves = [img, (torch.randn(D, C, P, P, generator=g) * (C * P * P) ** -0.5).to(dtype)]
    if bias:
        leaves.append(torch.randn(D, generator=g).to(dtype))
    if pos:
        shape = (gh * gw, D) if pos == "2d" else (1, gh * gw, D)
        leaves.append(torch.randn(*shape, generator=g).to(dtype))

    def fn(x, w, *rest, backend):
        b = rest[0] if bias else None
        p = rest[-1] if pos else None
        return patch_embed(x, w, b, p, backend=backend)

    _check(fn, leaves, dtype, seed, f"patch_embed B{B} C{C} P{P} {gh}x{gw} D{D} {layout}")


@SETTINGS
@given(
    lead=st.sampled_from([(1,), (3,), (2, 5), (1, 197)]),
    D=st.sampled_from([8, 24, 64]),
    ratio=st.sampled_from([1, 2, 4]),
    affine=st.booleans(),
    activation=st.sampled_from(["gelu", "gelu_tanh", "quick_gelu", "silu"]),
    norm=st.sampled_from(["layernorm", "rmsnorm"]),
    residual=st.booleans(),
    transposed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_layernorm_mlp_properties(lead, D, ratio, affine, activation, norm, residual, transposed, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    Hd = D * ratio
    x = torch.randn(*lead, D, generator=g).to(dtype)
    if transposed and len(lead) == 2:  # (N, B, D) storage viewed as (B, N, D)
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    w1 = (torch.randn(Hd, D, generator=g) * D**-0.5).to(dtype)
    if transposed:  # a transposed weight view
        w1 = w1.t().contiguous().t()
    leaves = [
        x,
        w1,
        (torch.randn(Hd, generator=g) * 0.1).to(dtype),
        (torch.randn(D, Hd, generator=g) * Hd**-0.5).to(dtype),
        (torch.randn(D, generator=g) * 0.1).to(dtype),
    ]
    if affine:
        leaves.append((1 + 0.2 * torch.randn(D, generator=g)).to(dtype))
        if norm == "layernorm":  # an RMSNorm has no bias
            leaves.append((0.2 * torch.randn(D, generator=g)).to(dtype))

    def fn(x, w1, b1, w2, b2, *ln, backend):
        lw, lb = (*ln, None)[:2] if affine else (None, None)
        return layernorm_mlp(
            x, lw, lb, w1, b1, w2, b2, activation=activation, norm=norm, residual=residual, backend=backend
        )

    _check(fn, leaves, dtype, seed, f"layernorm_mlp {lead} D{D} Hd{Hd} {activation} {norm}")


TRITON_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    sys.path.insert(0, sys.argv[2])
    import torch
    import test_properties as tp
    from hypothesis import settings, HealthCheck
    # Same properties on the Triton backend (fp32/fp16: the interpreter cannot run bf16).
    tp.BACKENDS[:] = ["triton"]
    tp.TOL[torch.float16] = 2e-3
    n = json.loads(sys.argv[1])
    cfg = settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=not tp._RANDOM,
    )
    for test in (tp.test_sp_attention_properties, tp.test_patch_embed_properties, tp.test_layernorm_mlp_properties):
        inner = test.hypothesis.inner_test
        from hypothesis import given, strategies as st
        strategies = dict(test.hypothesis._given_kwargs)
        strategies["dtype"] = st.sampled_from([torch.float32, torch.float16])
        settings(cfg)(given(**strategies)(inner))()
    print("RESULTS " + json.dumps({"ok": True}))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="interpreter run tested on Linux")
def test_triton_properties_under_interpreter(tmp_path):
    pytest.importorskip("triton")
    import json
    import os
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, json.dumps(10), tests_dir],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "RESULTS" in res.stdout
