"""Backend selection: argument, context manager, environment variable, report."""

from __future__ import annotations

import dataclasses

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


# ----------------------------------------------------------------------------- the backend table
def test_table_declares_every_backend_once():
    names = [b.name for b in vitkern.BACKEND_TABLE]
    assert tuple(names) == vitkern.BACKENDS and len(set(names)) == len(names)
    assert set(vitkern.available_backends()) == set(names)
    for b in vitkern.BACKEND_TABLE:
        assert b.dtypes and b.auto and (b.status() is None or b.status())
        with pytest.raises(dataclasses.FrozenInstanceError):
            b.name = "other"  # type: ignore[misc]


def test_auto_order_is_derived_from_the_table():
    assert vitkern.auto_order("cpu") == ("cpu", "reference")
    assert vitkern.auto_order("cuda") == ("triton", "reference")
    assert vitkern.auto_order("mps") == ("reference",)  # a device no kernel backend names
    for device in ("cpu", "cuda", "xpu"):
        expected = sorted(
            (b for b in vitkern.BACKEND_TABLE if device in b.auto or "*" in b.auto),
            key=lambda b: b.auto.get(device, b.auto.get("*")),
        )
        assert vitkern.auto_order(device) == tuple(b.name for b in expected)


def test_not_supported_reason_checks_kernel_availability_device_and_dtype(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv()
    args = (q, k, v, None, None, 0, 8**-0.5)
    assert vitkern.not_supported_reason("sp_attention", "reference", *args) is None
    triton = vitkern.not_supported_reason("sp_attention", "triton", *args)
    assert triton == vitkern.available_backends()["triton"] or "needs CUDA tensors" in triton
    assert "no cpu kernel for nonexistent" in vitkern.not_supported_reason("nonexistent", "cpu", q)
    with pytest.raises(ValueError, match="backend must be one of"):
        vitkern.not_supported_reason("sp_attention", "fast", *args)
    if vitkern.available_backends()["cpu"] is None:
        assert vitkern.not_supported_reason("sp_attention", "cpu", *args) is None
        args64 = (q.double(), k.double(), v.double(), None, None, 0, 8**-0.5)
        assert "float64" in vitkern.not_supported_reason("sp_attention", "cpu", *args64)
        # spatial_prior's cpu kernel widens the row's dtypes: a gather takes float64 too
        omega = torch.randn(2, 3, 3, dtype=torch.float64)
        assert vitkern.not_supported_reason("spatial_prior", "cpu", omega, (2, 2), 0) is None


def test_usable_backends_follow_the_rows(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    usable = vitkern.usable_backends("cpu")
    assert usable[0] == "reference" and "triton" not in usable
    assert ("cpu" in usable) == (vitkern.available_backends()["cpu"] is None)


def test_each_op_has_one_forward_and_one_backward_custom_op():
    """One custom op per computation: the backend is an argument, not part of the op's name."""
    import vitkern.ops  # noqa: F401  (registers the ops)

    for op in ("sp_attention", "patch_embed", "spatial_prior"):
        for suffix in ("", "_backward"):
            schema = str(getattr(torch.ops.vitkern, op + suffix).default._schema)
            assert schema.endswith("str backend) -> Tensor") or "str backend) -> (" in schema, schema
        for b in vitkern.BACKENDS:
            assert not hasattr(torch.ops.vitkern, f"{op}_{b}"), (op, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("native", [True, False])
def test_auto_sends_half_gemm_ops_to_torch_only_where_the_cpu_has_native_half_gemms(monkeypatch, dtype, native):
    """The cpu GEMM kernels compute in fp32, except for bf16 inference on vitkern's bf16 kernel
    (AVX512-BF16; tests/test_cpu_bf16.py). With hardware bf16/fp16 GEMMs and no such kernel
    torch's are faster and ``auto`` takes the reference path; without them (e.g. an AVX2-only
    CPU, where torch emulates them 4-7x slower than the fp32 kernel) the cpu kernel stays."""
    from vitkern.ops import _packed, _validate, layernorm_mlp

    if vitkern.available_backends()["cpu"] is not None:
        pytest.skip("cpu backend not built")
    monkeypatch.setattr(_validate, "native_half_gemm", lambda dt: native and dt == dtype)
    monkeypatch.setattr(_packed, "_BF16_ROUTE", False)  # vitkern's bf16 kernel off (VITKERN_GEMM=blas)
    D, Hd = 16, 32
    x, lw, lb, b2 = (torch.randn(2, 5, D).to(dtype), *(torch.randn(D).to(dtype) for _ in range(3)))
    w1, b1, w2 = torch.randn(Hd, D).to(dtype), torch.randn(Hd).to(dtype), torch.randn(D, Hd).to(dtype)
    layernorm_mlp(x, lw, lb, w1, b1, w2, b2)
    rec = vitkern.backend_report()["layernorm_mlp"]
    if native:
        assert rec.backend == "reference" and "native" in rec.skipped["cpu"], rec
    else:
        assert rec.backend == "cpu", rec


def test_native_half_gemm_probe_answers_for_each_dtype():
    from vitkern.ops._validate import native_half_gemm

    for dt in (torch.bfloat16, torch.float16, torch.float32):
        assert isinstance(native_half_gemm(dt), bool)
    assert native_half_gemm(torch.float32) is False
