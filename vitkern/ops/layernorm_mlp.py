"""LayerNorm + MLP, the second half of a pre-norm block (docs/DESIGN.md §1.4):

y = x + fc2(act(fc1(norm(x))))      (residual=True)
y = x + fc2(act(gate) * value)      (gated=..., the GLU family: vitkern/ops/layernorm_glu.py)

norm: LayerNorm or RMSNorm; act: GELU (exact or tanh), QuickGELU or SiLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitkern import _backend
from vitkern._ext import load_extension
from vitkern.ops._autograd import autocast_dtype, autocast_inputs, mark_saved_outputs, no_autocast
from vitkern.ops._kernels import kernels_of, register_kernels
from vitkern.ops._validate import check_same, check_tensor, cpu_gemm_kernel_auto_skip
from vitkern.ops.layernorm_glu import (
    LnMlpKernels,
    flatten_rows,
    gated_args,
    glu_reference,
    saved_fake,
    triton_lnmlp_supports,
    wants_grad,
)

__all__ = ["layernorm_mlp", "layernorm_mlp_reference", "ACTIVATIONS", "NORMS"]

_APPROXIMATE = ("none", "tanh")
# Activation name -> the kernels' code (vitkern/triton_kernels/gemm.py ACT_*, csrc simd.h Act).
ACTIVATIONS = {"gelu": 1, "gelu_tanh": 2, "quick_gelu": 3, "silu": 4}
NORMS = ("layernorm", "rmsnorm")


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.silu(x)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # timm's RmsNorm: x * rsqrt(mean(x^2) + eps) * weight, in x's dtype.
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return h * weight if weight is not None else h


def layernorm_mlp_reference(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    eps: float = 1e-6,
    approximate: str = "none",
    residual: bool = True,
    activation: str = "gelu",
    norm: str = "layernorm",
    gated: str | None = None,
    fc1_gate_weight: torch.Tensor | None = None,
    fc1_gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition of :func:`layernorm_mlp` in plain PyTorch (same arguments)."""
    activation = _resolve_activation(activation, approximate)
    if gated is not None:
        w1a, b1a, w1b, b1b, gate_first, _ = gated_args(
            x, gated, fc1_weight, fc1_bias, fc1_gate_weight, fc1_gate_bias, fc2_weight
        )
        return glu_reference(
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
            ACTIVATIONS[activation],
            norm == "rmsnorm",
            gate_first,
            residual,
        )
    if norm == "rmsnorm":
        h = _rms_norm(x, ln_weight, eps)
    else:
        h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    h = _activation(activation, F.linear(h, fc1_weight, fc1_bias))
    out = F.linear(h, fc2_weight, fc2_bias)
    return x + out if residual else out


def _resolve_activation(activation: str, approximate: str) -> str:
    """``activation`` with the legacy ``approximate="tanh"`` folded in (GELU only)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if approximate not in _APPROXIMATE:
        raise ValueError(f"approximate must be one of {_APPROXIMATE}, got {approximate!r}")
    if approximate == "tanh":
        if activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f'approximate="tanh" applies to GELU only, got activation={activation!r}')
        return "gelu_tanh"
    return activation


def _check_variant(activation: str, approximate: str, norm: str, ln_bias, eps) -> str:
    """Validate the op's variant arguments; returns the activation name (approximate folded in)."""
    activation = _resolve_activation(activation, approximate)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    if norm == "rmsnorm" and ln_bias is not None:
        raise ValueError("ln_bias must be None with norm='rmsnorm' (an RMSNorm has no bias)")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return activation


def _reference_impl(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, activation, residual, norm):
    return layernorm_mlp_reference(
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, "none", residual, activation, norm
    )


_backend.register_impl("layernorm_mlp", "reference", _reference_impl)


# ----------------------------------------------------------------------------- kernels per backend
# forward(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, rms, residual,
# save) -> (out, mean, rstd, pre-activation (M, H), activation output (M, H), norm output (M, D)), the
# last three empty unless ``save`` (and the last two always on Triton); backward(dout, x, ln_weight,
# ln_bias, fc1_weight, fc2_weight, mean, rstd, pre, act_out, ln_out, act, rms, residual)
# -> (dx, dlnw, dlnb, dw1, db1, dw2, db2), None where no gradient applies. Triton's are imported on
# first use: they also run CPU tensors under the interpreter (TRITON_INTERPRET=1).
Opt = torch.Tensor | None


def _cpu_forward(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, act, rms, residual, save):
    return load_extension().layernorm_mlp_forward(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, act, rms, residual, save)


def _cpu_backward(dout, x, ln_weight, ln_bias, w1, w2, mean, rstd, pre, act_out, ln_out, act, rms, residual):
    ext = load_extension()
    return ext.layernorm_mlp_backward(
        dout, x, ln_weight, ln_bias, w1, w2, mean, rstd, pre, act_out, ln_out, act, rms, residual
    )


def _triton_forward(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, act, rms, residual, save):
    from vitkern.triton_kernels.layernorm_mlp import layernorm_mlp_fwd

    out, mean, rstd, pre = layernorm_mlp_fwd(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, act, residual, save, rms)
    return out, mean, rstd, pre, x.new_empty(0), x.new_empty(0)


def _triton_backward(dout, x, ln_weight, ln_bias, w1, w2, mean, rstd, pre, act_out, ln_out, act, rms, residual):
    from vitkern.triton_kernels.layernorm_mlp import layernorm_mlp_bwd

    # act_out and ln_out are the forward's empty tensors: the kernel recomputes them.
    return layernorm_mlp_bwd(dout, x, ln_weight, ln_bias, w1, w2, mean, rstd, pre, act, residual, rms)


_KERNELS: dict[str, LnMlpKernels] = {
    "cpu": LnMlpKernels(_cpu_forward, _cpu_backward, auto_skip=cpu_gemm_kernel_auto_skip, saves_activations=True),
    "triton": LnMlpKernels(_triton_forward, _triton_backward, supports=triton_lnmlp_supports, contiguous_rows=True),
}


# ----------------------------------------------------------------------------- the custom ops
# One forward and one backward custom op for every backend in _KERNELS: torch.compile and
# torch.export see one op (no graph break), autograd goes through register_autograd.
@torch.library.custom_op("vitkern::layernorm_mlp", mutates_args=())
def _layernorm_mlp_op(
    x: torch.Tensor,
    ln_weight: Opt,
    ln_bias: Opt,
    fc1_weight: torch.Tensor,
    fc1_bias: Opt,
    fc2_weight: torch.Tensor,
    fc2_bias: Opt,
    eps: float,
    act: int,
    rms: bool,
    residual: bool,
    save: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, mean, rstd, pre-activation, activation output, norm output): see "kernels per backend"."""
    with no_autocast(x.device.type):
        return tuple(  # a tuple: vitkern._C returns a list, which autograd would not see as six outputs
            kernels_of(_KERNELS, backend).forward(
                x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, rms, residual, save
            )
        )


@_layernorm_mlp_op.register_fake
def _(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, rms, residual, save, backend):
    M, Hd = x.shape[0], fc1_weight.shape[0]
    stats = [x.new_empty((M,), dtype=torch.float32) for _ in range(2)]
    return (x.new_empty(x.shape), *stats, *saved_fake(x, kernels_of(_KERNELS, backend), save, Hd, Hd))


@torch.library.custom_op("vitkern::layernorm_mlp_backward", mutates_args=())
def _layernorm_mlp_backward_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    ln_weight: Opt,
    ln_bias: Opt,
    fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    pre: torch.Tensor,
    act_out: torch.Tensor,
    ln_out: torch.Tensor,
    act: int,
    rms: bool,
    residual: bool,
    backend: str,
) -> list[torch.Tensor]:
    with no_autocast(x.device.type):  # the cpu kernel's aten::mm dispatcher calls must not be autocast to bf16
        grads = kernels_of(_KERNELS, backend).backward(
            dout, x, ln_weight, ln_bias, fc1_weight, fc2_weight, mean, rstd, pre, act_out, ln_out, act, rms, residual
        )
    return [g if g is not None else x.new_empty(0) for g in grads]


@_layernorm_mlp_backward_op.register_fake
def _(
    dout, x, ln_weight, ln_bias, fc1_weight, fc2_weight, mean, rstd, pre, act_out, ln_out, act, rms, residual, backend
):
    D, Hd = x.shape[1], fc1_weight.shape[0]

    def vec(t, n):
        return x.new_empty((n,), dtype=t.dtype) if t is not None else x.new_empty(0)

    return [
        x.new_empty(x.shape),
        vec(ln_weight, D),
        vec(ln_bias, D),
        fc1_weight.new_empty(fc1_weight.shape),
        x.new_empty((Hd,)),
        fc2_weight.new_empty(fc2_weight.shape),
        x.new_empty((D,)),
    ]


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, rms, residual, save, backend = inputs
    _, mean, rstd, pre, act_out, ln_out = output
    ctx.save_for_backward(x, ln_weight, ln_bias, fc1_weight, fc2_weight, mean, rstd, pre, act_out, ln_out)
    mark_saved_outputs(ctx, output)
    ctx.flags = (act, rms, residual)
    ctx.has_bias = (fc1_bias is not None, fc2_bias is not None)
    ctx.backend = backend


def _backward(ctx, dout, *_grads_of_saved):
    if dout is None:  # the output took no part in the loss
        return (None,) * 13
    x, ln_weight, ln_bias, fc1_weight, fc2_weight, mean, rstd, pre, act_out, ln_out = ctx.saved_tensors
    if pre.numel() == 0 and x.numel() != 0:
        raise RuntimeError("layernorm_mlp: backward needs the forward to run with save=True (a gradient was wanted)")
    dx, dlnw, dlnb, dw1, db1, dw2, db2 = _layernorm_mlp_backward_op(
        dout.contiguous(),
        x,
        ln_weight,
        ln_bias,
        fc1_weight,
        fc2_weight,
        mean,
        rstd,
        pre,
        act_out,
        ln_out,
        *ctx.flags,
        ctx.backend,
    )
    return (
        dx,
        dlnw if ln_weight is not None else None,
        dlnb if ln_bias is not None else None,
        dw1,
        db1 if ctx.has_bias[0] else None,
        dw2,
        db2 if ctx.has_bias[1] else None,
        *(None,) * 6,  # eps, act, rms, residual, save, backend
    )


_layernorm_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def _call(backend, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, activation, residual, norm):
    """Flatten x to (tokens, dim), decide whether the backward's tensors are saved, run the op."""
    params = (ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    x2 = flatten_rows(x, kernels_of(_KERNELS, backend).contiguous_rows)
    save = wants_grad(x, *params)
    out = _layernorm_mlp_op(x2, *params, eps, ACTIVATIONS[activation], norm == "rmsnorm", residual, save, backend)[0]
    return out.reshape(x.shape)


register_kernels("layernorm_mlp", _KERNELS, _call)


def layernorm_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    eps: float = 1e-6,
    approximate: str = "none",
    residual: bool = True,
    activation: str = "gelu",
    norm: str = "layernorm",
    backend: str = "auto",
    gated: str | None = None,
    fc1_gate_weight: torch.Tensor | None = None,
    fc1_gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``x + fc2(act(fc1(norm(x))))``, or with ``gated`` the gated MLP
    ``x + fc2(act(gate) * value)`` (SwiGLU, GeGLU; gate and value: the two fc1 projections).

    Args:
        x: (..., dim).
        ln_weight, ln_bias: (dim,) norm affine parameters, or None (an RMSNorm has no bias).
        fc1_weight: (hidden, dim); fc1_bias: (hidden,) or None.
        fc2_weight: (dim, hidden); fc2_bias: (dim,) or None.
        eps: the norm's epsilon (timm's ViT uses 1e-6).
        approximate: "none" or "tanh" (GELU only: the same as ``activation="gelu_tanh"``).
        residual: add ``x`` to the output (default True).
        activation: "gelu" (exact, erf), "gelu_tanh", "quick_gelu" (x * sigmoid(1.702 x),
            CLIP's) or "silu".
        norm: "layernorm" or "rmsnorm" (x * rsqrt(mean(x^2) + eps) * ln_weight, timm's RmsNorm).
        backend: "auto", "reference", "triton" or "cpu".
        gated: None (plain MLP), or the gated MLP with fc2_weight (dim, hidden) and fc1 as
            timm stores it: "gate_first" / "gate_last": fc1_weight (2 * hidden, dim) and
            fc1_bias (2 * hidden,) hold gate and value rows, the gate's half first or last
            (timm's GluMlp with gate_last False / True); "split": fc1_weight / fc1_bias the
            value projection (hidden, dim) / (hidden,) and fc1_gate_weight / fc1_gate_bias the
            gate projection, same shapes (timm's SwiGLU fc1_x and fc1_g).
        fc1_gate_weight, fc1_gate_bias: the gate projection, with gated="split" only.

    Under ``torch.autocast`` (for x's device) x and every parameter are cast to the
    autocast dtype (float64 excepted) and the op runs with autocast off, forward and
    backward: the GEMMs run in bf16/fp16 and the output has the autocast dtype.

    Returns:
        Same shape and dtype as ``x``.
    """
    amp = autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    if amp is not None:
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias = autocast_inputs(
            amp, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias
        )
        fc1_gate_weight, fc1_gate_bias = autocast_inputs(amp, fc1_gate_weight, fc1_gate_bias)
    check_tensor("x", x, range(1, 9), "(..., dim)")
    D = x.shape[-1]
    check_tensor("fc1_weight", fc1_weight, 2, f"(hidden, {D})")
    Hd = fc1_weight.shape[0]
    check_tensor("fc2_weight", fc2_weight, 2, f"({D}, hidden)")
    if gated is not None:
        return _layernorm_mlp_gated(
            x,
            ln_weight,
            ln_bias,
            fc1_weight,
            fc1_bias,
            fc2_weight,
            fc2_bias,
            eps,
            approximate,
            residual,
            backend,
            gated,
            fc1_gate_weight,
            fc1_gate_bias,
            activation,
            norm,
        )
    if fc1_gate_weight is not None or fc1_gate_bias is not None:
        raise ValueError("fc1_gate_weight / fc1_gate_bias are for gated='split' only, got gated=None")
    check_same(
        "x",
        x,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
        fc1_weight=fc1_weight,
        fc1_bias=fc1_bias,
        fc2_weight=fc2_weight,
        fc2_bias=fc2_bias,
    )
    if fc1_weight.shape[1] != D:
        raise ValueError(f"fc1_weight must have shape (hidden, {D}), got {tuple(fc1_weight.shape)}")
    if tuple(fc2_weight.shape) != (D, Hd):
        raise ValueError(f"fc2_weight must have shape ({D}, {Hd}), got {tuple(fc2_weight.shape)}")
    for name, t, n in (
        ("ln_weight", ln_weight, D),
        ("ln_bias", ln_bias, D),
        ("fc1_bias", fc1_bias, Hd),
        ("fc2_bias", fc2_bias, D),
    ):
        if t is not None:
            check_tensor(name, t, 1, f"({n},)")
            if t.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    activation = _check_variant(activation, approximate, norm, ln_bias, eps)
    args = (
        x,
        ln_weight,
        ln_bias,
        fc1_weight,
        fc1_bias,
        fc2_weight,
        fc2_bias,
        float(eps),
        activation,
        bool(residual),
        norm,
    )
    fn = _backend.select("layernorm_mlp", backend, x.device, *args)
    with no_autocast(x.device.type):
        if x.numel() == 0:
            return _reference_impl(*args)
        return fn(*args)


def _layernorm_mlp_gated(
    x,
    ln_weight,
    ln_bias,
    fc1_weight,
    fc1_bias,
    fc2_weight,
    fc2_bias,
    eps,
    approximate,
    residual,
    backend,
    gated,
    fc1_gate_weight,
    fc1_gate_bias,
    activation,
    norm,
):
    """The gated branch of :func:`layernorm_mlp` (x, fc1_weight, fc2_weight already checked)."""
    D = x.shape[-1]
    check_same(
        "x",
        x,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
        fc1_weight=fc1_weight,
        fc1_bias=fc1_bias,
        fc1_gate_weight=fc1_gate_weight,
        fc1_gate_bias=fc1_gate_bias,
        fc2_weight=fc2_weight,
        fc2_bias=fc2_bias,
    )
    w1a, b1a, w1b, b1b, gate_first, _ = gated_args(
        x, gated, fc1_weight, fc1_bias, fc1_gate_weight, fc1_gate_bias, fc2_weight
    )
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias), ("fc2_bias", fc2_bias)):
        if t is not None:
            check_tensor(name, t, 1, f"({D},)")
            if t.shape[0] != D:
                raise ValueError(f"{name} must have shape ({D},), got {tuple(t.shape)}")
    activation = _check_variant(activation, approximate, norm, ln_bias, eps)
    args = (
        x,
        ln_weight,
        ln_bias,
        w1a,
        b1a,
        w1b,
        b1b,
        fc2_weight,
        fc2_bias,
        float(eps),
        ACTIVATIONS[activation],
        norm == "rmsnorm",
        gate_first,
        bool(residual),
    )
    fn = _backend.select("layernorm_mlp_gated", backend, x.device, *args)
    with no_autocast(x.device.type):
        if x.numel() == 0:
            return glu_reference(*args)
        return fn(*args)
