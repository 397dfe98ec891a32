"""vitkern's own GEMM on prepacked weights (csrc/vitkern/gemm.h, vitkern/ops/_packed.py).

On x86 CPUs with AVX2 the cpu kernels' weight GEMMs (layernorm_mlp's fc1/fc2, the models'
attention qkv/proj in eager inference, patch_embed, the attention's tiles) run vitkern's own
micro-kernel over weights packed once and cached per weight: on AVX-512 6 x 64 tiles (12 x 32
for the last columns), on AVX2 6 x 16. These tests check the GEMM against float64 on ragged
shapes, that the cache follows every change of a weight, that the qkv/proj shortcut steps aside
wherever it must (hooks, subclasses, training, autocast, the reference backend), and that bad
inputs raise. On an AVX-512 CPU tests/test_simd_paths.py reruns this file with
VITKERN_SIMD=avx2 (the AVX2 kernel), and the last test here reruns the cpu-kernel tests on BLAS.
"""

from __future__ import annotations

import copy
import gc
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TOL, assert_close_rel, randn, run_python

import vitkern
from vitkern._ext import extension_error, load_extension
from vitkern.ops import _packed

HERE = os.path.dirname(os.path.abspath(__file__))

needs_ext = pytest.mark.skipif(load_extension() is None, reason=f"_C not built: {extension_error()}")
needs_route = pytest.mark.skipif(
    load_extension() is None or not load_extension().packed_gemm_active(),
    reason="the packed GEMM route is off (no AVX2, or VITKERN_GEMM=blas)",
)


def _avx2_here() -> bool:
    """Whether this CPU and build can run the packed route (AVX2+FMA, x86 SIMD compiled in)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and "scalar only" not in (
        load_extension().simd_paths()
    )


_python = run_python


def _linear(x, w, b):
    ext = load_extension()
    return ext.linear_forward(x, w, b, ext.pack_gemm_weight(w))


@pytest.mark.parametrize("n,k", [(16, 8), (17, 9), (5, 3), (48, 131), (1152, 384)])
def test_packed_layout_is_exact(n, k, gen):
    """pack_gemm_weight's panels hold exactly W's values in the documented layout (16 rows per
    panel, k-major, zero past n): the register-transposed full panels, the k % 8 tail and the
    partial last panel. (A wrong layout would not fail the GEMM tests: the C++ tripwire would
    see it and fall back to BLAS.)"""
    w = randn(n, k, gen=gen)
    panels = (n + 15) // 16
    ref = torch.zeros(panels * 16, k)
    ref[:n] = w
    expected = ref.reshape(panels, 16, k).permute(0, 2, 1).reshape(-1)
    assert torch.equal(load_extension().pack_gemm_weight(w), expected)


@needs_route
@pytest.mark.parametrize(
    "M,K,N",
    [
        (1, 24, 1),  # batch-1 row, one output column
        (5, 40, 17),  # fewer rows than the micro-kernel, one column past a panel
        (197, 384, 1152),  # ViT-S qkv at N = 197
        (197, 1536, 384),  # fc2: K in three blocks
        (300, 777, 100),  # K not a multiple of the block, ragged last panel, two row tiles
        (250, 2048, 100),  # rows 8 KB apart (one L1 set): A blocks copied to a padded stride
        (1000, 64, 16),  # many row tiles, exactly one panel
        (13, 40, 33),  # AVX-512: a 12-row block + 1, a panel pair + a 1-column panel
        (25, 600, 48),  # AVX-512: two K blocks (512 + 88), a pair + a lone full panel
        (37, 513, 80),  # AVX-512: K one past the block, a 64-column group + a lone panel, 6 x 6 + 1 rows
        (11, 40, 115),  # AVX-512: 6 + 5 rows, a 64-column group, a pair and a 3-column panel
        (7, 700, 128),  # AVX-512: two 64-column groups over two K blocks, 6 + 1 rows
        (100, 700, 70),  # AVX2: K <= 768 as one block, two row blocks (96 + 4), a 6-column panel
        (101, 1024, 37),  # AVX2: padded A copies over three K blocks (384 + 384 + 256), 96 + 5 rows
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_matches_float64(M, K, N, bias, gen, poison_empty):
    x, w = randn(M, K, gen=gen), randn(N, K, gen=gen) * K**-0.5
    b = randn(N, gen=gen) if bias else None
    out = _linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double() if bias else None)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert not out.isnan().any()
    # Relative to the reference, plus fp32 rounding relative to the sum of the terms' magnitudes: a
    # few-element output (M = N = 1) can cancel to near zero, where any fp32 sum is off by more than
    # 1e-5 of the result (seen once in CI: 4e-5 on a 24-term dot product).
    magnitude = F.linear(x.double().abs(), w.double().abs(), b.double().abs() if bias else None)
    err = (out.double() - ref).norm().item()
    assert err < TOL[torch.float32] * ref.norm().item() + 1e-6 * magnitude.norm().item(), (
        err,
        ref.norm().item(),
        magnitude.norm().item(),
    )


@needs_route
def test_linear_forward_with_threads_matches_one_thread(gen):
    x, w, b = randn(1576, 384, gen=gen), randn(1536, 384, gen=gen) * 0.05, randn(1536, gen=gen)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _linear(x, w, b)
        torch.set_num_threads(2)
        two = _linear(x, w, b)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two)  # row tiles are independent: bitwise the same


def _attention_grads(q, k, v, omega, grid, prefix):
    """sp_attention's gradients (q, k, v and omega when given) from the cpu kernel's backward."""
    from vitkern.ops import sp_attention

    with torch.enable_grad():
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        om = omega.detach().requires_grad_() if omega is not None else None
        out = sp_attention(*ins, om, grid=grid, num_prefix_tokens=prefix, backend="cpu")
        g = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape)
        return torch.autograd.grad(out, ins + ([om] if om is not None else []), g)


def _mlp_grads(x, *params):
    """layernorm_mlp's gradients (x and every parameter) from the cpu kernel's backward (its four
    products on the packed route)."""
    from vitkern.ops import layernorm_mlp

    with torch.enable_grad():
        ins = [t.detach().requires_grad_() for t in (x, *params)]
        out = layernorm_mlp(*ins, residual=True, backend="cpu")
        g = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape)
        return torch.autograd.grad(out, ins, g)


@needs_route
@pytest.mark.parametrize("rows", [1, 197, 1576])
def test_every_op_is_bitwise_the_same_on_any_thread_count(rows, gen):
    """The cpu kernels hand their row tiles / query blocks out dynamically (parallel_tasks) and
    size them by the thread count; what a task computes must not depend on either."""
    from vitkern.ops import layernorm_mlp, patch_embed, sp_attention

    D, Hd, heads = 384, 1536, 6
    x = randn(rows, D, gen=gen)
    lnw, lnb = 1 + 0.1 * randn(D, gen=gen), 0.1 * randn(D, gen=gen)
    w1, b1 = randn(Hd, D, gen=gen) * D**-0.5, randn(Hd, gen=gen)
    w2, b2 = randn(D, Hd, gen=gen) * Hd**-0.5, randn(D, gen=gen)
    wl, bl = randn(3 * D, D, gen=gen) * D**-0.5, randn(3 * D, gen=gen)
    n = min(rows, 197)
    # batch 1, 6 heads: one thread packs K and V per task, two and three in a pass of their own
    q, k, v = (randn(1, heads, n, 64, gen=gen) for _ in range(3))
    omega = 1 + 0.3 * randn(heads, 27, 27, gen=gen) if n == 197 else None
    grid, prefix = ((14, 14), 1) if omega is not None else (None, 0)
    imgs, wp = randn(max(1, rows // 196), 3, 224, 224, gen=gen), randn(D, 3, 16, 16, gen=gen) * 0.03
    ops = {
        "layernorm_mlp": lambda: layernorm_mlp(x, lnw, lnb, w1, b1, w2, b2, backend="cpu"),
        "linear": lambda: _linear(x, wl, bl),
        "sp_attention": lambda: sp_attention(q, k, v, omega, grid=grid, num_prefix_tokens=prefix, backend="cpu"),
        "patch_embed": lambda: patch_embed(imgs, wp, None, backend="cpu"),
        "sp_attention backward": lambda: _attention_grads(q, k, v, omega, grid, prefix),
        "layernorm_mlp backward": lambda: _mlp_grads(x, lnw, lnb, w1, b1, w2, b2),
    }
    prev = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                results[threads] = {name: f() for name, f in ops.items()}
    finally:
        torch.set_num_threads(prev)
    for threads in (2, 3):
        for name in ops:
            a, b = results[1][name], results[threads][name]
            for x1, x2 in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
                assert torch.equal(x1, x2), (name, threads)


@needs_route
def test_packed_weights_are_cached_and_follow_every_change(gen):
    m = nn.Linear(64, 48)
    x = randn(7, 64, gen=gen)

    def check(what):
        with torch.no_grad():
            out = _packed.linear(m, x)
            ref = F.linear(x.double(), m.weight.double(), m.bias.double())
        assert_close_rel(out, ref, TOL[torch.float32], what)

    check("first call")
    first = _packed.packed_weight(m.weight)
    assert _packed.packed_weight(m.weight) is first  # cached: no repack while the weight is unchanged
    with torch.no_grad():
        m.weight.mul_(2)  # tracked in-place change: the version counter moves
    assert _packed.packed_weight(m.weight) is not first
    check("after an in-place change")
    with torch.no_grad():
        m.weight.data.mul_(0.5)  # untracked (own version counter): the kernel's tripwire sees it
    check("after a change through .data")
    m.weight = nn.Parameter(randn(48, 64, gen=gen))
    check("after a new Parameter")
    m.load_state_dict({"weight": randn(48, 64, gen=gen), "bias": randn(48, gen=gen)})
    check("after load_state_dict")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(x).square().sum().backward()
    opt.step()
    check("after an optimizer step")


@needs_route
@pytest.mark.parametrize("bf16", [False, True])
def test_first_packs_sit_in_the_huge_page_arena_and_repacks_do_not(bf16, gen, monkeypatch):
    """A weight's first pack is copied into the arena (side by side with the others, in mappings
    advised for transparent huge pages); a repack after a change gets an ordinary allocation, so
    training does not fill mappings with stale packs; small weights stay where they are. Whatever
    the placement, the panels are the kernel's, bit for bit, and the products are unchanged."""
    if bf16 and not _packed.bf16_route():
        pytest.skip("no AVX512-BF16 here")
    ext = load_extension()
    pack = ext.pack_gemm_weight_bf16 if bf16 else ext.pack_gemm_weight
    arena = _packed._HugePageArena()
    monkeypatch.setattr(_packed, "_ARENA", arena)
    if not arena.enabled:
        pytest.skip("no MADV_HUGEPAGE on this platform")
    _packed.clear_packed_weights()
    big, small = nn.Linear(384, 1536), nn.Linear(64, 48)
    first = _packed.packed_weight(big.weight, bf16=bf16)
    assert first.untyped_storage().data_ptr() == arena._base.untyped_storage().data_ptr()
    assert first.data_ptr() % 64 == 0 and first.is_contiguous()
    assert torch.equal(first, pack(big.weight.detach()))
    second = _packed.packed_weight(nn.Linear(384, 1152).weight, bf16=bf16)
    assert second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()  # the same mapping
    tiny = _packed.packed_weight(small.weight, bf16=bf16)
    assert tiny.untyped_storage().data_ptr() != arena._base.untyped_storage().data_ptr()
    with torch.no_grad():
        big.weight.mul_(-0.5)
    again = _packed.packed_weight(big.weight, bf16=bf16)
    assert again.untyped_storage().data_ptr() != arena._base.untyped_storage().data_ptr()
    assert torch.equal(again, pack(big.weight.detach()))
    x = randn(197, 384, gen=gen)
    want = ext.linear_forward(x, big.weight.detach(), None, pack(big.weight.detach()))
    assert torch.equal(ext.linear_forward(x, big.weight.detach(), None, again), want)

    # the mapping is unmapped with the last weight placed in it, once the arena has let go of it
    def mapped(addr):
        with open("/proc/self/maps") as f:
            return any(int(a, 16) <= addr < int(b, 16) for a, b in (ln.split()[0].split("-") for ln in f))

    addr = first.untyped_storage().data_ptr()
    _packed.clear_packed_weights()
    assert arena._base is None and mapped(addr)
    del first
    gc.collect()
    assert mapped(addr)  # `second` still lives there
    del second
    gc.collect()
    assert not mapped(addr)


@needs_route
def test_cache_entries_go_with_their_weights_and_inference_tensors_are_not_cached(gen):
    _packed.clear_packed_weights()
    m = nn.Linear(32, 16)
    _packed.packed_weight(m.weight)
    assert len(_packed._CACHE) == 1
    del m
    gc.collect()
    assert len(_packed._CACHE) == 0
    with torch.inference_mode():
        inf = nn.Linear(32, 16)
        x = randn(3, 32, gen=gen)
        assert _packed.packed_weight(inf.weight) is None  # no version counter to watch
        out = _packed.linear(inf, x)
        assert_close_rel(out, F.linear(x.double(), inf.weight.double(), inf.bias.double()), 1e-5, "inference")
    assert len(_packed._CACHE) == 0


@needs_route
def test_the_qkv_shortcut_steps_aside(gen):
    x = randn(2, 9, 32, gen=gen)
    calls = []

    class Lora(nn.Linear):
        def forward(self, t):
            calls.append("subclass")
            return super().forward(t) + 1.0

    hooked = nn.Linear(32, 24)
    hooked.register_forward_hook(lambda mod, inp, out: calls.append("hook"))
    patched = nn.Linear(32, 24)
    patched.forward = lambda t: (calls.append("patched"), F.linear(t, patched.weight, patched.bias))[1]
    with torch.no_grad():
        _packed.linear(hooked, x)
        sub = Lora(32, 24)
        assert torch.equal(_packed.linear(sub, x), sub(x))
        _packed.linear(patched, x)  # a forward replaced on the instance runs too
    assert calls == ["hook", "subclass", "subclass", "patched"]
    # The reference backend is plain PyTorch: no packed GEMM, bitwise F.linear.
    m = nn.Linear(32, 24)
    with torch.no_grad(), vitkern.use_backend("reference"):
        assert torch.equal(_packed.linear(m, x), F.linear(x, m.weight, m.bias))
    # Training: F.linear, so the gradient flows.
    out = _packed.linear(m, x)
    assert out.grad_fn is not None
    out.sum().backward()
    assert m.weight.grad is not None
    # Autocast: the module itself, in bf16.
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert _packed.linear(m, x).dtype == torch.bfloat16


@needs_route
def test_model_inference_matches_the_blas_route(gen, monkeypatch):
    torch.manual_seed(0)
    model = vitkern.ViT(img_size=(48, 80), patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=5).eval()
    blas_model = copy.deepcopy(model)
    x = randn(2, 3, 48, 80, gen=gen)
    with torch.no_grad():
        packed = model(x)
        monkeypatch.setattr(_packed, "packed_route", lambda: False)
        blas = blas_model(x)
        with vitkern.use_backend("reference"):
            ref = blas_model.double()(x.double())
    assert_close_rel(packed, ref, 1e-5, "packed route vs float64 reference")
    assert_close_rel(blas, ref, 1e-5, "BLAS route vs float64 reference")


@needs_ext
def test_linear_forward_with_no_input_features_is_the_bias(gen):
    """in_features 0: the product is zero (BLAS would refuse the zero leading dimension and leave the
    output unwritten), on every route."""
    ext = load_extension()
    w, x, b = torch.randn(40, 0), torch.randn(5, 0), randn(40, gen=gen)
    packs = [None] + ([ext.pack_gemm_weight(w)] if ext.packed_gemm_active() else [])
    packs += [ext.pack_gemm_weight_bf16(w)] if ext.bf16_gemm_active() else []
    for wp in packs:
        assert torch.equal(ext.linear_forward(x, w, None, wp), torch.zeros(5, 40))
        assert torch.equal(ext.linear_forward(x, w, b, wp), b.expand(5, 40))


@needs_ext
def test_bad_inputs_raise_clear_errors(gen):
    ext = load_extension()
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        ext.pack_gemm_weight(torch.randn(8))
    with pytest.raises(RuntimeError, match=r"weight must have shape \(out_features, 4\)"):
        ext.linear_forward(torch.randn(3, 4), torch.randn(5, 6), None, None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ext.linear_forward(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4), None)
    if ext.packed_gemm_active():
        x, w = torch.randn(3, 4), torch.randn(5, 4)
        with pytest.raises(RuntimeError, match="weight_packed must be a contiguous fp32 1-D tensor of 64 elements"):
            ext.linear_forward(x, w, None, torch.zeros(20))
        D, H = 8, 16
        args = (torch.randn(3, D), None, None, torch.randn(H, D), None, None, None, torch.randn(D, H), None)
        with pytest.raises(RuntimeError, match="w2_packed must be"):
            ext.layernorm_mlp_forward(*args, 1e-6, 1, False, 0, True, False, None, None, torch.zeros(3))


@needs_ext
def test_vitkern_gemm_env_is_honoured_and_unknown_values_warn():
    code = "import vitkern._ext as e; print(e.load_extension().gemm_route())"

    def route(value):
        r = _python(["-W", "always", "-c", code], VITKERN_GEMM=value)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.strip(), r.stderr

    assert "packed" not in route("blas")[0]
    if _avx2_here():
        avx512 = load_extension().simd_paths().endswith("active: avx512f")  # after the VITKERN_SIMD cap
        assert f"packed {'AVX-512' if avx512 else 'AVX2'} micro-kernel" in route("vitkern")[0]
    assert "packed" in route("auto")[0] or not _avx2_here()
    _, err = route("mkl")
    assert "VITKERN_GEMM='mkl'" in err


@needs_ext
def test_the_other_route_passes_the_cpu_kernel_tests():
    """The cpu-kernel tests (layernorm_mlp, patch_embed, sp_attention: outputs and every gradient
    against float64) and the cpu model tests on the GEMM route this CPU does not take by default."""
    if load_extension().packed_gemm_active():
        other = "blas"
    elif _avx2_here():
        other = "vitkern"
    else:
        pytest.skip("no AVX2: the packed route cannot run on this CPU")
    files = [os.path.join(HERE, f) for f in ("test_cpu_kernels.py", "test_cpu_model.py", "test_cpu_sp_attention.py")]
    r = _python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *files], VITKERN_GEMM=other)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]


_COLD = r"""
import torch, timm, vitkern
from vitkern._ext import load_extension
torch.manual_seed(0)
ref = timm.create_model("vit_small_patch16_224", num_classes=10).eval()
model = vitkern.ViT.from_timm(ref).eval()
x = torch.randn(2, 3, 224, 224)
with torch.no_grad():
    out, want = model(x), ref(x)
err = ((out - want).norm() / want.norm()).item()
print(load_extension().gemm_route(), err)
assert "packed" in load_extension().gemm_route()
assert err < 1e-5, err
"""


@needs_ext
def test_cold_process_first_call_is_packed_inference_matching_timm():
    """A fresh process whose first call is a timm-converted ViT-S forward on the packed route."""
    pytest.importorskip("timm")
    if not _avx2_here():
        pytest.skip("no AVX2: the packed route cannot run on this CPU")
    r = _python(["-c", _COLD], VITKERN_GEMM="vitkern")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


@needs_route
@pytest.mark.parametrize("shape,K,N", [((5,), 7, 3), ((2, 197), 64, 192), ((1,), 40, 17), ((3, 44), 300, 100)])
def test_fp32_training_linear_is_packed_forward_and_backward(shape, K, N, gen):
    """The models' attention linears with autograd (training) on the packed route: the forward on
    the cached packed weight, dx and dW on ``packed_matmul``; every gradient against float64."""
    m = nn.Linear(K, N)
    x = randn(*shape, K, gen=gen).requires_grad_()
    out = _packed.linear(m, x)
    assert type(out.grad_fn).__name__ == "_PackedLinearBackward"
    g = randn(*out.shape, gen=gen)
    grads = torch.autograd.grad(out, (x, m.weight, m.bias), g)
    md = copy.deepcopy(m).double()
    xd = x.detach().double().requires_grad_()
    ref = md(xd)
    want = torch.autograd.grad(ref, (xd, md.weight, md.bias), g.double())
    assert_close_rel(out.detach(), ref.detach(), TOL[torch.float32], "forward")
    for name, got, exp in zip(("dx", "dW", "db"), grads, want, strict=True):
        assert got.dtype == torch.float32 and got.shape == exp.shape
        assert_close_rel(got, exp, TOL[torch.float32], name)


@needs_route
def test_training_linear_steps_aside_under_modes_and_for_other_dtypes(gen):
    from torch.utils.flop_counter import FlopCounterMode

    m = nn.Linear(16, 8)
    x = randn(4, 16, gen=gen).requires_grad_()
    with FlopCounterMode(display=False):  # a dispatch mode must see aten's linear
        assert type(_packed.linear(m, x).grad_fn).__name__ != "_PackedLinearBackward"
    md, xd = copy.deepcopy(m).double(), x.detach().double().requires_grad_()
    assert type(_packed.linear(md, xd).grad_fn).__name__ != "_PackedLinearBackward"


@needs_route
def test_packed_matmul_matches_float64_and_rejects_bad_shapes(gen):
    ext = load_extension()
    a, b, at = randn(37, 50, gen=gen), randn(50, 29, gen=gen), randn(50, 37, gen=gen)
    assert_close_rel(ext.packed_matmul(a, b, False), a.double() @ b.double(), TOL[torch.float32], "a . b")
    assert_close_rel(ext.packed_matmul(at, b, True), at.double().t() @ b.double(), TOL[torch.float32], "a^T . b")
    with pytest.raises(RuntimeError, match="do not chain"):
        ext.packed_matmul(a, randn(49, 3, gen=gen), False)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        ext.packed_matmul(randn(3, gen=gen), b, False)
