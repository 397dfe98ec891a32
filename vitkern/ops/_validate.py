"""Input validation shared by the public ops: clear TypeError/ValueError that
name the argument and what was expected, raised before any kernel runs."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x: object, ndim: int | Sequence[int], shape_doc: str) -> torch.Tensor:
    """``x`` is a floating tensor of rank ``ndim`` (one of, if a sequence)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.dim() not in ndims:
        raise ValueError(f"{name} must have shape {shape_doc} ({' or '.join(map(str, ndims))}-D), got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def check_same(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` has ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(
                f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must share a device"
            )
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; mixed dtypes are not supported"
            )


def check_size(name: str, actual: Sequence[int], expected: Sequence[int | None], expected_doc: str) -> None:
    """``actual`` matches ``expected`` where the latter is not None."""
    ok = len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected, strict=True))
    if not ok:
        raise ValueError(f"{name} must have shape {expected_doc}, got {tuple(actual)}")


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# ----------------------------------------------------------------------------- cpu kernel dispatch rules
# The csrc CPU kernels compute in fp32 (float64 inputs go to the reference path through the backend
# table's dtypes, vitkern/_backend.py); this is their `auto_skip` rule for the GEMM ops
# (first positional argument: the op's main input).
@functools.cache
def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware (bf16: avx512_bf16 or AMX;
    fp16: AMX-FP16 or avx512_fp16), so torch's half-precision GEMMs beat an fp32 kernel."""
    cpu = getattr(torch, "cpu", None)

    def probe(name: str) -> bool:
        try:
            return bool(getattr(cpu, name)())
        except Exception:  # private torch API: absent or failing means "not known to be there"
            return False

    if dtype == torch.bfloat16:
        return probe("_is_avx512_bf16_supported") or probe("_is_amx_tile_supported")
    if dtype == torch.float16:
        try:
            fp16_onednn = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except Exception:
            fp16_onednn = False
        return probe("_is_amx_fp16_supported") or fp16_onednn
    return False


def cpu_gemm_kernel_auto_skip(x: torch.Tensor, *args: object) -> str | None:
    if x.dtype in (torch.bfloat16, torch.float16) and native_half_gemm(x.dtype):
        from vitkern.ops._autograd import eager_inference
        from vitkern.ops._packed import bf16_products

        tensors = [t for t in (x, *args) if isinstance(t, torch.Tensor)]
        if bf16_products(x.dtype) and eager_inference(*tensors):
            return None  # inference on vitkern's bf16 kernel (csrc/vitkern/gemm.h), fused
        # Measured (benchmarks/NOTES.md): with avx512_bf16 torch's bf16 GEMMs run ~3x faster than
        # the fp32 sgemm these kernels compute in, so eager wins for half-precision inputs there.
        # Without hardware support the half GEMMs are emulated and 4-7x slower than this kernel
        # (AVX2-only CPU: layernorm_mlp bf16 9.7 vs 63 ms), so the kernel stays.
        return (
            f"{x.dtype} input on a CPU with native {x.dtype} GEMMs: torch's (reference path) are faster "
            "than this fp32 kernel"
        )
    return None
