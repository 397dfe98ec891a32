"""Hardening, part 2: numerical robustness against the reference, determinism of
every backward, concurrency and memory stability - on every backend this process
can run (reference and, when built, cpu; the Triton kernels' counterparts run under
the interpreter in tests/kernels/test_kernel_robustness.py)."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import rel_err

import vitkern
from vitkern.ops import layernorm_mlp, patch_embed, sp_attention

BACKENDS = vitkern.usable_backends("cpu")
GRID, PREFIX, H, DH = (3, 5), 1, 2, 32
N = PREFIX + GRID[0] * GRID[1]


def _qkv(gen, scale=1.0, dtype=torch.float32, B=2):
    return [(torch.randn(B, H, N, DH, generator=gen, dtype=torch.float64) * scale).to(dtype) for _ in range(3)]


def _omega(gen, dtype=torch.float32):
    om = torch.randn(H, 2 * GRID[0] - 1, 2 * GRID[1] - 1, generator=gen, dtype=torch.float64) * 1.5
    om[:, ::2, ::3] = 0.0  # zero entries: those pairs get logit 0
    return om.to(dtype)  # about half negative: those pairs' logits flip sign


def _attn(q, k, v, om, backend):
    return sp_attention(q, k, v, om, num_prefix_tokens=PREFIX, backend=backend)


def _ref64(q, k, v, om):
    return _attn(q.double(), k.double(), v.double(), None if om is None else om.double(), "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logit_scale", [1.0, 300.0, 5000.0])  # logits up to ~1e4 in magnitude
def test_large_logits_and_signed_omega(backend, logit_scale, gen):
    q, k, v = _qkv(gen)
    q = q * logit_scale
    om = _omega(gen)
    max_logit = ((q.double() @ k.double().transpose(-1, -2)) * DH**-0.5).abs().max().item()
    if logit_scale == 5000.0:
        assert max_logit > 5e3
    out = _attn(q, k, v, om, backend)
    assert torch.isfinite(out).all()
    # fp32 logits carry an absolute rounding error ~ eps32 * |logit|, which the softmax turns
    # into a relative error of the same size: the tolerance follows that conditioning.
    tol = max(1e-5, 1e-6 * max_logit)
    assert rel_err(out, _ref64(q, k, v, om)) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_scores_give_the_mean_of_v(backend, gen):
    q, _, v = _qkv(gen)
    k = torch.randn(1, 1, 1, DH, generator=gen).expand(2, H, N, DH).contiguous()  # every key the same
    out = _attn(q, k, v, None, backend)
    ref = v.double().mean(dim=2, keepdim=True).expand_as(out)
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v_inf", "omega"])
def test_nan_and_inf_propagate_like_the_reference(backend, where, gen):
    q, k, v = _qkv(gen)
    om = _omega(gen)
    if where == "q":
        q[0, 1, 3, 5] = float("nan")  # one query row of one head
    elif where == "k":
        k[1, 0, 7, 0] = float("nan")  # one key: every query of that (batch, head)
    elif where == "v_inf":
        v[0, 0, 4, 2] = float("inf")
    else:
        om[1, 2, 4] = float("nan")  # one relative offset of head 1
    out = _attn(q, k, v, om, backend)
    ref = _ref64(q, k, v, om)
    assert torch.equal(out.isnan(), ref.isnan()), "NaN pattern differs from the reference"
    assert torch.equal(out.isinf(), ref.isinf()), "Inf pattern differs from the reference"
    assert out.isnan().any() or out.isinf().any()
    fin = torch.isfinite(ref)
    assert rel_err(out[fin], ref[fin]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_products_beyond_fp16_range_do_not_overflow(backend, gen):
    if backend == "reference":
        pytest.skip("the reference computes fp16 scores in fp16 (eager PyTorch semantics)")
    q, k, v = _qkv(gen, dtype=torch.float16)
    q, k = (q.float() * 80).half(), (k.float() * 80).half()  # q.k up to ~1e5 > fp16 max 65504
    assert (q.double() @ k.double().transpose(-1, -2)).abs().max() > 65504
    om = _omega(gen, torch.float16)
    out = _attn(q, k, v, om, backend)
    assert torch.isfinite(out).all()
    assert rel_err(out, _ref64(q, k, v, om)) < 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_layernorm_mlp_extreme_rows(backend, gen):
    D, Hd = 24, 64
    x = torch.randn(3, 7, D, generator=gen) * 1e4  # large activations
    x[0, 0] = 3.25  # a constant row: variance 0, normalised to 0 (+ LN bias)
    ps = [torch.randn(*s, generator=gen) * 0.3 for s in ((D,), (D,), (Hd, D), (Hd,), (D, Hd), (D,))]
    # residual=False: compare the MLP branch itself (x + branch would hide its error under x's rounding)
    out = layernorm_mlp(x, *ps, residual=False, backend=backend)
    ref = layernorm_mlp(x.double(), *(p.double() for p in ps), residual=False, backend="reference")
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5


# ----------------------------------------------------------------------------- determinism
def _backward_grads(fn, leaves):
    for t in leaves:
        t.grad = None
    fn().square().sum().backward()
    return [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backward_is_bitwise_deterministic(backend, gen):
    q, k, v = (t.requires_grad_() for t in _qkv(gen))
    om = _omega(gen).requires_grad_()
    img = torch.randn(2, 3, 12, 20, generator=gen).requires_grad_()
    w = (torch.randn(32, 3, 4, 4, generator=gen) * 0.1).requires_grad_()
    x = torch.randn(2, 9, 32, generator=gen).requires_grad_()
    ps = [
        (torch.randn(*s, generator=gen) * 0.2).requires_grad_()
        for s in ((32,), (32,), (64, 32), (64,), (32, 64), (32,))
    ]
    cases = [
        (lambda: _attn(q, k, v, om, backend), [q, k, v, om]),
        (lambda: _attn(q, k, v, None, backend), [q, k, v]),
        (lambda: patch_embed(img, w, ps[1], backend=backend), [img, w, ps[1]]),
        (lambda: layernorm_mlp(x, *ps, backend=backend), [x, *ps]),
    ]
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for fn, leaves in cases:
            first = _backward_grads(fn, leaves)
            for _ in range(2):
                again = _backward_grads(fn, leaves)
                assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    finally:
        torch.use_deterministic_algorithms(prev)


# ----------------------------------------------------------------------------- concurrency, leaks
def _tiny_spvit():
    torch.manual_seed(0)
    m = vitkern.ViT(
        img_size=(48, 80),
        patch_size=16,
        embed_dim=64,
        depth=3,
        num_heads=4,
        num_classes=7,
        spatial_prior=True,
        sp_layers=2,
    )
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_threads_on_one_model_equal_serial(backend, gen):
    model = _tiny_spvit()
    inputs = [torch.randn(2, 3, 48, 80, generator=gen) for _ in range(8)]
    with torch.no_grad(), vitkern.use_backend(backend):
        serial = [model(x) for x in inputs]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(tid: int) -> None:
        try:
            with torch.no_grad(), vitkern.use_backend(backend):
                for i in range(tid, len(inputs), 4):
                    for _ in range(3):
                        results[(i, _)] = model(inputs[i])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert len(results) == 3 * len(inputs)
    for (i, _), out in results.items():
        assert torch.equal(out, serial[i]), f"input {i}: threaded result differs from serial"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend not built")
@pytest.mark.skipif(
    "libasan" in __import__("os").environ.get("LD_PRELOAD", ""),
    reason="under AddressSanitizer freed blocks stay resident in its quarantine (256 MB by default), so RSS "
    "grows with the number of frees, not with leaks; the plain test run measures RSS",
)
def test_ten_thousand_cpu_calls_keep_rss_flat(gen):
    q, k, v = (t.requires_grad_() for t in _qkv(gen, B=1))
    om = _omega(gen).requires_grad_()
    x = torch.randn(5, 16, generator=gen)
    ps = [torch.randn(*s, generator=gen) * 0.2 for s in ((16,), (16,), (32, 16), (32,), (16, 32), (16,))]

    def call(i: int) -> None:
        if i % 4 == 0:
            _attn(q, k, v, om, "cpu").sum().backward()
        else:
            with torch.no_grad():
                _attn(q, k, v, om, "cpu")
                layernorm_mlp(x, *ps, backend="cpu")

    for i in range(1000):  # warm-up: allocator pools, autograd caches
        call(i)
    before = _rss_mib()
    for i in range(10_000):
        call(i)
    growth = _rss_mib() - before
    assert growth < 8.0, f"resident memory grew {growth:.1f} MiB over 10,000 calls"
