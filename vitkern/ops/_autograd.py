"""Autograd glue shared by the custom ops."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.weak import WeakIdKeyDictionary


def mark_saved_outputs(ctx, output) -> None:
    """Outputs after the first exist only so that the backward can have them (statistics, saved
    activations, log-sum-exp): mark them non-differentiable and stop autograd materialising zero
    gradients for them. For layernorm_mlp at 8 x 197 tokens, D 384 those zeros were five buffers,
    2 x 9.7 MB, per backward: 12 ms of 53 (benchmarks/NOTES.md, third pass). The backward then gets
    ``None`` for an unused first output as well."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def eager_inference(*tensors: torch.Tensor | None) -> bool:
    """Whether a call with these tensors is plain eager inference: no gradient wanted, no
    torch.compile / export / jit trace, no torch function or dispatch mode (FakeTensor,
    FlopCounter, ...), plain tensors or Parameters only. There a cpu kernel can be called
    directly, outside the custom op's machinery; everywhere else the custom op runs."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return False
        if grad and t.requires_grad:
            return False
    return True


# ----------------------------------------------------------------------------- autocast
# The rule every vitkern op follows inside a ``torch.autocast`` region for its inputs' device:
# floating inputs other than float64 are cast to the autocast dtype (weights too, as autocast
# does for ``F.linear``), except the exceptions an op documents (sp_attention's omega stays
# fp32), and the op body, forward and backward, runs with autocast off. The kernels then see
# one dtype they were written for, and the ATen calls inside them (``aten::mm`` in the cpu
# kernels' backward, the reference path's matmuls) are not re-cast behind their back.


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or ``None`` outside an autocast region."""
    if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(dtype: torch.dtype | None, t):
    """``t`` in ``dtype`` if it is a floating tensor other than float64 (autocast's eligibility).
    A CPU weight's bf16 copy remembers its fp32 source (``CAST_SOURCE``), so that the bf16 packed
    weights of the cpu kernels are cached on the source, not packed anew for every call's copy."""
    if dtype is None or not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    out = t.to(dtype)
    if dtype == torch.bfloat16 and t.dtype == torch.float32 and t.dim() >= 2 and t.device.type == "cpu":
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():  # (eager only: the kernels' path)
            CAST_SOURCE[out] = t
    return out


# bf16 copy -> its fp32 source, for as long as the copy lives (vitkern/ops/_packed.py: packed_weight).
CAST_SOURCE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def autocast_inputs(dtype: torch.dtype | None, *tensors):
    """:func:`autocast_cast` of each argument (``None`` and non-tensors pass through)."""
    return tuple(autocast_cast(dtype, t) for t in tensors)


def no_autocast(device_type: str):
    """A context that turns autocast off for ``device_type`` (a no-op when it is off)."""
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


_AUTOCAST_DEVICES = ("cpu", "cuda")
