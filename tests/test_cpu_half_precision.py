"""bf16 under autocast on a CPU without bf16 GEMM hardware (no avx512_bf16 / AMX).

There torch emulates bf16 GEMMs at a fraction of its fp32 speed, so the models' attention linears
(qkv, proj) compute in fp32 inside an autocast region — the packed GEMM in eager inference, an fp32
``F.linear`` with autocast off under autograd (training) — and return the autocast dtype, as
autocast's own linear does. These tests pretend the CPU lacks (or has) bf16 GEMMs, so that both
rules run on any machine, and check a training step's loss and every gradient against float64.
(The one-call inference block's half-precision path is tested in test_inference_block.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._python_dispatch
from conftest import half_gemms, rel_err

import vitkern
import vitkern.ops._packed as packed


def _half_gemms(native: bool):
    return half_gemms(native)


@pytest.fixture
def fp32_linears(monkeypatch):
    """Counts the attention linears that ran as fp32 products with autocast off."""
    real, count = packed._fp32_linear, [0]

    def counting(*a):
        count[0] += 1
        out = real(*a)
        assert out.dtype == a[-1]  # the autocast dtype
        return out

    monkeypatch.setattr(packed, "_fp32_linear", counting)
    return count


class _HalfProducts(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the (last two dims of the) operand and result shapes of every matrix product that ran
    in bf16 (emulated on such a CPU)."""

    PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "linear"}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.PRODUCTS:
            ts = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            if any(t.dtype == torch.bfloat16 for t in ts):
                out = func(*args, **(kwargs or {}))
                self.shapes.append({tuple(t.shape[-2:]) for t in (*ts, out)})
                return out
        return func(*args, **(kwargs or {}))


def _model(**kw):
    torch.manual_seed(0)
    model = vitkern.ViT(img_size=64, patch_size=16, num_classes=5, embed_dim=64, depth=2, num_heads=2, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "spatial_relation.w2" in name:
                p.copy_(0.3 * torch.randn_like(p))  # a prior that is not all ones
    return model


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [{}, dict(spatial_prior=True, sp_layers=1)], ids=["vit", "sp_vit"])
def test_autocast_training_without_bf16_gemms_computes_the_linears_in_fp32(kw, fp32_linears):
    model = _model(**kw).train()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 4])
    with vitkern.use_backend("reference"):
        want_loss, want = _step(model.double(), x.double(), y)
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16), _half_gemms(False), _HalfProducts() as half:
        loss, grads = _step(model, x, y)  # backward inside the autocast region, as timm's --amp
    # the only bf16 products left are the classifier head's (5 classes), which is autocast's nn.Linear
    # (neither qkv / proj nor the SP relation MLP's backward products)
    assert all(5 in {d for shape in s for d in shape} for s in half.shapes), half.shapes
    assert fp32_linears[0] == 2 * len(model.blocks), fp32_linears[0]  # qkv and proj of every block
    assert abs(loss.item() - want_loss.item()) < 2e-2 * abs(want_loss.item())
    for name, g in grads.items():
        assert g is not None and g.dtype == torch.float32, name
        assert rel_err(g.double(), want[name]) < 5e-2, (name, rel_err(g.double(), want[name]))

    # with bf16 GEMMs in hardware the linears are autocast's own (bf16)
    fp32_linears[0] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16), _half_gemms(True):
        _step(model, x, y)
    assert fp32_linears[0] == 0


def test_autocast_inference_off_the_packed_route_uses_the_fp32_linear(fp32_linears, monkeypatch):
    """A CPU with AVX-512 but no bf16 (the packed route is off there): inference under autocast with
    a LayerScale model (module by module) still computes its linears in fp32."""
    monkeypatch.setattr(packed, "_PACKED_ROUTE", False)
    model = _model(init_values=0.5).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16), _half_gemms(False):
            out = model(x)
    assert fp32_linears[0] == 2 * len(model.blocks)
    assert rel_err(out.float(), want) < 1e-2


def test_patched_timm_model_under_autocast_takes_the_fp32_linears(fp32_linears):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5, depth=2).train()
    vitkern.patch_timm(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16), _half_gemms(False), _HalfProducts() as half:
        model(x).float().logsumexp(-1).mean().backward()
    assert fp32_linears[0] == 2 * len(model.blocks)
    weights = {(576, 192), (192, 576), (192, 192)}  # ViT-Ti qkv / proj
    assert not [s for s in half.shapes if s & weights], half.shapes


def test_relation_table_own_backward_is_the_autograd_gradient():
    """The SP relation MLP's own backward (used under CPU autocast with autograd) against
    torch.autograd.gradcheck in float64, on a grid whose offsets put hidden units on both
    sides of the ReLU."""
    from vitkern.models.layers import _RelationTable

    g = torch.Generator().manual_seed(4)
    d = torch.stack(torch.meshgrid(torch.arange(-2.0, 3.0), torch.arange(-3.0, 4.0), indexing="xy"), -1).double()
    w1, b1 = torch.randn(3, 8, 2, generator=g).double(), 0.5 * torch.randn(3, 8, generator=g).double()
    w2, b2 = torch.randn(3, 8, generator=g).double(), torch.randn(3, generator=g).double()
    args = [d] + [t.requires_grad_() for t in (w1, b1, w2, b2)]
    assert torch.autograd.gradcheck(_RelationTable.apply, args)
