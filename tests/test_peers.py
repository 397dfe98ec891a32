"""The CPU engines the models suite compares against: each export runs and matches PyTorch.

vitkern's own SP-ViT (reference backend, plain PyTorch ops) is what a CPU user would
export to OpenVINO / ONNX Runtime, so its export is checked here end to end; the timm
ViT path runs in test_bench_cli's quick bench."""

from __future__ import annotations

import pytest
import torch

import vitkern
from vitkern import peers


@pytest.fixture(scope="module")
def sp_vit():
    torch.manual_seed(0)
    m = vitkern.create_model("sp_vit_small_patch16_224", img_size=48, depth=3, sp_layers=2).eval()
    with torch.no_grad():
        for blk in m.blocks:  # a non-trivial prior, not the all-ones init
            if blk.attn.spatial_relation is not None:
                blk.attn.spatial_relation.w2.normal_(std=0.05)
    return m


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_sp_vit_exports_and_matches(engine, sp_vit):
    pytest.importorskip(engine)
    x = torch.randn(2, 3, 48, 48)
    runner = peers.onnxruntime_runner if engine == "onnxruntime" else peers.openvino_runner
    with vitkern.use_backend("reference"):
        run, err = runner(sp_vit, x, threads=1)
        want = sp_vit(x)
    assert err <= 1e-4
    got = torch.as_tensor(run())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_missing_engine_is_reported(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(peers.PeerUnavailable, match="pip install onnxruntime"):
        peers.onnxruntime_runner(torch.nn.Linear(4, 2), torch.randn(1, 4), threads=1)
