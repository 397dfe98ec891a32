"""Hardening, part 1: every bad input raises TypeError/ValueError (or BackendError)
naming the argument and what was expected, before any kernel runs. One table, one
row per bad input; each row runs in this process, so a crash would be seen.
Empty batches return empty results on every backend."""

from __future__ import annotations

import re

import pytest
import torch

import vitkern
from vitkern import BackendError
from vitkern.ops import layernorm_mlp, patch_embed, sp_attention


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


Q = (2, 3, 1 + 12, 16)  # batch 2, 3 heads, class token + 3x4 grid, head dim 16
OMEGA = (3, 5, 7)


def att(q=None, k=None, v=None, omega=None, **kw):
    q = t(*Q) if q is None else q
    return sp_attention(
        q, t(*Q) if k is None else k, t(*Q) if v is None else v, t(*OMEGA) if omega is None else omega, **kw
    )


def pe(images=None, weight=None, bias=None, pos_embed=None, **kw):
    return patch_embed(
        t(2, 3, 8, 12) if images is None else images,
        t(16, 3, 4, 4) if weight is None else weight,
        bias,
        pos_embed,
        **kw,
    )


def mlp(x=None, lnw=None, fc1=None, fc2=None, b1=None, **kw):
    x = t(2, 5, 8) if x is None else x
    return layernorm_mlp(
        x,
        t(8) if lnw is None else lnw,
        t(8),
        t(32, 8) if fc1 is None else fc1,
        b1,
        t(8, 32) if fc2 is None else fc2,
        None,
        **kw,
    )


def small_vit(**kw):
    return vitkern.ViT(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, num_classes=3, **kw)


CASES = [
    # (id, call, exception, message regex)
    # ---- sp_attention
    ("attn q rank", lambda: att(q=t(2, 13, 16)), ValueError, r"q must have shape \(batch, heads, seqlen, head_dim\)"),
    ("attn q not a tensor", lambda: att(q=[[1.0]]), TypeError, r"q must be a torch.Tensor"),
    ("attn batch mismatch", lambda: att(k=t(1, 3, 13, 16)), ValueError, r"same shape.*k \(1, 3, 13, 16\)"),
    ("attn head mismatch", lambda: att(v=t(2, 2, 13, 16)), ValueError, r"same shape.*v \(2, 2, 13, 16\)"),
    ("attn head-dim mismatch", lambda: att(k=t(2, 3, 13, 8)), ValueError, r"same shape.*k \(2, 3, 13, 8\)"),
    ("attn omega heads", lambda: att(omega=t(2, 5, 7)), ValueError, r"omega must have shape \(3, 2\*gh-1, 2\*gw-1\)"),
    ("attn omega rank", lambda: att(omega=t(5, 7)), ValueError, r"omega must have shape"),
    ("attn omega even", lambda: att(omega=t(3, 4, 7), num_prefix_tokens=1), ValueError, r"omega.*odd sizes"),
    (
        "attn omega vs grid",
        lambda: att(grid=(4, 3), num_prefix_tokens=1),
        ValueError,
        r"omega must have shape \(H, 7, 5\)",
    ),
    ("attn grid vs N", lambda: att(num_prefix_tokens=0), ValueError, r"implies N = 12 tokens.*N = 13"),
    ("attn prefix negative", lambda: att(num_prefix_tokens=-1), ValueError, r"num_prefix_tokens must be >= 0"),
    ("attn prefix float", lambda: att(num_prefix_tokens=1.0), TypeError, r"num_prefix_tokens must be an int"),
    ("attn grid type", lambda: att(grid=(3.0, 4), num_prefix_tokens=1), TypeError, r"grid must be a pair of ints"),
    ("attn grid nonpositive", lambda: att(grid=(0, 4), omega=t(3, 1, 7)), ValueError, r"grid must be positive"),
    ("attn int dtype", lambda: att(q=torch.ones(Q, dtype=torch.int64)), TypeError, r"q must be float16.*int64"),
    ("attn mixed dtype", lambda: att(k=t(*Q, dtype=torch.float64)), TypeError, r"k has dtype torch.float64.*mixed"),
    ("attn device", lambda: att(v=t(*Q, device="meta")), ValueError, r"v is on meta but q is on cpu"),
    ("attn scale type", lambda: att(num_prefix_tokens=1, scale="0.1"), TypeError, r"scale must be a float"),
    ("attn backend name", lambda: att(num_prefix_tokens=1, backend="fast"), ValueError, r"backend must be one of"),
    ("attn removed cuda backend", lambda: att(num_prefix_tokens=1, backend="cuda"), ValueError, r"backend must be one"),
    ("attn omega=None is valid", lambda: sp_attention(t(*Q), t(*Q), t(*Q)), None, None),  # valid neighbour
    # ---- patch_embed
    ("pe images rank", lambda: pe(images=t(3, 8, 12)), ValueError, r"images must have shape \(batch, channels"),
    (
        "pe weight rank",
        lambda: pe(weight=t(16, 48)),
        ValueError,
        r"weight must have shape \(embed_dim, channels, P, P\)",
    ),
    ("pe non-square patch", lambda: pe(weight=t(16, 3, 4, 2)), ValueError, r"square patches"),
    ("pe channels", lambda: pe(images=t(2, 4, 8, 12)), ValueError, r"images has 4 channels but weight expects 3"),
    (
        "pe not divisible",
        lambda: pe(images=t(2, 3, 9, 12)),
        ValueError,
        r"image size \(9, 12\) is not divisible by .* 4",
    ),
    ("pe bias length", lambda: pe(bias=t(15)), ValueError, r"bias must have shape \(16,\)"),
    ("pe pos length", lambda: pe(pos_embed=t(1, 7, 16)), ValueError, r"pos_embed must have shape \(6, 16\)"),
    (
        "pe int images",
        lambda: pe(images=torch.ones(2, 3, 8, 12, dtype=torch.uint8)),
        TypeError,
        r"images must be float",
    ),
    ("pe mixed dtype", lambda: pe(weight=t(16, 3, 4, 4, dtype=torch.float16)), TypeError, r"weight has dtype"),
    ("pe device", lambda: pe(bias=t(16, device="meta")), ValueError, r"bias is on meta"),
    # ---- layernorm_mlp
    ("mlp fc1 in-dim", lambda: mlp(fc1=t(32, 7)), ValueError, r"fc1_weight must have shape \(hidden, 8\)"),
    ("mlp fc2 shape", lambda: mlp(fc2=t(8, 31)), ValueError, r"fc2_weight must have shape \(8, 32\)"),
    ("mlp ln length", lambda: mlp(lnw=t(7)), ValueError, r"ln_weight must have shape \(8,\)"),
    ("mlp bias length", lambda: mlp(b1=t(31)), ValueError, r"fc1_bias must have shape \(32,\)"),
    ("mlp approximate", lambda: mlp(approximate="fast"), ValueError, r"approximate must be one of"),
    ("mlp activation", lambda: mlp(activation="relu"), ValueError, r"activation must be one of \['gelu', "),
    ("mlp tanh silu", lambda: mlp(activation="silu", approximate="tanh"), ValueError, r"applies to GELU only"),
    ("mlp norm", lambda: mlp(norm="batchnorm"), ValueError, r"norm must be one of \['layernorm', 'rmsnorm'\]"),
    ("mlp rms bias", lambda: mlp(norm="rmsnorm"), ValueError, r"ln_bias must be None with norm='rmsnorm'"),
    ("mlp eps", lambda: mlp(eps=-1.0), ValueError, r"eps must be a positive float"),
    ("mlp int x", lambda: mlp(x=torch.ones(2, 5, 8, dtype=torch.int32)), TypeError, r"x must be float"),
    ("mlp scalar x", lambda: mlp(x=torch.tensor(1.0)), ValueError, r"x must have shape \(\.\.\., dim\)"),
    ("mlp device", lambda: mlp(fc2=t(8, 32, device="meta")), ValueError, r"fc2_weight is on meta"),
    # ---- model and backend selection
    ("vit image size", lambda: small_vit()(t(1, 3, 48, 32)), ValueError, r"does not match the model's img_size"),
    ("vit not divisible", lambda: small_vit(dynamic_img_size=True)(t(1, 3, 40, 32)), ValueError, r"not divisible"),
    ("vit channels", lambda: small_vit()(t(1, 4, 32, 32)), ValueError, r"images has 4 channels but weight expects 3"),
    ("vit images rank", lambda: small_vit()(t(3, 32, 32)), ValueError, r"images must have shape"),
    ("vit int images", lambda: small_vit()(torch.ones(1, 3, 32, 32, dtype=torch.int64)), TypeError, r"must be float"),
    ("vit unknown kwarg", lambda: small_vit(foo=1), TypeError, r"unsupported keyword arguments: \['foo'\]"),
    ("vit heads", lambda: vitkern.ViT(embed_dim=10, num_heads=3), ValueError, r"divisible by num_heads"),
    ("vit sp_layers", lambda: small_vit(spatial_prior=True, sp_layers=5), ValueError, r"sp_layers must be in"),
    (
        "vit pos_embed load",
        lambda: small_vit().load_state_dict({**small_vit().state_dict(), "pos_embed": t(1, 6, 16)}),
        ValueError,
        r"pos_embed",
    ),
    ("use_backend name", lambda: vitkern.use_backend("gpu").__enter__(), ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(case):
    _, call, exc, pattern = case
    if exc is None:
        call()  # a valid neighbour of the bad inputs: must run
        return
    with pytest.raises(exc) as info:
        call()
    assert re.search(pattern, str(info.value)), f"message {str(info.value)!r} does not match {pattern!r}"


def test_env_var_backend_is_validated(monkeypatch):
    monkeypatch.setenv("VITKERN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VITKERN_BACKEND must be one of"):
        att(num_prefix_tokens=1)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_empty_batches_return_empty_results(backend):
    if backend == "cpu" and vitkern.available_backends()["cpu"] is not None:
        pytest.skip("cpu backend not built")
    q = t(0, 3, 13, 16).requires_grad_()
    out = sp_attention(q, t(0, 3, 13, 16), t(0, 3, 13, 16), t(*OMEGA), num_prefix_tokens=1, backend=backend)
    assert out.shape == (0, 3, 13, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape
    assert pe(images=t(0, 3, 8, 12), backend=backend).shape == (0, 6, 16)
    assert mlp(x=t(0, 5, 8), backend=backend).shape == (0, 5, 8)
    with vitkern.use_backend(backend):
        assert small_vit(spatial_prior=True, sp_layers=1)(t(0, 3, 32, 32)).shape == (0, 3)


def test_auto_falls_back_and_says_so():
    out = att(
        q=t(*Q, dtype=torch.float64),
        k=t(*Q, dtype=torch.float64),
        v=t(*Q, dtype=torch.float64),
        omega=t(*OMEGA, dtype=torch.float64),
        num_prefix_tokens=1,
    )
    assert out.dtype == torch.float64
    rec = vitkern.backend_report()["sp_attention"]
    assert rec.backend == "reference"
    assert "float64" in rec.skipped["cpu"] or "not available" in rec.skipped["cpu"]
    assert "triton" not in rec.skipped or rec.skipped  # on CPU, auto never tries triton
    if vitkern.available_backends()["cpu"] is None:
        with pytest.raises(BackendError, match="float64"):
            att(
                q=t(*Q, dtype=torch.float64),
                k=t(*Q, dtype=torch.float64),
                v=t(*Q, dtype=torch.float64),
                omega=t(*OMEGA, dtype=torch.float64),
                num_prefix_tokens=1,
                backend="cpu",
            )
