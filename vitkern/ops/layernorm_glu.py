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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitkern import _backend
from vitkern._ext import load_extension
from vitkern.ops._autograd import mark_saved_outputs, no_autocast
from vitkern.ops._kernels import Kernels, kernels_of, register_kernels
from vitkern.ops._validate import check_tensor, cpu_gemm_kernel_auto_skip

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
    """The autograd return: one entry per op input (16), None where no gradient applies."""
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
        *(None,) * 7,  # eps, act, rms, gate_first, residual, save, backend
    )


# ----------------------------------------------------------------------------- shared with layernorm_mlp
@dataclass(frozen=True)
class LnMlpKernels(Kernels):
    """A backend's kernels of layernorm_mlp or its gated form (the custom ops' forward returns
    (out, mean, rstd, pre, act_out, ln_out) on every backend; the fake branches on these flags)."""

    # True: the forward saves pre-activation, activation output and norm output in fp32 (the cpu
    # kernels); False: pre-activation only, in x's dtype, and two empty tensors (the Triton
    # kernels recompute the rest from pre and the statistics).
    saves_activations: bool = False
    # x's rows must be contiguous (reshape's view made contiguous before the custom op).
    contiguous_rows: bool = False


def flatten_rows(x: torch.Tensor, contiguous_rows: bool) -> torch.Tensor:
    """x as (tokens, dim): a view where possible, copied when the kernel needs unit-stride rows."""
    x2 = x.reshape(-1, x.shape[-1])
    if contiguous_rows and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether the forward must save the backward's tensors (a gradient is wanted)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def saved_fake(x: torch.Tensor, k: LnMlpKernels, save: bool, pre_cols: int, act_cols: int) -> list[torch.Tensor]:
    """The fake (pre, act_out, ln_out) of a forward on the kernels ``k``."""
    M, D = x.shape[0], x.shape[1]
    if k.saves_activations:
        f32 = dict(dtype=torch.float32)
        return [x.new_empty(s if save else (0,), **f32) for s in ((M, pre_cols), (M, act_cols), (M, D))]
    return [x.new_empty((M, pre_cols) if save else (0,)), x.new_empty(0), x.new_empty(0)]


_TRITON_MAX_DIM: list[int] = []


def _triton_max_dim() -> int:
    if not _TRITON_MAX_DIM:
        from vitkern.triton_kernels.layernorm_mlp import MAX_DIM

        _TRITON_MAX_DIM.append(MAX_DIM)
    return _TRITON_MAX_DIM[0]


def triton_lnmlp_supports(x, *args) -> str | None:
    """The Triton LayerNorm kernels' dimension limit (plain and gated MLP alike)."""
    max_dim = _triton_max_dim()
    if x.shape[-1] > max_dim:
        return f"dim {x.shape[-1]} is above the Triton LayerNorm kernels' limit {max_dim}"
    return None


if _backend.backend_status("triton") is None:
    # Where the Triton backend can run, read its limit now: the dispatch check runs inside
    # torch.compile's trace, which must not import (fullgraph=True).
    _triton_max_dim()


# ----------------------------------------------------------------------------- kernels per backend
# forward(x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, gate_first,
# residual, save) -> (out, mean, rstd, pre (M, 2H), gated activation (M, H), norm output (M, D)), the
# last three empty unless ``save`` (and the last two always on Triton); backward(dout, x, ln_weight,
# ln_bias, w1a, w1b, fc2_weight, mean, rstd, pre, hidden, ln_out, act, rms, gate_first, residual)
# -> (dx, dlnw, dlnb, dw1a, db1a, dw1b, db1b, dw2, db2), None where no gradient applies.
def _cpu_forward(x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, w2, b2, eps, act, rms, gate_first, residual, save):
    ext = load_extension()
    return ext.layernorm_glu_forward(
        x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, w2, b2, eps, act, rms, gate_first, residual, save
    )


def _cpu_backward(dout, x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, hidden, ln_out, *flags):
    ext = load_extension()
    return ext.layernorm_glu_backward(
        dout, x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, hidden, ln_out, *flags
    )


def _triton_forward(x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, w2, b2, eps, act, rms, gate_first, residual, save):
    from vitkern.triton_kernels.layernorm_glu import layernorm_glu_fwd

    out, mean, rstd, pre = layernorm_glu_fwd(
        x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, w2, b2, eps, act, rms, gate_first, residual, save
    )
    return out, mean, rstd, pre, x.new_empty(0), x.new_empty(0)


def _triton_backward(dout, x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, hidden, ln_out, *flags):
    from vitkern.triton_kernels.layernorm_glu import layernorm_glu_bwd

    # hidden and ln_out are the forward's empty tensors: the kernel recomputes them.
    return layernorm_glu_bwd(dout, x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, *flags)


_KERNELS: dict[str, LnMlpKernels] = {
    "cpu": LnMlpKernels(_cpu_forward, _cpu_backward, auto_skip=cpu_gemm_kernel_auto_skip, saves_activations=True),
    "triton": LnMlpKernels(_triton_forward, _triton_backward, supports=triton_lnmlp_supports, contiguous_rows=True),
}


# ----------------------------------------------------------------------------- the custom ops
# One forward and one backward custom op for every backend in _KERNELS.
@torch.library.custom_op("vitkern::layernorm_glu", mutates_args=())
def _layernorm_glu_op(
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, mean, rstd, pre-activation (M, 2H), gated activation (M, H), norm output (M, D))."""
    with no_autocast(x.device.type):
        return tuple(
            kernels_of(_KERNELS, backend).forward(
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


@_layernorm_glu_op.register_fake
def _(
    x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, gate_first, residual, save, backend
):
    M, Hd = x.shape[0], fc2_weight.shape[1]
    stats = [x.new_empty((M,), dtype=torch.float32) for _ in range(2)]
    return (x.new_empty(x.shape), *stats, *saved_fake(x, kernels_of(_KERNELS, backend), save, 2 * Hd, Hd))


@torch.library.custom_op("vitkern::layernorm_glu_backward", mutates_args=())
def _layernorm_glu_backward_op(
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
    backend: str,
) -> list[torch.Tensor]:
    with no_autocast(x.device.type):  # the cpu kernel's aten::mm calls must not be autocast to bf16
        grads = kernels_of(_KERNELS, backend).backward(
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


@_layernorm_glu_backward_op.register_fake
def _(
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
    backend,
):
    return _grads_fake(x, ln_weight, ln_bias, w1a, w1b, fc2_weight)


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, w2, b2, eps, act, rms, gate_first, residual, save, backend = inputs
    _, mean, rstd, pre, hidden, ln_out = output
    ctx.save_for_backward(x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, hidden, ln_out)
    mark_saved_outputs(ctx, output)
    ctx.flags = (act, rms, gate_first, residual)
    ctx.has_bias = (b1a is not None, b1b is not None, b2 is not None)
    ctx.backend = backend


def _backward(ctx, dout, *_grads_of_saved):
    if dout is None:  # the output took no part in the loss
        return (None,) * 16
    x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, hidden, ln_out = ctx.saved_tensors
    if pre.numel() == 0 and x.numel() != 0:
        raise RuntimeError("layernorm_mlp: backward needs the forward to run with save=True (a gradient was wanted)")
    grads = _layernorm_glu_backward_op(
        dout.contiguous(), x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, hidden, ln_out, *ctx.flags, ctx.backend
    )
    return _grad_tuple(grads, ln_weight, ln_bias, w1b, ctx.has_bias)


_layernorm_glu_op.register_autograd(_backward, setup_context=_setup_context)


def _call(
    backend, x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, gate_first, residual
):
    """Flatten x to (tokens, dim), decide whether the backward's tensors are saved, run the op."""
    params = (ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias)
    x2 = flatten_rows(x, kernels_of(_KERNELS, backend).contiguous_rows)
    save = wants_grad(x, *params)
    out = _layernorm_glu_op(x2, *params, eps, act, rms, gate_first, residual, save, backend)[0]
    return out.reshape(x.shape)


register_kernels("layernorm_mlp_gated", _KERNELS, _call)


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
