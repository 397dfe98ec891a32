"""LayerNorm + MLP, the second half of a pre-norm block (docs/DESIGN.md §1.4):

    y = x + fc2(act(fc1(norm(x))))      the plain MLP (gated=None)
    y = x + fc2(act(gate) * value)      the gated MLP (GLU family: SwiGLU, GeGLU), gate and
                                        value the two fc1 projections of norm(x)

norm: LayerNorm or RMSNorm; act: GELU (exact or tanh), QuickGELU or SiLU (``residual=False``:
no ``x +``). A gated fc1 is taken as timm stores it (no copy per call):

* ``gated="gate_first"`` / ``"gate_last"``: one packed fc1 of 2H outputs (timm's ``GluMlp``:
  ``SwiGLUPacked`` puts the gate first, ``GeGLU`` and ``GluMlp``'s default last);
* ``gated="split"``: two (H, D) projections, the value in ``fc1_weight`` and the gate in
  ``fc1_gate_weight`` (timm's ``SwiGLU``: ``fc1_x`` and ``fc1_g``).

Internally (reference core, custom ops, kernels) both forms take one argument list: fc1 is
``w1a``/``b1a`` with ``w1b``/``b1b`` None (the plain (H, D) weight, or a packed (2H, D) one),
or ``w1a`` = gate and ``w1b`` = value, (H, D) each; ``glu`` says which form it is: GLU_NONE
(plain), GLU_GATE_FIRST or GLU_GATE_LAST (gated: the (M, 2H) pre-activation holds the gate in
its first or last H columns; split weights are gate first). ``act`` is the activation's kernel
code (ACTIVATIONS), ``rms`` picks RMSNorm (no norm bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitkern import _backend
from vitkern._ext import load_extension
from vitkern.ops._autograd import autocast_dtype, autocast_inputs, eager_inference, mark_saved_outputs, no_autocast
from vitkern.ops._kernels import Kernels, kernels_of, register_kernels
from vitkern.ops._packed import bf16_products, packed_weight
from vitkern.ops._validate import check_same, check_tensor, cpu_gemm_kernel_auto_skip

__all__ = ["layernorm_mlp", "layernorm_mlp_reference", "ACTIVATIONS", "NORMS", "GATED"]

_APPROXIMATE = ("none", "tanh")
# Activation name -> the kernels' code (vitkern/triton_kernels/gemm.py ACT_*, csrc simd.h Act).
ACTIVATIONS = {"gelu": 1, "gelu_tanh": 2, "quick_gelu": 3, "silu": 4}
NORMS = ("layernorm", "rmsnorm")
GATED = ("gate_first", "gate_last", "split")
# The internal ``glu`` argument: the plain MLP, or where the gate lies in the gated pre-activation.
GLU_NONE, GLU_GATE_FIRST, GLU_GATE_LAST = 0, 1, 2
Opt = torch.Tensor | None


def _act(code: int, t: torch.Tensor) -> torch.Tensor:
    """The activation of kernel code ``code`` in plain PyTorch."""
    if code == 1:
        return F.gelu(t)
    if code == 2:
        return F.gelu(t, approximate="tanh")
    if code == 3:
        return t * torch.sigmoid(1.702 * t)
    return F.silu(t)


def _reference(x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, glu, residual):
    """The definition of the op on the internal arguments (module docstring)."""
    if rms:  # timm's RmsNorm: x * rsqrt(mean(x^2) + eps) * weight, in x's dtype
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        h = h * ln_weight if ln_weight is not None else h
    else:
        h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    if glu == GLU_NONE:
        hidden = _act(act, F.linear(h, w1a, b1a))
    else:
        if w1b is None:
            first, second = F.linear(h, w1a, b1a).chunk(2, dim=-1)
            gate, value = (first, second) if glu == GLU_GATE_FIRST else (second, first)
        else:
            gate, value = F.linear(h, w1a, b1a), F.linear(h, w1b, b1b)
        hidden = _act(act, gate) * value
    out = F.linear(hidden, fc2_weight, fc2_bias)
    return x + out if residual else out


# Two dispatch names, one implementation: the gated form keeps its own backend record
# (vitkern.last_backend("layernorm_mlp_gated")) and its own rows in selftest and the benchmarks.
_OPS = ("layernorm_mlp", "layernorm_mlp_gated")
for _op in _OPS:
    _backend.register_impl(_op, "reference", _reference)


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
    if gated is None:
        w1a, b1a, w1b, b1b, glu = fc1_weight, fc1_bias, None, None, GLU_NONE
    else:
        w1a, b1a, w1b, b1b, glu, _ = _gated_args(
            x, gated, fc1_weight, fc1_bias, fc1_gate_weight, fc1_gate_bias, fc2_weight
        )
    fc1 = (w1a, b1a, w1b, b1b)
    flags = (ACTIVATIONS[activation], norm == "rmsnorm", glu, residual)
    return _reference(x, ln_weight, ln_bias, *fc1, fc2_weight, fc2_bias, eps, *flags)


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


def _gated_args(x, gated, fc1_weight, fc1_bias, fc1_gate_weight, fc1_gate_bias, fc2_weight):
    """Check the fc1/fc2 shapes of a gated call; -> (w1a, b1a, w1b, b1b, glu, hidden)."""
    if gated not in GATED:
        raise ValueError(f"gated must be None or one of {GATED}, got {gated!r}")
    D = x.shape[-1]
    if gated == "split":
        check_tensor("fc1_gate_weight", fc1_gate_weight, 2, f"(hidden, {D})")
        Hd = fc1_gate_weight.shape[0]
        for name, t in (("fc1_gate_weight", fc1_gate_weight), ("fc1_weight", fc1_weight)):
            if tuple(t.shape) != (Hd, D):
                raise ValueError(f"{name} must have shape ({Hd}, {D}) with gated='split', got {tuple(t.shape)}")
        _check_vectors(("fc1_gate_bias", fc1_gate_bias, Hd), ("fc1_bias", fc1_bias, Hd))
        return fc1_gate_weight, fc1_gate_bias, fc1_weight, fc1_bias, GLU_GATE_FIRST, Hd
    if fc1_gate_weight is not None or fc1_gate_bias is not None:
        raise ValueError(f"fc1_gate_weight / fc1_gate_bias are for gated='split' only, got gated={gated!r}")
    H2 = fc1_weight.shape[0]
    if fc1_weight.shape[1] != D or H2 % 2:
        raise ValueError(
            f"fc1_weight must have shape (2 * hidden, {D}) with gated={gated!r} (gate and value rows), "
            f"got {tuple(fc1_weight.shape)}"
        )
    Hd = H2 // 2
    _check_vectors(("fc1_bias", fc1_bias, H2))
    if tuple(fc2_weight.shape) != (D, Hd):
        raise ValueError(
            f"fc2_weight must have shape ({D}, {Hd}) (hidden {Hd} of the gated fc1), got {tuple(fc2_weight.shape)}"
        )
    glu = GLU_GATE_FIRST if gated == "gate_first" else GLU_GATE_LAST
    return fc1_weight, fc1_bias, None, None, glu, Hd


def _check_vectors(*entries: tuple[str, torch.Tensor | None, int]) -> None:
    """Each (name, tensor or None, n): a given tensor must be 1-D of length n."""
    for name, t, n in entries:
        if t is not None:
            check_tensor(name, t, 1, f"({n},)")
            if t.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")


# ----------------------------------------------------------------------------- kernels per backend
@dataclass(frozen=True)
class LnMlpKernels(Kernels):
    """A backend's kernels of layernorm_mlp (the custom op's forward returns (out, mean, rstd,
    pre, act_out, ln_out) on every backend; the fake branches on these flags)."""

    # True: the forward saves pre-activation, activation output and norm output in fp32 (the cpu
    # kernels); False: pre-activation only, in x's dtype, and two empty tensors (the Triton
    # kernels recompute the rest from pre and the statistics).
    saves_activations: bool = False
    # x's rows must be contiguous (reshape's view made contiguous before the custom op).
    contiguous_rows: bool = False


_TRITON_MAX_DIM: list[int] = []


def _triton_max_dim() -> int:
    if not _TRITON_MAX_DIM:
        from vitkern.triton_kernels.layernorm_mlp import MAX_DIM

        _TRITON_MAX_DIM.append(MAX_DIM)
    return _TRITON_MAX_DIM[0]


def _triton_supports(x, *args) -> str | None:
    """The Triton LayerNorm kernels' dimension limit (plain and gated MLP alike)."""
    max_dim = _triton_max_dim()
    if x.shape[-1] > max_dim:
        return f"dim {x.shape[-1]} is above the Triton LayerNorm kernels' limit {max_dim}"
    return None


if _backend.backend_status("triton") is None:
    # Where the Triton backend can run, read its limit now: the dispatch check runs inside
    # torch.compile's trace, which must not import (fullgraph=True).
    _triton_max_dim()


# forward(x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, glu, residual,
# save) -> (out, mean, rstd, pre-activation (M, H) plain or (M, 2H) gated, activation output (M, H),
# norm output (M, D)), the last three empty unless ``save`` (and the last two always on Triton);
# backward(dout, x, ln_weight, ln_bias, w1a, w1b, fc2_weight, mean, rstd, pre, act_out, ln_out, act, rms,
# glu, residual) -> (dx, dlnw, dlnb, dw1a, db1a, dw1b, db1b, dw2, db2), None where no gradient applies.
# Triton's are imported on first use: they also run CPU tensors under the interpreter (TRITON_INTERPRET=1).
def _cpu_forward(x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, *rest):
    # the weights packed for the packed GEMM route (vitkern/ops/_packed.py), or None: BLAS
    # bf16 input on the bf16 route without saving for a backward: bf16 panels (bf16 products)
    bf16 = bf16_products(x.dtype) and not rest[-1]
    packed = [packed_weight(w, bf16=bf16) for w in (w1a, w1b, fc2_weight)]
    return load_extension().layernorm_mlp_forward(x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, *rest, *packed)


def _cpu_backward(*args):
    return load_extension().layernorm_mlp_backward(*args)


def _triton_forward(x, *args):
    from vitkern.triton_kernels.layernorm_mlp import layernorm_mlp_fwd

    out, mean, rstd, pre = layernorm_mlp_fwd(x, *args)
    return out, mean, rstd, pre, x.new_empty(0), x.new_empty(0)


def _triton_backward(dout, x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, act_out, ln_out, *flags):
    from vitkern.triton_kernels.layernorm_mlp import layernorm_mlp_bwd

    # act_out and ln_out are the forward's empty tensors: the kernel recomputes them.
    return layernorm_mlp_bwd(dout, x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, *flags)


_KERNELS: dict[str, LnMlpKernels] = {
    "cpu": LnMlpKernels(_cpu_forward, _cpu_backward, auto_skip=cpu_gemm_kernel_auto_skip, saves_activations=True),
    "triton": LnMlpKernels(_triton_forward, _triton_backward, supports=_triton_supports, contiguous_rows=True),
}


# ----------------------------------------------------------------------------- the custom ops
# One forward and one backward custom op for every backend in _KERNELS and both MLP forms:
# torch.compile and torch.export see one op (no graph break), autograd goes through register_autograd.
def _layernorm_mlp_body(
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
    glu: int,
    residual: bool,
    save: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, mean, rstd, pre-activation, activation output, norm output): see "kernels per backend"."""
    args = (ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, glu, residual, save)
    with no_autocast(x.device.type):
        # a tuple: vitkern._C returns a list, which autograd would not see as six outputs
        return tuple(kernels_of(_KERNELS, backend).forward(x, *args))


_layernorm_mlp_op = torch.library.custom_op("vitkern::layernorm_mlp", mutates_args=())(_layernorm_mlp_body)


@_layernorm_mlp_op.register_fake
def _(x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, glu, residual, save, backend):
    M, D, Hd = x.shape[0], x.shape[1], fc2_weight.shape[1]
    pre_cols = Hd if glu == GLU_NONE else 2 * Hd
    stats = [x.new_empty((M,), dtype=torch.float32) for _ in range(2)]
    if kernels_of(_KERNELS, backend).saves_activations:
        f32 = dict(dtype=torch.float32)
        saved = [x.new_empty(s if save else (0,), **f32) for s in ((M, pre_cols), (M, Hd), (M, D))]
    else:
        saved = [x.new_empty((M, pre_cols) if save else (0,)), x.new_empty(0), x.new_empty(0)]
    return (x.new_empty(x.shape), *stats, *saved)


@torch.library.custom_op("vitkern::layernorm_mlp_backward", mutates_args=())
def _layernorm_mlp_backward_op(
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
    act_out: torch.Tensor,
    ln_out: torch.Tensor,
    act: int,
    rms: bool,
    glu: int,
    residual: bool,
    backend: str,
) -> list[torch.Tensor]:
    args = (dout, x, ln_weight, ln_bias, w1a, w1b, fc2_weight, mean, rstd, pre, act_out, ln_out)
    with no_autocast(x.device.type):  # the cpu kernel's aten::mm dispatcher calls must not be autocast to bf16
        grads = kernels_of(_KERNELS, backend).backward(*args, act, rms, glu, residual)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_layernorm_mlp_backward_op.register_fake
def _(dout, x, ln_weight, ln_bias, w1a, w1b, fc2_weight, mean, rstd, pre, act_out, ln_out, *flags_and_backend):
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


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, w2, b2, eps, act, rms, glu, residual, save, backend = inputs
    _, mean, rstd, pre, act_out, ln_out = output
    ctx.save_for_backward(x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, act_out, ln_out)
    mark_saved_outputs(ctx, output)
    ctx.flags = (act, rms, glu, residual)
    ctx.has_bias = (b1a is not None, b1b is not None, b2 is not None)
    ctx.backend = backend


def _backward(ctx, dout, *_grads_of_saved):
    if dout is None:  # the output took no part in the loss
        return (None,) * 16
    x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, act_out, ln_out = ctx.saved_tensors
    if pre.numel() == 0 and x.numel() != 0:
        raise RuntimeError("layernorm_mlp: backward needs the forward to run with save=True (a gradient was wanted)")
    saved = (x, ln_weight, ln_bias, w1a, w1b, w2, mean, rstd, pre, act_out, ln_out)
    grads = _layernorm_mlp_backward_op(dout.contiguous(), *saved, *ctx.flags, ctx.backend)
    dx, dlnw, dlnb, dw1a, db1a, dw1b, db1b, dw2, db2 = grads
    return (
        dx,
        dlnw if ln_weight is not None else None,
        dlnb if ln_bias is not None else None,
        dw1a,
        db1a if ctx.has_bias[0] else None,
        dw1b if w1b is not None else None,
        db1b if ctx.has_bias[1] else None,
        dw2,
        db2 if ctx.has_bias[2] else None,
        *(None,) * 7,  # eps, act, rms, glu, residual, save, backend
    )


_layernorm_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def _call(backend, x, *args):
    """Flatten x to (tokens, dim), decide whether the backward's tensors are saved, run the op."""
    params, flags = args[:8], args[8:]  # (ln_weight, ..., fc2_bias), (eps, act, rms, glu, residual)
    x2 = x.reshape(-1, x.shape[-1])
    if kernels_of(_KERNELS, backend).contiguous_rows and x2.stride(-1) != 1:
        x2 = x2.contiguous()  # a view where possible, copied when the kernel needs unit-stride rows
    if eager_inference(x2, *params):  # plain eager inference: the body without the custom op's dispatch
        return _layernorm_mlp_body(x2, *params, *flags, False, backend)[0].reshape(x.shape)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
    out = _layernorm_mlp_op(x2, *params, *flags, save, backend)[0]
    return out.reshape(x.shape)


for _op in _OPS:
    register_kernels(_op, _KERNELS, _call)


# ----------------------------------------------------------------------------- the public op
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
    if gated is None and (fc1_gate_weight is not None or fc1_gate_bias is not None):
        raise ValueError("fc1_gate_weight / fc1_gate_bias are for gated='split' only, got gated=None")
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
    if gated is None:
        if fc1_weight.shape[1] != D:
            raise ValueError(f"fc1_weight must have shape (hidden, {D}), got {tuple(fc1_weight.shape)}")
        if tuple(fc2_weight.shape) != (D, Hd):
            raise ValueError(f"fc2_weight must have shape ({D}, {Hd}), got {tuple(fc2_weight.shape)}")
        w1a, b1a, w1b, b1b, glu = fc1_weight, fc1_bias, None, None, GLU_NONE
        _check_vectors(("ln_weight", ln_weight, D), ("ln_bias", ln_bias, D), ("fc1_bias", fc1_bias, Hd))
    else:
        w1a, b1a, w1b, b1b, glu, _ = _gated_args(
            x, gated, fc1_weight, fc1_bias, fc1_gate_weight, fc1_gate_bias, fc2_weight
        )
        _check_vectors(("ln_weight", ln_weight, D), ("ln_bias", ln_bias, D))
    _check_vectors(("fc2_bias", fc2_bias, D))
    activation = _check_variant(activation, approximate, norm, ln_bias, eps)
    args = (x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias)
    args += (float(eps), ACTIVATIONS[activation], norm == "rmsnorm", glu, bool(residual))
    fn = _backend.select(_OPS[glu != GLU_NONE], backend, x.device, *args)
    with no_autocast(x.device.type):
        if x.numel() == 0:
            return _reference(*args)
        return fn(*args)
