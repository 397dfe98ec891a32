"""The one-call inference block (csrc/vitkern/block_cpu.cpp, vitkern.models.layers.inference_block).

In plain eager fp32 CPU inference each vitkern Block runs as one ``block_forward`` call: norm1 as
the qkv GEMM's prologue, the attention, proj with the residual, then the fused MLP. These tests
check it against float64 on ragged configurations (odd grids, prefix and register tokens, SP-ViT
prior blocks, head dims 16-80, no biases, batch 1), that it steps aside wherever the
module-by-module forward must run (hooks, training, autograd, autocast, the reference backend,
LayerScale, q/k norm, a subclassed Linear), that parameters it cannot take raise a clear error,
that thread counts do not change a bit, and a cold process whose first call is a timm model.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import SUBPROCESS_CWD, TOL, assert_close_rel, grid_image, small_vit, subprocess_env
from conftest import half_gemms as _mock_half_gemms

import vitkern
from vitkern._ext import extension_error, load_extension

pytestmark = pytest.mark.skipif(load_extension() is None, reason=f"_C not built: {extension_error()}")


@pytest.fixture
def calls(monkeypatch):
    """Counts block_forward calls (the ext object's attribute shadows its op lookup)."""
    ext = load_extension()
    real = ext.block_forward
    count = [0]

    def counting(*args):
        count[0] += 1
        return real(*args)

    monkeypatch.setattr(ext, "block_forward", counting, raising=False)
    return count


CONFIGS = [
    # name, ViT kwargs, batch, image
    ("vit_tiny_197", dict(embed_dim=96, depth=2, num_heads=3), 1, 224),  # N = 197, Dh 32
    ("odd_grid_registers", dict(embed_dim=64, depth=2, num_heads=4, reg_tokens=4, img_size=(80, 112)), 3, (80, 112)),
    ("no_class_token_avg", dict(embed_dim=80, depth=2, num_heads=1, class_token=False, global_pool="avg"), 2, 96),
    ("no_biases", dict(embed_dim=48, depth=2, num_heads=3, qkv_bias=False, proj_bias=False), 2, 64),
    ("sp_vit", dict(embed_dim=64, depth=3, num_heads=2, spatial_prior=True, sp_layers=2), 2, 112),
    ("sp_vit_batch1_odd", dict(embed_dim=96, depth=2, num_heads=2, spatial_prior=True, img_size=(48, 80)), 1, (48, 80)),
]


_model, _image = small_vit, grid_image


@pytest.mark.parametrize("name,kwargs,batch,img", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_block_forward_matches_float64(name, kwargs, batch, img, calls, poison_empty):
    model = _model(kwargs, img)
    x = _image(batch, img)
    with torch.no_grad():
        out = model(x)
        assert calls[0] == len(model.blocks), "every block should have run as one call"
        assert vitkern.last_backend("sp_attention") == "cpu"
        with vitkern.use_backend("reference"):
            want = model.double()(x.double())
    assert_close_rel(out, want, TOL[torch.float32], name)


def _hooked(model):
    fired = []
    model.blocks[0].attn.register_forward_hook(lambda m, a, o: fired.append(o.shape))
    return fired


STEP_ASIDE = {
    "forward_hook_on_attn": lambda m: _hooked(m),
    "pre_hook_on_norm1": lambda m: m.blocks[1].norm1.register_forward_pre_hook(lambda mod, a: None),
    "hook_on_fc2": lambda m: m.blocks[0].mlp.fc2.register_forward_hook(lambda mod, a, o: None),
    "subclassed_qkv": lambda m: setattr(m.blocks[0].attn, "qkv", _Lora.of(m.blocks[0].attn.qkv)),
    # a forward replaced on the instance (how the benchmark's public-code SP-ViT patches attention)
    "patched_attn_forward": lambda m: _patch_forward(m.blocks[0].attn),
    "patched_fc1_forward": lambda m: _patch_forward(m.blocks[1].mlp.fc1),
}


def _patch_forward(mod):
    import types

    cls_forward = type(mod).forward
    mod.forward = types.MethodType(lambda self, *a: cls_forward(self, *a), mod)


class _Lora(nn.Linear):
    @classmethod
    def of(cls, lin):
        new = cls(lin.in_features, lin.out_features)
        new.load_state_dict(lin.state_dict())
        return new

    def forward(self, x):
        return super().forward(x) + 0.0


@pytest.mark.parametrize("case", sorted(STEP_ASIDE))
def test_hooked_or_subclassed_modules_take_the_module_path(case, calls):
    model = _model(dict(embed_dim=64, depth=2, num_heads=2), 64)
    x = _image(2, 64)
    with torch.no_grad():
        want = model(x)
        calls[0] = 0
        STEP_ASIDE[case](model)
        out = model(x)
    # the hooked / replaced block runs module by module, the other one still in one call
    assert calls[0] == 1, calls[0]
    assert_close_rel(out, want, TOL[torch.float32], case)


def _half_gemms(native: bool):
    """Pretend this CPU has (or lacks) bf16/fp16 GEMM hardware: the rule that sends half
    precision to the fp32 one-call block only where torch would emulate the half GEMMs. With
    ``native`` vitkern's own bf16 kernel is off too (a CPU with only torch's half GEMMs, as with
    VITKERN_GEMM=blas); tests/test_cpu_bf16.py covers the one-call block on that kernel."""
    return _mock_half_gemms(native)


def test_global_hooks_training_autograd_autocast_and_backends_take_the_module_path(calls):
    model = _model(dict(embed_dim=64, depth=2, num_heads=2), 64)
    x = _image(2, 64)
    with torch.no_grad():
        want = model(x)
    calls[0] = 0
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m)))
    try:
        with torch.no_grad():
            assert_close_rel(model(x), want, TOL[torch.float32], "global hook")
    finally:
        handle.remove()
    assert vitkern.models.layers.Attention in seen
    out = model(x)  # autograd: parameters require grad
    assert out.requires_grad
    assert_close_rel(out.detach(), want, TOL[torch.float32], "autograd")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _half_gemms(True):
        assert model(x).dtype == torch.bfloat16  # a CPU with bf16 GEMMs: torch's, module by module
    with torch.no_grad(), vitkern.use_backend("reference"):
        assert_close_rel(model(x), want, TOL[torch.float32], "reference backend")
    model.train()
    with torch.no_grad():
        assert_close_rel(model(x), want, TOL[torch.float32], "train mode, no drop path")
    assert calls[0] == len(model.blocks), calls[0]  # only the train-mode forward (dropout 0, drop path inert)
    calls[0] = 0
    other = _model(dict(embed_dim=64, depth=2, num_heads=2, init_values=0.5), 64)  # LayerScale
    with torch.no_grad():
        other(x)
    assert calls[0] == 0, "LayerScale"
    model.eval().blocks[0].attn.q_norm = nn.LayerNorm(32)  # timm's qk_norm, as from_timm sets it
    with torch.no_grad():
        model(x)
    assert calls[0] == 1, "q_norm: that block runs module by module, the other in one call"
    calls[0] = 0
    dp = _model(dict(embed_dim=64, depth=2, num_heads=2, drop_path_rate=0.5), 64).train()
    with torch.no_grad():
        dp(x)
    # the linear schedule gives block 0 rate 0 (one call); block 1 drops paths in training
    assert calls[0] == 1, "drop path in training must not be skipped"


HALF_CASES = [(c, mode) for c in CONFIGS for mode in ("bfloat16", "float16", "autocast")]


@pytest.mark.parametrize(
    "name,kwargs,batch,img,mode", [(*c, m) for c, m in HALF_CASES], ids=[f"{c[0]}-{m}" for c, m in HALF_CASES]
)
def test_half_precision_without_half_gemms_runs_the_block_in_fp32(name, kwargs, batch, img, mode, calls, poison_empty):
    """bf16/fp16 parameters and input, or a bf16 autocast region, on a CPU whose half GEMMs torch
    would emulate: each block is one fp32 call, the output in the dtype the module path gives,
    within the half-precision tolerance of float64."""
    model = _model(kwargs, img)
    x = _image(batch, img)
    with torch.no_grad(), vitkern.use_backend("reference"):
        want = model.double()(x.double())
    model.float()
    if mode == "autocast":
        ctx, dtype, tol = torch.autocast("cpu", dtype=torch.bfloat16), torch.bfloat16, TOL[torch.bfloat16]
        with torch.no_grad(), ctx, _half_gemms(True):
            module_path = model(x)  # torch's bf16 GEMMs, module by module
        assert calls[0] == 0
    else:
        dtype = getattr(torch, mode)
        ctx, tol = torch.autocast("cpu", enabled=False), TOL[dtype]
        model, x = model.to(dtype), x.to(dtype)
    with torch.no_grad(), ctx, _half_gemms(False):
        out = model(x)
    assert calls[0] == len(model.blocks), "every block should have run as one call"
    if mode == "autocast":
        assert out.dtype == module_path.dtype, (out.dtype, module_path.dtype)
        assert_close_rel(out.float(), module_path.float(), 2 * tol, f"{name} vs the module path")
    else:
        assert out.dtype == dtype
    assert_close_rel(out.double(), want, tol, name)


def test_half_weights_changed_through_data_are_seen():
    """The packed copy of a bf16 weight is checked against the weight itself (the tripwire for an
    in-place change through ``.data``, whose version counter the cache cannot see)."""
    model = _model(dict(embed_dim=64, depth=1, num_heads=2), 64).to(torch.bfloat16)
    x = _image(2, 64).bfloat16()
    with torch.no_grad(), _half_gemms(False):
        model(x)  # packs (where the packed route is on)
        model.blocks[0].mlp.fc1.weight.data.mul_(-2.0)
        model.blocks[0].attn.qkv.weight.data.mul_(0.5)
        out = model(x)
        with vitkern.use_backend("reference"):
            want = model.double()(x.double())
    assert_close_rel(out.double(), want, TOL[torch.bfloat16], "after the in-place change")


def test_parameters_of_another_dtype_raise_a_clear_error():
    model = _model(dict(embed_dim=64, depth=1, num_heads=2), 64)
    model.blocks[0].mlp.fc1.bias.data = model.blocks[0].mlp.fc1.bias.data.double()
    with torch.no_grad(), pytest.raises(RuntimeError, match="fc1_bias must be float32"):
        model(_image(1, 64))
    half = _model(dict(embed_dim=64, depth=1, num_heads=2), 64).bfloat16()
    half.blocks[0].attn.proj.bias.data = half.blocks[0].attn.proj.bias.data.float()
    with torch.no_grad(), _half_gemms(False), pytest.raises(RuntimeError, match="proj_bias must be bfloat16 like x"):
        half(_image(1, 64).bfloat16())


def test_bad_block_forward_arguments_raise():
    ext = load_extension()
    D = 32
    w = lambda *s: torch.randn(*s)  # noqa: E731
    args = [w(1, 5, D), None, None, 1e-6, w(3 * D, D), None, None, w(D, D), None, None, None, 1, 1, 0, 4, 0.3]
    args += [None, None, 1e-6, w(64, D), None, None, w(D, 64), None, None, 1]
    assert ext.block_forward(*args).shape == (1, 5, D)
    bad = list(args)
    bad[4] = w(3 * D, D + 1)
    with pytest.raises(RuntimeError, match=r"qkv_weight"):
        ext.block_forward(*bad)
    bad = list(args)
    bad[14] = 5
    with pytest.raises(RuntimeError, match=r"heads must divide dim 32"):
        ext.block_forward(*bad)
    bad = list(args)
    bad[10], bad[11], bad[12] = torch.ones(4, 3, 3), 2, 2  # a prior whose grid does not match 5 tokens
    with pytest.raises(RuntimeError, match=r"grid"):
        ext.block_forward(*bad)


def test_block_forward_is_bitwise_the_same_on_any_thread_count(calls):
    model = _model(dict(embed_dim=192, depth=2, num_heads=3, spatial_prior=True, sp_layers=1), 224)
    x = _image(2, 224)
    prev = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(model(x))
    finally:
        torch.set_num_threads(prev)
    assert calls[0] == 3 * len(model.blocks)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# A fresh process: block_forward calls counted in n[0], a timm ViT-S (10 classes) as ref, its vitkern copy as model.
_COLD_SETUP = r"""
import torch, timm, vitkern
from vitkern._ext import load_extension
ext = load_extension()
real, n = ext.block_forward, [0]
def counting(*a):
    n[0] += 1
    return real(*a)
ext.block_forward = counting
torch.manual_seed(0)
ref = timm.create_model("vit_small_patch16_224", num_classes=10).eval()
model = vitkern.ViT.from_timm(ref).eval()
"""

_COLD = r"""
with torch.inference_mode():
    x = torch.randn(1, 3, 224, 224)
    out, want = model(x), ref(x)
err = ((out - want).norm() / want.norm()).item()
print(n[0], err)
assert n[0] == 12, n[0]
assert err < 1e-5, err
"""


def _run_cold(script: str) -> None:
    r = subprocess.run(
        [sys.executable, "-c", _COLD_SETUP + script],
        env=subprocess_env(),
        cwd=SUBPROCESS_CWD,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_cold_process_first_call_is_the_one_call_block_matching_timm():
    _run_cold(_COLD)


_COLD_HALF = r"""
from vitkern.ops._validate import native_half_gemm
from vitkern.ops._packed import bf16_products
x = torch.randn(1, 3, 224, 224)
rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
    out = model(x)  # the process's first forward: under autocast
    want = ref(x)
with torch.inference_mode():
    exact = ref(x)
# one call per block where torch emulates bf16 GEMMs (fp32 inside) or vitkern's bf16 kernel runs
blocks = 12 if not native_half_gemm(torch.bfloat16) or bf16_products(torch.bfloat16) else 0
print(n[0], out.dtype, rel(out, exact), rel(out, want))
assert n[0] == blocks, n[0]
import vitkern.ops._packed as packed
assert bool(packed._CACHE_BF16) == bf16_products(torch.bfloat16)  # the bf16 kernel's packed weights
assert out.dtype == want.dtype, (out.dtype, want.dtype)
# fp32 inside: within 1e-2 of fp32; bf16 products (vitkern's kernel, the attention's tiles too): in the
# band of timm's own autocast (two independent bf16 roundings of 12 blocks: 1.5-1.8e-2 here, either way)
assert rel(out, exact) < (1.25 * rel(want, exact) if bf16_products(torch.bfloat16) else 1e-2)
assert rel(out, want) < 2e-2
n[0] = 0
model, ref = model.to(torch.bfloat16), ref.to(torch.bfloat16)
with torch.inference_mode():
    out = model(x.bfloat16())
    timm_bf16 = ref(x.bfloat16())
# every weight rounded to bf16: timm's own bf16 model is the measure of that error
print(n[0], out.dtype, rel(out, exact), rel(timm_bf16, exact))
assert n[0] == blocks and out.dtype == torch.bfloat16
assert rel(out, exact) < 1.5 * rel(timm_bf16, exact) + 2e-3
"""


def test_cold_process_first_call_under_autocast_and_in_bf16_matches_timm():
    """A user's first forward under ``torch.autocast`` (and then the model in bf16): on a CPU
    without bf16 GEMMs every block runs as one fp32 call; on one with AVX512-BF16 as one call on
    vitkern's bf16 GEMM kernel; with torch's bf16 GEMMs only (no vitkern kernel), module by module."""
    _run_cold(_COLD_HALF)
