"""vitkern's bf16 GEMM kernel (csrc/vitkern/gemm.cpp: vdpbf16ps, AVX512-BF16) and the bf16
inference path built on it.

On CPUs with AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake, Sapphire Rapids and later) bf16
inference — a model in bf16, or a bf16 autocast region — runs the cpu kernels with their weight
GEMMs on bf16 operands summed in fp32: each weight packed once as bf16 k-pairs and cached, the
activations rounded to bf16 as they enter a GEMM, everything between the GEMMs (LayerNorm,
attention, GELU, residual adds) in fp32. These tests check the packed layout bit for bit, the
GEMM against float64 on ragged shapes, the tripwire for weights changed behind the cache's back,
that whole models (ViT and SP-ViT configurations) match float64 within the bf16 tolerance with
every block on the kernel, that the fused ops take it only for inference, and that bad packed
weights raise. Without AVX512-BF16 only the layout test runs; the route is then off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close_rel, grid_image, half_gemms, rel_err, run_python, small_vit

import vitkern
from vitkern._ext import extension_error, load_extension
from vitkern.ops import _packed

pytestmark = pytest.mark.skipif(load_extension() is None, reason=f"_C not built: {extension_error()}")
needs_bf16 = pytest.mark.skipif(
    load_extension() is None or not _packed.bf16_products(torch.bfloat16),
    reason="vitkern's bf16 GEMM kernel needs a CPU with AVX512-BF16 (and VITKERN_GEMM not 'blas')",
)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,k", [(16, 2), (17, 9), (5, 3), (48, 131), (1152, 384), (3, 1)])
def test_bf16_packed_layout_is_exact(n, k):
    """16-row panels, K padded to even, the k-pairs of the 16 rows interleaved; values rounded to
    nearest-even bf16 as torch rounds them; zeros past n and in the pad column."""
    w = _randn(n, k) * 3
    kp, panels = k + k % 2, (n + 15) // 16
    ref = torch.zeros(panels * 16, kp, dtype=torch.bfloat16)
    ref[:n, :k] = w.bfloat16()
    expected = ref.reshape(panels, 16, kp // 2, 2).permute(0, 2, 1, 3).reshape(-1)
    got = load_extension().pack_gemm_weight_bf16(w)
    assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), expected.view(torch.int16))
    # a bf16 weight packs to the same bits
    assert torch.equal(load_extension().pack_gemm_weight_bf16(w.bfloat16()).view(torch.int16), got.view(torch.int16))


SHAPES = [
    (1, 1, 1),  # one row, one pair with its pad
    (5, 3, 17),  # odd K, a panel pair + 1 column
    (13, 40, 33),  # 12 + 1 rows, pair + 1-column panel
    (25, 300, 48),  # a pair + a lone full panel
    (37, 257, 80),  # odd K, two pairs + a lone panel
    (197, 384, 1152),  # ViT-S qkv at N = 197
    (197, 1536, 384),  # fc2: K in three blocks of 512
    (300, 1031, 100),  # odd K past two blocks, ragged last panel, row tiles
    (250, 2048, 100),  # bf16 rows 4 KB apart (one L1 set): A blocks copied to a padded stride
    (11, 40, 115),  # 6 + 5 rows in 64-column groups, then a pair and a 3-column panel
    (7, 1100, 128),  # two 64-column groups over three K blocks, 6 + 1 rows
]


@needs_bf16
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_matches_float64(M, K, N, bias, poison_empty):
    """The product of the bf16-rounded operands, summed in fp32: within fp32 accuracy of the float64
    product of the same bf16 values (fp32 input and output), and within bf16 rounding of it with
    bf16 input and output."""
    ext = load_extension()
    x, w = _randn(M, K, seed=1), _randn(N, K, seed=2) * K**-0.5
    b = _randn(N, seed=3) if bias else None
    wp = ext.pack_gemm_weight_bf16(w)
    ref = F.linear(x.bfloat16().double(), w.bfloat16().double(), b.double() if bias else None)
    out = ext.linear_forward(x, w, b, wp)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert_close_rel(out, ref, TOL[torch.float32], "fp32 in, bf16 products")
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16() if bias else None
    ref_b = F.linear(xb.double(), wb.double(), bb.double() if bias else None)
    out_b = ext.linear_forward(xb, wb, bb, ext.pack_gemm_weight_bf16(wb))
    assert out_b.dtype == torch.bfloat16
    assert_close_rel(out_b.double(), ref_b, 2**-8, "bf16 in and out")


@needs_bf16
def test_bf16_linear_is_bitwise_the_same_on_any_thread_count():
    ext = load_extension()
    x, w, b = _randn(1576, 384, seed=1), _randn(1536, 384, seed=2) * 0.05, _randn(1536, seed=3)
    wp = ext.pack_gemm_weight_bf16(w)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.linear_forward(x, w, b, wp)
        torch.set_num_threads(2)
        two = ext.linear_forward(x, w, b, wp)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two)


@needs_bf16
def test_bf16_weight_changed_behind_the_cache_is_seen():
    """A packed copy that no longer matches its weight (changed through ``.data``, which the
    cache's version check cannot see) is caught by the C++ tripwire: the call computes from the
    weight itself."""
    ext = load_extension()
    x, w = _randn(20, 64, seed=1), _randn(40, 64, seed=2)
    wp = ext.pack_gemm_weight_bf16(w)
    w.mul_(-2.0)
    ref = F.linear(x.double(), w.double())
    assert_close_rel(ext.linear_forward(x, w, None, wp), ref, TOL[torch.float32], "after the change")


@needs_bf16
def test_bad_bf16_packed_weights_raise():
    ext = load_extension()
    x, w = _randn(3, 6), _randn(5, 6)
    with pytest.raises(RuntimeError, match="weight_packed must be a contiguous 1-D tensor of 96 elements"):
        ext.linear_forward(x, w, None, torch.zeros(20, dtype=torch.bfloat16))
    code = (
        "import torch; from vitkern._ext import load_extension; e = load_extension(); "
        "w = torch.randn(5, 6); e.linear_forward(torch.randn(3, 6), w, None, e.pack_gemm_weight_bf16(w))"
    )
    r = run_python(["-c", code], VITKERN_GEMM="blas")
    assert r.returncode != 0 and "the bf16 GEMM route is not active on this CPU" in r.stderr, r.stderr[-2000:]


CONFIGS = [
    # name, ViT kwargs, batch, image
    ("vit_tiny_197", dict(embed_dim=96, depth=2, num_heads=3), 1, 224),  # N = 197, Dh 32
    ("odd_grid_registers", dict(embed_dim=64, depth=2, num_heads=4, reg_tokens=4, img_size=(80, 112)), 3, (80, 112)),
    ("no_biases_dh128", dict(embed_dim=128, depth=2, num_heads=1, qkv_bias=False, proj_bias=False), 2, 64),
    ("sp_vit", dict(embed_dim=64, depth=3, num_heads=2, spatial_prior=True, sp_layers=2), 2, 112),
    ("sp_vit_batch1_odd", dict(embed_dim=96, depth=2, num_heads=2, spatial_prior=True, img_size=(48, 80)), 1, (48, 80)),
    # odd width (75 = 3 heads x 25): the bf16 A rows of qkv, proj and fc1 carry a zero pad column
    ("odd_width", dict(embed_dim=75, depth=2, num_heads=3), 2, 64),
    # 651 tokens: two key blocks of the attention (512 + 139), the second odd (a bf16 pad key)
    ("two_key_blocks", dict(embed_dim=64, depth=1, num_heads=2, img_size=(400, 416)), 1, (400, 416)),
]


_model, _image = small_vit, grid_image


@needs_bf16
@pytest.mark.parametrize("mode", ["bfloat16", "autocast"])
@pytest.mark.parametrize("name,kwargs,batch,img", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bf16_inference_runs_every_block_on_the_bf16_kernel(name, kwargs, batch, img, mode, poison_empty, monkeypatch):
    """A model in bf16, or an fp32 model under bf16 autocast: every block is one call on bf16-packed
    weights, the output in the dtype the module path gives, within the bf16 tolerance of float64
    (of the bf16-rounded parameters, for the model in bf16) and of torch's bf16 module path."""
    ext = load_extension()
    real, calls = ext.block_forward, []

    def counting(*args):
        calls.append([a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() == 1 and a.numel() > 4096])
        return real(*args)

    model = _model(kwargs, img)
    x = _image(batch, img)
    if mode == "autocast":
        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        ctx = torch.autocast("cpu", enabled=False)
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.no_grad(), vitkern.use_backend("reference"):
        want = model.double()(x.double())
    model = model.to(x.dtype)
    with torch.no_grad(), ctx, half_gemms(True):
        module_path = model(x)  # torch's bf16 GEMMs, module by module
    _packed.clear_packed_weights()
    monkeypatch.setattr(ext, "block_forward", counting, raising=False)
    with torch.no_grad(), ctx:
        out = model(x)
    assert len(calls) == len(model.blocks), "every block should have run as one call"
    assert all(packed and all(d == torch.bfloat16 for d in packed) for packed in calls), calls  # bf16 panels
    assert out.dtype == module_path.dtype, (out.dtype, module_path.dtype)
    assert_close_rel(out.double(), want, TOL[torch.bfloat16], f"{name} {mode} vs float64")
    assert_close_rel(out.float(), module_path.float(), 2 * TOL[torch.bfloat16], f"{name} vs torch's bf16 path")


@needs_bf16
def test_fused_ops_take_the_bf16_kernel_for_inference_only():
    """``auto`` runs layernorm_mlp and patch_embed's cpu kernels on bf16 input in inference (on the
    bf16 kernel) and leaves bf16 training to torch's bf16 GEMMs (the kernels' backward is fp32)."""
    from vitkern.ops import layernorm_mlp, patch_embed

    D, Hd = 96, 384
    x = _randn(2, 197, D, seed=1).bfloat16()
    lw, lb, b1, b2 = 1 + 0.1 * _randn(D, seed=2), 0.1 * _randn(D, seed=3), _randn(Hd, seed=4), _randn(D, seed=5)
    w1, w2 = _randn(Hd, D, seed=6) * D**-0.5, _randn(D, Hd, seed=7) * Hd**-0.5
    params = [t.bfloat16() for t in (lw, lb, w1, b1, w2, b2)]
    lw_, lb_, w1_, b1_, w2_, b2_ = params
    with torch.no_grad():
        out = layernorm_mlp(x, lw_, lb_, w1_, b1_, w2_, b2_, residual=True)
    assert vitkern.last_backend("layernorm_mlp") == "cpu"
    h = F.layer_norm(x.double(), (D,), lw_.double(), lb_.double(), 1e-6)
    ref = x.double() + F.linear(F.gelu(F.linear(h, w1_.double(), b1_.double())), w2_.double(), b2_.double())
    assert out.dtype == torch.bfloat16
    assert_close_rel(out.double(), ref, TOL[torch.bfloat16], "layernorm_mlp bf16")
    w1g = w1_.clone().requires_grad_()
    layernorm_mlp(x, lw_, lb_, w1g, b1_, w2_, b2_, residual=True).float().sum().backward()
    assert vitkern.last_backend("layernorm_mlp") == "reference"
    assert w1g.grad is not None

    imgs, pw, pb = _randn(2, 3, 80, 48, seed=8).bfloat16(), (_randn(D, 3, 16, 16, seed=9) * 0.03).bfloat16(), None
    with torch.no_grad():
        tokens = patch_embed(imgs, pw, pb)
    assert vitkern.last_backend("patch_embed") == "cpu"
    ref = F.conv2d(imgs.double(), pw.double(), stride=16).flatten(2).transpose(1, 2)
    assert tokens.dtype == torch.bfloat16
    assert_close_rel(tokens.double(), ref, TOL[torch.bfloat16], "patch_embed bf16")


_ACT_REF = {1: F.gelu, 2: lambda t: F.gelu(t, approximate="tanh"), 3: lambda t: t * torch.sigmoid(1.702 * t), 4: F.silu}


@needs_bf16
@pytest.mark.parametrize(
    "M,D,Hd",
    [
        (197, 384, 1536),  # ViT-S batch 1: one K block, 17 row tiles (the last of 5 rows)
        (250, 96, 384),  # two row blocks (240 + 10)
        (37, 40, 23),  # odd hidden width: a partial last panel and the bf16 pad column
        (5, 1030, 77),  # K past one bf16 K block: the blocks summed in a buffer, then the tiles
        (250, 600, 100),  # and over two row blocks, with a lone last panel (100 = 3 pairs + 4 columns)
        (9, 41, 40),  # odd model width: the LayerNorm's bf16 rows carry a zero pad column
        (11, 40, 115),  # fc1: a 64-column group (6 + 5 rows), a pair and a 3-column panel
    ],
)
@pytest.mark.parametrize("act", [1, 2, 3, 4])
def test_bf16_mlp_hidden_goes_to_fc2_in_bf16(M, D, Hd, act, poison_empty):
    """bf16 inference's MLP: fc1's bias and activation on each product tile, the hidden rows stored
    once as bf16 for fc2 (gemm_nt_bf16_out). Against float64 on the same bf16 values, with the
    hidden activation rounded to bf16 as it enters fc2 (what the kernel and torch's bf16 GEMMs do)."""
    ext = load_extension()
    x = _randn(M, D, seed=1).bfloat16()
    w1, w2 = (_randn(Hd, D, seed=2) * D**-0.5).bfloat16(), (_randn(D, Hd, seed=3) * Hd**-0.5).bfloat16()
    b1, b2 = _randn(Hd, seed=4).bfloat16(), _randn(D, seed=5).bfloat16()
    lw, lb = (1 + 0.1 * _randn(D, seed=6)).bfloat16(), (0.1 * _randn(D, seed=7)).bfloat16()
    p1, p2 = ext.pack_gemm_weight_bf16(w1), ext.pack_gemm_weight_bf16(w2)
    h = F.layer_norm(x.double(), (D,), lw.double(), lb.double(), 1e-6).bfloat16().double()
    hid = _ACT_REF[act](F.linear(h, w1.double(), b1.double())).bfloat16().double()
    ref = x.double() + F.linear(hid, w2.double(), b2.double())
    prev = torch.get_num_threads()
    outs = []
    try:
        # one thread: row tiles (this path); two: fewer than 128 rows a thread take the column split
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = ext.layernorm_mlp_forward(
                x, lw, lb, w1, b1, None, None, w2, b2, 1e-6, act, False, 0, True, False, p1, None, p2
            )[0]
            assert out.dtype == torch.bfloat16 and out.shape == (M, D)
            assert_close_rel(out.double(), ref, TOL[torch.bfloat16], f"act {act}, {threads} thread(s)")
            outs.append(out)
        # fp32 input and output over the same bf16 panels: the same products, the output not rounded
        torch.set_num_threads(1)
        out32 = ext.layernorm_mlp_forward(
            x.float(), lw.float(), lb.float(), w1.float(), b1.float(), None, None,
            w2.float(), b2.float(), 1e-6, act, False, 0, True, False, p1, None, p2,
        )[0]  # fmt: skip
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1]), "row tiles and the column split sum the same products"
    assert out32.dtype == torch.float32
    assert torch.equal(out32.bfloat16(), outs[0])


@needs_bf16
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("D", [33, 384])
def test_bf16_norm_writes_the_gemm_rows_directly(D, affine, rms, poison_empty):
    """bf16 inference's LayerNorm / RMSNorm prologue (ln_rows_bf16) writes fc1's bf16 A rows itself:
    with and without the affine parameters, an odd width (the pad column must be zero: it meets
    the packed weight's zero pad), against float64 on the normalised rows rounded to bf16, and the
    saved statistics against float64."""
    ext = load_extension()
    M, Hd = 29, 48
    x = (3 + 2 * _randn(M, D, seed=1)).bfloat16()
    w1, w2 = (_randn(Hd, D, seed=2) * D**-0.5).bfloat16(), (_randn(D, Hd, seed=3) * Hd**-0.5).bfloat16()
    lw = (1 + 0.1 * _randn(D, seed=6)).bfloat16() if affine else None
    lb = (0.1 * _randn(D, seed=7)).bfloat16() if affine and not rms else None
    xd = x.double()
    if rms:
        h = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = h * lw.double() if affine else h
    else:
        h = F.layer_norm(xd, (D,), None if lw is None else lw.double(), None if lb is None else lb.double(), 1e-6)
    ref = xd + F.linear(F.gelu(F.linear(h.bfloat16().double(), w1.double())).bfloat16().double(), w2.double())
    p1, p2 = ext.pack_gemm_weight_bf16(w1), ext.pack_gemm_weight_bf16(w2)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out, mean, rstd = ext.layernorm_mlp_forward(
            x, lw, lb, w1, None, None, None, w2, None, 1e-6, 1, rms, 0, True, False, p1, None, p2
        )[:3]
    finally:
        torch.set_num_threads(prev)
    assert_close_rel(out.double(), ref, TOL[torch.bfloat16], f"D {D} affine {affine} rms {rms}")
    want_mean = torch.zeros(M, dtype=torch.float64) if rms else xd.mean(-1)
    want_var = xd.pow(2).mean(-1) if rms else xd.var(-1, unbiased=False)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(want_var + 1e-6), rtol=1e-5, atol=1e-6)


@needs_bf16
def test_bf16_kernel_error_is_that_of_bf16_operands():
    """The kernel rounds each activation entering a GEMM to bf16, as torch's bf16 GEMMs take it:
    its error against fp32 on a real-sized layer is that of the rounding, not more."""
    ext = load_extension()
    x, w = _randn(197, 384, seed=1), _randn(1536, 384, seed=2) * 384**-0.5
    exact = F.linear(x.double(), w.double())
    ours = ext.linear_forward(x, w, None, ext.pack_gemm_weight_bf16(w))
    torch_bf16 = F.linear(x.bfloat16(), w.bfloat16())
    assert rel_err(ours, exact) < 1.01 * rel_err(torch_bf16.float(), exact) + 1e-6


@needs_bf16
@pytest.mark.parametrize("batch", [1, 3])
def test_bf16_blocks_are_bitwise_the_same_on_any_thread_count(batch):
    """The bf16 block (its GEMMs and the attention's bf16 tiles: packed in a pass of their own at
    batch 1, per (batch, head) task at batch 3) hands out row tiles and heads dynamically; what a
    task computes must not depend on the thread count."""
    model = _model(dict(embed_dim=96, depth=2, num_heads=3), 224).to(torch.bfloat16)
    x = _image(batch, 224).bfloat16()
    prev = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(model(x))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1])


@needs_bf16
def test_bench_gemm_floor_measures_the_bf16_kernel():
    """`vitkern bench`'s bf16 GEMM floor includes vitkern's own bf16 kernel beside torch's route."""
    from vitkern.bench.baselines import gemm_routes_gflops

    routes = gemm_routes_gflops("cpu", torch.bfloat16, n=128)
    assert "vitkern packed bf16 (gemm.h)" in routes and any(k.startswith("torch.mm") for k in routes)
    assert all(g > 0 for g in routes.values())


@needs_bf16
def test_autocast_inference_packs_each_weight_once(monkeypatch):
    """Under autocast the fused ops get bf16 copies of the fp32 weights, made per call; their bf16
    panels are cached on the fp32 source, so a second forward packs nothing."""
    ext = load_extension()
    real, packs = ext.pack_gemm_weight_bf16, [0]

    def counting(w):
        packs[0] += 1
        return real(w)

    monkeypatch.setattr(ext, "pack_gemm_weight_bf16", counting, raising=False)
    model = _model(dict(embed_dim=64, depth=2, num_heads=2), 64)
    x = _image(2, 64)
    _packed.clear_packed_weights()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        first = packs[0]
        model(x)
    assert first == 1 + 4 * len(model.blocks), first  # patch projection + qkv, proj, fc1, fc2 per block
    assert packs[0] == first, (first, packs[0])
