"""Backend selection: argument, context manager, environment variable, report."""

from __future__ import annotations

import pytest
import torch

import vitkern
from vitkern.ops import sp_attention


def _qkv():
    return [torch.randn(1, 2, 5, 8) for _ in range(3)]


def test_available_backends_lists_every_backend_with_a_reason():
    avail = vitkern.available_backends()
    assert set(avail) == set(vitkern.BACKENDS)
    assert avail["reference"] is None
    for name, reason in avail.items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_auto_records_choice_and_skipped_reasons():
    out = sp_attention(*_qkv())
    assert out.shape == (1, 2, 5, 8)
    rec = vitkern.backend_report()["sp_attention"]
    assert rec.requested == "auto"
    assert rec.backend == vitkern.last_backend("sp_attention") == vitkern.last_backend()
    # Every backend tried before the chosen one is listed with a reason.
    for name, reason in rec.skipped.items():
        assert name != rec.backend and reason


def test_explicit_argument_wins_over_context_and_env(monkeypatch):
    monkeypatch.setenv("VITKERN_BACKEND", "triton")
    with vitkern.use_backend("cpu"):
        sp_attention(*_qkv(), backend="reference")
    assert vitkern.last_backend("sp_attention") == "reference"


def test_context_manager_and_env_var(monkeypatch):
    monkeypatch.setenv("VITKERN_BACKEND", "reference")
    sp_attention(*_qkv())
    assert vitkern.backend_report()["sp_attention"].requested == "reference"
    monkeypatch.setenv("VITKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="VITKERN_BACKEND"):
        sp_attention(*_qkv())
    with vitkern.use_backend("reference"):  # the context beats the env var
        sp_attention(*_qkv())
        assert vitkern.last_backend() == "reference"


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        sp_attention(*_qkv(), backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"), vitkern.use_backend("fast"):
        pass


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    # CPU tensors on the triton backend without the interpreter can never run.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(vitkern.BackendError, match="backend='triton' cannot run"):
        sp_attention(*_qkv(), backend="triton")


def test_cuda_backend_name_is_gone():
    # The CUDA C++ backend was removed (CUDA tensors run on triton or reference).
    assert "cuda" not in vitkern.available_backends()
    with pytest.raises(ValueError, match="backend must be one of"):
        sp_attention(*_qkv(), backend="cuda")


def test_model_reports_backends_of_its_ops():
    m = vitkern.ViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    m(torch.randn(1, 3, 32, 32))
    assert set(vitkern.backend_report()) >= {"patch_embed", "sp_attention", "layernorm_mlp"}
