"""Spatial-prior self-attention (SP-SA), docs/DESIGN.md §1.2.

    s_ij  = (q_i . k_j) * scale * omega_h(dx_ij, dy_ij)
    out_i = sum_j softmax_j(s_ij) v_j

The prior multiplies the *scaled* logit before the softmax. Pairs that involve
a prefix token get factor 1; ``omega=None`` is plain softmax attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitkern import _backend
from vitkern._ext import load_extension
from vitkern.ops import _packed
from vitkern.ops._autograd import (
    autocast_cast,
    autocast_dtype,
    autocast_inputs,
    eager_inference,
    mark_saved_outputs,
    no_autocast,
)
from vitkern.ops._kernels import Kernels, kernels_of, register_kernels
from vitkern.ops._validate import check_same, check_tensor
from vitkern.ops.spatial_prior import resolve_grid, spatial_prior_reference

__all__ = ["sp_attention", "sp_attention_reference", "sp_attention_probs"]


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if upcast or dtype in (torch.float16, torch.bfloat16):
        return torch.float32 if dtype != torch.float64 else torch.float64
    return dtype


def sp_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    omega: torch.Tensor | None,
    grid: tuple[int, int] | None,
    num_prefix_tokens: int,
    scale: float,
) -> torch.Tensor:
    """Attention probabilities (B, H, N, N) with the prior applied, in q's dtype
    (fp32 for half inputs). Materialises N x N: for inspection and reference only."""
    ct = _compute_dtype(q.dtype, False)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-2, -1)) * scale
    if omega is not None:
        s = s * spatial_prior_reference(omega.to(ct), grid, num_prefix_tokens)
    return s.softmax(dim=-1)


def sp_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    omega: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    scale: float | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain PyTorch SP-SA. Half-precision inputs are computed in fp32 and the
    result cast back; ``upcast=True`` does the same for every dtype below fp64."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = _compute_dtype(q.dtype, upcast)
    if omega is None:
        # Plain attention: PyTorch's fused SDPA computes exactly this.
        out = F.scaled_dot_product_attention(q.to(ct), k.to(ct), v.to(ct), scale=scale)
        return out.to(q.dtype)
    p = sp_attention_probs(q.to(ct), k.to(ct), omega.to(ct), grid, num_prefix_tokens, scale)
    return torch.matmul(p, v.to(ct)).to(q.dtype)


_backend.register_impl("sp_attention", "reference", sp_attention_reference)


# ----------------------------------------------------------------------------- kernels per backend
# Each entry's forward returns (out, lse) with out (B, H, N, Dh) and lse (B, H, N) fp32; its
# backward returns (dq, dk, dv, domega or None). Triton's are imported on first use: they also
# run CPU tensors under the interpreter (TRITON_INTERPRET=1).
def _cpu_forward(q, k, v, omega, gh, gw, num_prefix, scale):
    return load_extension().sp_attention_forward(q, k, v, omega, gh, gw, num_prefix, scale)


def _cpu_backward(dout, q, k, v, omega, out, lse, gh, gw, num_prefix, scale):
    # The C++ backward reduces d-omega per thread in a fixed order: bit-identical across runs.
    return load_extension().sp_attention_backward(dout, q, k, v, omega, out, lse, gh, gw, num_prefix, scale)


def _triton_forward(q, k, v, omega, gh, gw, num_prefix, scale):
    from vitkern.triton_kernels.sp_attention import sp_attention_fwd

    return sp_attention_fwd(q, k, v, omega, (gh, gw), num_prefix, scale)


def _triton_backward(dout, q, k, v, omega, out, lse, gh, gw, num_prefix, scale):
    from vitkern.triton_kernels.sp_attention import sp_attention_bwd

    return sp_attention_bwd(dout, q, k, v, omega, out, lse, (gh, gw), num_prefix, scale)


# Below this many (batch, head) pairs the cpu kernel's plain-attention training step (forward +
# backward) loses to SDPA's: ViT-S at batch 1 (6 heads) 4.65 vs 4.34 ms on one thread, batch 2
# (12) 7.7 vs 8.4 (benchmarks/NOTES.md, "The attention backward on the packed GEMM").
_OWN_BACKWARD_MIN_HEADS = 12


def _cpu_auto_skip(q, k, v, omega, grid, num_prefix_tokens, scale) -> str | None:
    if omega is None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # Measured (benchmarks/NOTES.md): without a prior, PyTorch's fused SDPA backward is
        # faster than this kernel's where the kernel's products are BLAS calls (CPUs with
        # AVX-512), and for a handful of heads; the reference path uses SDPA.
        if not _packed.packed_route():
            return "plain attention with autograd: SDPA's fused backward (reference path) is faster here"
        if q.shape[0] * q.shape[1] < _OWN_BACKWARD_MIN_HEADS:
            return (
                f"plain attention with autograd on {q.shape[0] * q.shape[1]} (batch, head) pairs: "
                f"SDPA's fused backward (reference path) is faster below {_OWN_BACKWARD_MIN_HEADS}"
            )
    return None


def _triton_supports(q, k, v, omega, grid, num_prefix_tokens, scale) -> str | None:
    if q.shape[-1] > 128 or q.shape[-1] < 8:
        return f"head_dim {q.shape[-1]} is outside the Triton kernel's range [8, 128]"
    return None


@dataclass(frozen=True)
class _AttentionKernels(Kernels):
    # The forward's out is a (B, N, H, Dh)-strided view (the cpu kernel writes token-major rows,
    # which the output projection reads without a copy); the fake reproduces the strides.
    token_major: bool = False


_KERNELS: dict[str, _AttentionKernels] = {
    "cpu": _AttentionKernels(_cpu_forward, _cpu_backward, auto_skip=_cpu_auto_skip, token_major=True),
    "triton": _AttentionKernels(_triton_forward, _triton_backward, supports=_triton_supports),
}


# ----------------------------------------------------------------------------- the custom ops
# One forward and one backward custom op for every backend in _KERNELS: torch.compile and
# torch.export see one op (no graph break), autograd goes through register_autograd.
def _sp_attention_body(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    omega: torch.Tensor | None,
    gh: int,
    gw: int,
    num_prefix: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    with no_autocast(q.device.type):
        out, lse = kernels_of(_KERNELS, backend).forward(q, k, v, omega, gh, gw, num_prefix, scale)
    return out, lse  # a tuple: vitkern._C returns a list, which autograd would not see as two outputs


_sp_attention_op = torch.library.custom_op("vitkern::sp_attention", mutates_args=())(_sp_attention_body)


@_sp_attention_op.register_fake
def _(q, k, v, omega, gh, gw, num_prefix, scale, backend):
    B, H, N, Dh = q.shape
    token_major = kernels_of(_KERNELS, backend).token_major
    out = q.new_empty((B, N, H, Dh)).permute(0, 2, 1, 3) if token_major else q.new_empty(q.shape)
    return out, q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("vitkern::sp_attention_backward", mutates_args=())
def _sp_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    omega: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    gh: int,
    gw: int,
    num_prefix: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with no_autocast(q.device.type):
        dq, dk, dv, domega = kernels_of(_KERNELS, backend).backward(
            dout, q, k, v, omega, out, lse, gh, gw, num_prefix, scale
        )
    return dq, dk, dv, (domega if domega is not None else q.new_empty(0))


@_sp_attention_backward_op.register_fake
def _(dout, q, k, v, omega, out, lse, gh, gw, num_prefix, scale, backend):
    domega = omega.new_empty(omega.shape) if omega is not None else q.new_empty(0)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), domega


def _setup_context(ctx, inputs, output):
    q, k, v, omega, gh, gw, num_prefix, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, omega, out, lse)
    mark_saved_outputs(ctx, output)
    ctx.args = (gh, gw, num_prefix, scale)
    ctx.backend = backend


def _backward(ctx, dout, _dlse):
    if dout is None:  # the output took no part in the loss
        return (None,) * 9
    q, k, v, omega, out, lse = ctx.saved_tensors
    # Bit-identical across runs in any mode on every backend: each gradient, d-omega included, is
    # reduced without atomics (per-chunk partial sums, then a fixed-order sum), so there is no
    # separate path for torch.use_deterministic_algorithms(True).
    dq, dk, dv, domega = _sp_attention_backward_op(dout, q, k, v, omega, out, lse, *ctx.args, ctx.backend)
    return dq, dk, dv, (domega if omega is not None else None), None, None, None, None, None


_sp_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _call(backend, q, k, v, omega, grid, num_prefix_tokens, scale):
    gh, gw = grid if grid is not None else (1, 1)
    # plain eager inference: the op's body without the custom op's dispatch (ops/_autograd.py)
    op = _sp_attention_body if eager_inference(q, k, v, omega) else _sp_attention_op
    return op(q, k, v, omega, gh, gw, num_prefix_tokens, scale, backend)[0]


register_kernels("sp_attention", _KERNELS, _call)


def sp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    omega: torch.Tensor | None = None,
    *,
    grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention with SP-ViT's multiplicative spatial prior.

    Args:
        q, k, v: (batch, heads, seqlen, head_dim). Strided views (e.g. the
            unbound output of a fused qkv projection) are accepted.
        omega: (heads, 2*gh-1, 2*gw-1) prior table, or None for plain attention.
            Differentiable: its gradient is accumulated over all token pairs.
            Its dtype is q's, or float32 with float16/bfloat16 q/k/v (the layout
            mixed precision produces: the table is tiny and its parameters stay fp32);
            the prior is applied in fp32 and d-omega is accumulated in fp32 and
            returned in omega's dtype. Any other mix (float16 omega with bfloat16 q,
            say) is a TypeError.
        grid: (gh, gw) patch grid; inferred from ``omega`` when omitted.
        num_prefix_tokens: leading class/register tokens (prior factor 1).
        scale: logit scale, head_dim**-0.5 by default.
        backend: "auto", "reference", "triton" or "cpu".

    Under ``torch.autocast`` (for q's device) q, k and v are cast to the autocast dtype
    (float64 excepted), a float16/bfloat16 omega to float32, and the op runs with autocast off.

    Returns:
        (batch, heads, seqlen, head_dim) in q's dtype.
    """
    amp = autocast_dtype(q.device.type) if isinstance(q, torch.Tensor) else None
    if amp is not None:
        q, k, v = autocast_inputs(amp, q, k, v)
        if isinstance(q, torch.Tensor) and q.dtype in (torch.float16, torch.bfloat16):
            omega = autocast_cast(torch.float32, omega)
    check_tensor("q", q, 4, "(batch, heads, seqlen, head_dim)")
    check_tensor("k", k, 4, "(batch, heads, seqlen, head_dim)")
    check_tensor("v", v, 4, "(batch, heads, seqlen, head_dim)")
    check_same("q", q, k=k, v=v)
    if omega is not None:
        check_tensor("omega", omega, 3, "(heads, 2*gh-1, 2*gw-1)")
        check_omega_dtype(q, omega)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have the same shape (batch, heads, seqlen, head_dim), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, H, N, Dh = q.shape
    if omega is not None:
        check_tensor("omega", omega, 3, "(heads, 2*gh-1, 2*gw-1)")
        if omega.shape[0] != H:
            raise ValueError(f"omega must have shape ({H}, 2*gh-1, 2*gw-1) for {H} heads, got {tuple(omega.shape)}")
    grid = resolve_grid(N, num_prefix_tokens, omega, grid)
    if scale is None:
        scale = Dh**-0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    fn = _backend.select("sp_attention", backend, q.device, q, k, v, omega, grid, num_prefix_tokens, float(scale))
    with no_autocast(q.device.type):
        if q.numel() == 0:  # empty batch: nothing for a kernel to do, keep autograd connected
            return sp_attention_reference(q, k, v, omega, grid, num_prefix_tokens, float(scale))
        return fn(q, k, v, omega, grid, num_prefix_tokens, float(scale))


def check_omega_dtype(q: torch.Tensor, omega: object) -> None:
    """omega is a tensor on q's device with q's dtype, or float32 with float16/bfloat16 q."""
    if not isinstance(omega, torch.Tensor):
        raise TypeError(
            f"omega must be a torch.Tensor of shape (heads, 2*gh-1, 2*gw-1) or None, got {type(omega).__name__}"
        )
    if omega.device != q.device:
        raise ValueError(f"omega is on {omega.device} but q is on {q.device}; all inputs must share a device")
    half = (torch.float16, torch.bfloat16)
    if omega.dtype != q.dtype and not (omega.dtype == torch.float32 and q.dtype in half):
        raise TypeError(
            f"omega has dtype {omega.dtype} but q has {q.dtype}; omega must have q's dtype, or be "
            "torch.float32 with float16/bfloat16 q/k/v (mixed precision)"
        )
