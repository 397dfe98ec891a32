"""LayerNorm (or RMSNorm) + gated MLP (SwiGLU, GeGLU), the ``gated=`` form of
:func:`vitkern.ops.layernorm_mlp` (docs/DESIGN.md §1.4):

    y = x + fc2(act(gate) * value),   gate, value = the two fc1 projections of norm(x)

act is any of layernorm_mlp's activations, passed to the kernels as its code (1 GELU, 2 GELU
tanh, 3 QuickGELU, 4 SiLU); ``rms``: RMSNorm instead of LayerNorm (no norm bias).

The fc1 weights are taken as timm stores them (no copy per call):

* ``gated="gate_first"`` / ``"gate_last"``: one packed fc1 of 2H outputs (timm's ``GluMlp``:
  ``SwiGLUPacked`` puts the gate first, ``GeGLU`` and ``GluMlp``'s default last);
* ``gated="split"``: two (H, D) projections, the value in ``fc1_weight`` and the gate in
  ``fc1_gate_weight`` (timm's ``SwiGLU``: ``fc1_x`` and ``fc1_g``).

Internally (kernels, custom ops) fc1 is ``w1a`` (2H, D) packed with ``w1b`` None, or ``w1a``
= gate, ``w1b`` = value (H, D) each; the pre-activation is one (M, 2H) buffer in that
row order and ``gate_first`` says which half is the gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitkern import _backend
from vitkern._ext import load_extension
from vitkern.ops._autograd import mark_saved_outputs, no_autocast
from vitkern.ops._validate import (
    check_tensor,
    cpu_fp32_kernel_supports,
    cpu_gemm_kernel_auto_skip,
)

GATED = ("gate_first", "gate_last", "split")
Opt = torch.Tensor | None


def _act(code: int, t: torch.Tensor) -> torch.Tensor:
    """The activation of kernel code ``code`` in plain PyTorch (as vitkern.ops.layernorm_mlp's)."""
    if code == 1:
        return F.gelu(t)
    if code == 2:
        return F.gelu(t, approximate="tanh")
    if code == 3:
        return t * torch.sigmoid(1.702 * t)
    return F.silu(t)


def glu_reference(x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, gate_first, residual):
    """The definition of the gated op on the internal arguments (module docstring)."""
    if rms:  # timm's RmsNorm, as layernorm_mlp's reference computes it
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        h = h * ln_weight if ln_weight is not None else h
    else:
        h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    if w1b is None:
        first, second = F.linear(h, w1a, b1a).chunk(2, dim=-1)
        gate, value = (first, second) if gate_first else (second, first)
    else:
        gate, value = F.linear(h, w1a, b1a), F.linear(h, w1b, b1b)
    out = F.linear(_act(act, gate) * value, fc2_weight, fc2_bias)
    return x + out if residual else out


_backend.register_impl("layernorm_mlp_gated", "reference", glu_reference)


def _grads_fake(x, ln_weight, ln_bias, w1a, w1b, fc2_weight):
    D = x.shape[1]

    def vec(t, n):
        return x.new_empty((n,), dtype=t.dtype) if t is not None else x.new_empty(0)

    out = [
        x.new_empty(x.shape),
        vec(ln_weight, D),
        vec(ln_bias, D),
        w1a.new_empty(w1a.shape),
        x.new_empty(w1a.shape[0]),
    ]
    if w1b is None:
        out += [x.new_empty(0), x.new_empty(0)]
    else:
        out += [w1b.new_empty(w1b.shape), x.new_empty(w1b.shape[0])]
    return out + [fc2_weight.new_empty(fc2_weight.shape), x.new_empty((D,))]


def _grad_tuple(grads, ln_weight, ln_bias, w1b, has_bias):
    """The autograd return: one entry per op input (15), None where no gradient applies."""
    dx, dlnw, dlnb, dw1a, db1a, dw1b, db1b, dw2, db2 = grads
    return (
        dx,
        dlnw if ln_weight is not None else None,
        dlnb if ln_bias is not None else None,
        dw1a,
        db1a if has_bias[0] else None,
        dw1b if w1b is not None else None,
        db1b if has_bias[1] else None,
        dw2,
        db2 if has_bias[2] else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


def _setup(ctx, inputs):
    x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, w2, b2, eps, act, rms, gate_first, residual, save = inputs
    ctx.flags = (act, rms, gate_first, residual)
    ctx.has_bias = (b1a is not None, b1b is not None, b2 is not None)
    return x, ln_weight, ln_bias, w1a, w1b, w2


# ----------------------------------------------------------------------------- cpu backend (csrc)
@torch.library.custom_op("vitkern::layernorm_glu_cpu", mutates_args=(), device_types="cpu")
def _layernorm_glu_cpu(
    x: torch.Tensor,
    ln_weight: Opt,
    ln_bias: Opt,
    w1a: torch.Tensor,
    b1a: Opt,
    w1b: Opt,
    b1b: Opt,
    fc2_weight: torch.Tensor,
    fc2_bias: Opt,
    eps: float,
    act: int,
    rms: bool,
    gate_first: bool,
    residual: bool,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, mean, rstd, pre-activation (M, 2H), gated activation (M, H), LN output (M, D));
    the last three are empty unless ``save``."""
    with no_autocast("cpu"):
        return tuple(
            load_extension().layernorm_glu_forward(
                x,
                ln_weight,
                ln_bias,
                w1a,
                b1a,
                w1b,
                b1b,
                fc2_weight,
                fc2_bias,
                eps,
                act,
                rms,
                gate_first,
                residual,
                save,
            )
        )


@_layernorm_glu_cpu.register_fake
def _(x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, gate_first, residual, save):
    M, D, Hd = x.shape[0], x.shape[1], fc2_weight.shape[1]
    f32 = dict(dtype=torch.float32)
    saved = [x.new_empty(s if save else (0,), **f32) for s in ((M, 2 * Hd), (M, Hd), (M, D))]
    return (x.new_empty(x.shape), x.new_empty((M,), **f32), x.new_empty((M,), **f32), *saved)


@torch.library.custom_op("vitkern::layernorm_glu_cpu_backward", mutates_args=(), device_types="cpu")
def _layernorm_glu_cpu_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    ln_weight: Opt,
    ln_bias: Opt,
    w1a: torch.Tensor,
    w1b: Opt,
    fc2_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    pre: torch.Tensor,
    hidden: torch.Tensor,
    ln_out: torch.Tensor,
    act: int,
    rms: bool,
    gate_first: bool,
    residual: bool,
) -> list[torch.Tensor]:
    with no_autocast("cpu"):
        grads = load_extension().layernorm_glu_backward(
            dout,
            x,
            ln_weight,
            ln_bias,
            w1a,
            w1b,
            fc2_weight,
            mean,
            rstd,
            pre,
            hidden,
            ln_out,
            act,
            rms,
            gate_first,
            residual,
        )
    return [g if g is not None else x.new_empty(0) for g in grads]


@_layernorm_glu_cpu_backward.register_fake
def _(
    dout, x, ln_weight, ln_bias, w1a, w1b, fc2_weight, mean, rstd, pre, hidden, ln_out, act, rms, gate_first, residual
):
    return _grads_fake(x, ln_weight, ln_bias, w1a, w1b, fc2_weight)


def _cpu_setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, w1a, w1b, w2 = _setup(ctx, inputs)
    _, mean, rstd, pre, hidden, ln_out = output
    ctx.save_for_backward(x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, hidden, ln_out)
    mark_saved_outputs(ctx, output)


def _cpu_backward(ctx, dout, *_grads_of_saved):
    if dout is None:  # the output took no part in the loss
        return (None,) * 15
    x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, hidden, ln_out = ctx.saved_tensors
    if pre.numel() == 0 and x.numel() != 0:
        raise RuntimeError("layernorm_mlp: backward needs the forward to run with save=True (a gradient was wanted)")
    grads = _layernorm_glu_cpu_backward(
        dout.contiguous(), x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, hidden, ln_out, *ctx.flags
    )
    return _grad_tuple(grads, ln_weight, ln_bias, w1b, ctx.has_bias)


_layernorm_glu_cpu.register_autograd(_cpu_backward, setup_context=_cpu_setup_context)


def _make_impl(op, contiguous_rows: bool = False):
    """Flatten x to (tokens, dim), decide whether the backward's tensors are saved, run ``op``."""

    def impl(x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, gate_first, residual):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if contiguous_rows and x2.stride(-1) != 1:
            x2 = x2.contiguous()
        params = (ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias)
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
        out = op(x2, *params, eps, act, rms, gate_first, residual, save)[0]
        return out.reshape(shape)

    return impl


_backend.register_impl(
    "layernorm_mlp_gated", "cpu", _make_impl(_layernorm_glu_cpu), cpu_fp32_kernel_supports, cpu_gemm_kernel_auto_skip
)


# ----------------------------------------------------------------------------- triton backend
@torch.library.custom_op("vitkern::layernorm_glu_triton", mutates_args=())
def _layernorm_glu_triton(
    x: torch.Tensor,
    ln_weight: Opt,
    ln_bias: Opt,
    w1a: torch.Tensor,
    b1a: Opt,
    w1b: Opt,
    b1b: Opt,
    fc2_weight: torch.Tensor,
    fc2_bias: Opt,
    eps: float,
    act: int,
    rms: bool,
    gate_first: bool,
    residual: bool,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, mean, rstd, pre-activation (M, 2H) or empty)."""
    from vitkern.triton_kernels.layernorm_glu import layernorm_glu_fwd

    with no_autocast(x.device.type):
        return layernorm_glu_fwd(
            x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, gate_first, residual, save
        )


@_layernorm_glu_triton.register_fake
def _(x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, gate_first, residual, save):
    M, Hd = x.shape[0], fc2_weight.shape[1]
    stats = x.new_empty((M,), dtype=torch.float32)
    return (
        x.new_empty(x.shape),
        stats,
        x.new_empty((M,), dtype=torch.float32),
        x.new_empty((M, 2 * Hd) if save else (0,)),
    )


@torch.library.custom_op("vitkern::layernorm_glu_triton_backward", mutates_args=())
def _layernorm_glu_triton_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    ln_weight: Opt,
    ln_bias: Opt,
    w1a: torch.Tensor,
    w1b: Opt,
    fc2_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    pre: torch.Tensor,
    act: int,
    rms: bool,
    gate_first: bool,
    residual: bool,
) -> list[torch.Tensor]:
    from vitkern.triton_kernels.layernorm_glu import layernorm_glu_bwd

    with no_autocast(x.device.type):
        grads = layernorm_glu_bwd(
            dout, x, ln_weight, ln_bias, w1a, w1b, fc2_weight, mean, rstd, pre, act, rms, gate_first, residual
        )
    return [g if g is not None else x.new_empty(0) for g in grads]


@_layernorm_glu_triton_backward.register_fake
def _(dout, x, ln_weight, ln_bias, w1a, w1b, fc2_weight, mean, rstd, pre, act, rms, gate_first, residual):
    return _grads_fake(x, ln_weight, ln_bias, w1a, w1b, fc2_weight)


def _triton_setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, w1a, w1b, w2 = _setup(ctx, inputs)
    _, mean, rstd, pre = output
    ctx.save_for_backward(x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre)
    mark_saved_outputs(ctx, output)


def _triton_backward(ctx, dout, *_grads_of_saved):
    if dout is None:  # the output took no part in the loss
        return (None,) * 15
    x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre = ctx.saved_tensors
    if pre.numel() == 0 and x.numel() != 0:
        raise RuntimeError("layernorm_mlp: backward needs the forward to run with save=True (a gradient was wanted)")
    grads = _layernorm_glu_triton_backward(
        dout.contiguous(), x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, *ctx.flags
    )
    return _grad_tuple(grads, ln_weight, ln_bias, w1b, ctx.has_bias)


_layernorm_glu_triton.register_autograd(_triton_backward, setup_context=_triton_setup_context)


# Registered for the "triton" backend by vitkern/ops/layernorm_mlp.py, with the plain op's support
# check (the dimension limit of the LayerNorm kernels, read without an import at dispatch time).
glu_triton_impl = _make_impl(_layernorm_glu_triton, contiguous_rows=True)


# ----------------------------------------------------------------------------- validation + dispatch
def gated_args(x, gated, fc1_weight, fc1_bias, fc1_gate_weight, fc1_gate_bias, fc2_weight):
    """Check the fc1/fc2 shapes of a gated call; -> (w1a, b1a, w1b, b1b, gate_first, hidden)."""
    if gated not in GATED:
        raise ValueError(f"gated must be None or one of {GATED}, got {gated!r}")
    D = x.shape[-1]
    if gated == "split":
        check_tensor("fc1_gate_weight", fc1_gate_weight, 2, f"(hidden, {D})")
        Hd = fc1_gate_weight.shape[0]
        for name, t in (("fc1_gate_weight", fc1_gate_weight), ("fc1_weight", fc1_weight)):
            if tuple(t.shape) != (Hd, D):
                raise ValueError(f"{name} must have shape ({Hd}, {D}) with gated='split', got {tuple(t.shape)}")
        for name, t in (("fc1_gate_bias", fc1_gate_bias), ("fc1_bias", fc1_bias)):
            if t is not None:
                check_tensor(name, t, 1, f"({Hd},)")
                if t.shape[0] != Hd:
                    raise ValueError(f"{name} must have shape ({Hd},), got {tuple(t.shape)}")
        w1a, b1a, w1b, b1b, gate_first = fc1_gate_weight, fc1_gate_bias, fc1_weight, fc1_bias, True
    else:
        if fc1_gate_weight is not None or fc1_gate_bias is not None:
            raise ValueError(f"fc1_gate_weight / fc1_gate_bias are for gated='split' only, got gated={gated!r}")
        H2 = fc1_weight.shape[0]
        if fc1_weight.shape[1] != D or H2 % 2:
            raise ValueError(
                f"fc1_weight must have shape (2 * hidden, {D}) with gated={gated!r} (gate and value rows), "
                f"got {tuple(fc1_weight.shape)}"
            )
        Hd = H2 // 2
        if fc1_bias is not None:
            check_tensor("fc1_bias", fc1_bias, 1, f"({H2},)")
            if fc1_bias.shape[0] != H2:
                raise ValueError(f"fc1_bias must have shape ({H2},), got {tuple(fc1_bias.shape)}")
        w1a, b1a, w1b, b1b, gate_first = fc1_weight, fc1_bias, None, None, gated == "gate_first"
    if tuple(fc2_weight.shape) != (D, Hd):
        raise ValueError(
            f"fc2_weight must have shape ({D}, {Hd}) (hidden {Hd} of the gated fc1), got {tuple(fc2_weight.shape)}"
        )
    return w1a, b1a, w1b, b1b, gate_first, Hd
