"""LayerNorm (or RMSNorm: ``rms``) + gated MLP (GLU family: SwiGLU, GeGLU) in Triton (docs/DESIGN.md §1.4),
forward and backward, on the fused GEMM of gemm.py.

fc1 is one (2H, D) weight (timm's GluMlp; ``gate_first`` says which half is the gate) or
two (H, D) weights, gate and value (timm's SwiGLU). Either way the pre-activation is one
(M, 2H) buffer whose gate half lies ``goff`` columns from its value half (goff = -H when
the gate comes first, +H when it comes last).

Forward, three or four launches:
  1. row statistics (mean, 1/std in fp32);
  2. fc1 with the LayerNorm in the A prologue and the bias in the epilogue, writing the
     pre-activation (one GEMM for a packed weight, one per half for split weights);
  3. fc2 with the gated activation act(gate) * value in the A prologue (A_GATED), bias and
     residual in the epilogue. The gated hidden activation never exists in memory.
Saved for backward: x, mean, rstd and the pre-activation (M x 2H).

Backward:
  d_value, d_gate = (dout @ W2) * act(gate), (dout @ W2) * value * act'(gate)   EPI_DGLU epilogue
  dW2   = dout^T @ (act(gate) * value)                                           B_GATED prologue
  dW1   = d_pre^T @ LayerNorm(x)                 (per half for split weights)    LayerNorm B prologue
  d_ln  = d_pre @ W1                             (the second half accumulates through the residual)
  dx, dLN weight/bias                            the row kernel of layernorm_mlp.py
"""

from __future__ import annotations

import torch

from vitkern.triton_kernels.gemm import A_GATED, A_LAYERNORM, B_GATED, B_LAYERNORM, fused_gemm
from vitkern.triton_kernels.layernorm_mlp import ln_backward, ln_stats


def _halves(pre: torch.Tensor, Hd: int, gate_first: bool) -> tuple[torch.Tensor, int]:
    """(value half view, goff) of an (M, 2H) buffer."""
    return (pre[:, Hd:], -Hd) if gate_first else (pre[:, :Hd], Hd)


def _fc1_parts(w1a, b1a, w1b, b1b):
    """[(weight, bias, first output column)] for the fc1 GEMM(s)."""
    if w1b is None:
        return [(w1a, b1a, 0)]
    Hd = w1a.shape[0]
    return [(w1a, b1a, 0), (w1b, b1b, Hd)]


def layernorm_glu_fwd(
    x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, gate_first, residual, save
):
    """x: (M, D) with unit stride in D. fc1: w1a (2H, D) packed (w1b None), or w1a = gate and
    w1b = value, (H, D) each (gate_first must then be True). Returns (out, mean, rstd, pre or empty)."""
    M, D = x.shape
    Hd = fc2_weight.shape[1]
    mean, rstd = ln_stats(x, eps, rms)
    pre = torch.empty((M, 2 * Hd), device=x.device, dtype=x.dtype)
    for w, b, col in _fc1_parts(w1a, b1a, w1b, b1b):
        n = w.shape[0]
        fused_gemm(
            x,
            w,
            pre[:, col : col + n],
            M,
            n,
            D,
            a_strides=(x.stride(0), x.stride(1)),
            b_strides=(w.stride(1), w.stride(0)),
            c_strides=(2 * Hd, 1),
            a_mode=A_LAYERNORM,
            mean=mean,
            rstd=rstd,
            ln_weight=ln_weight,
            ln_bias=ln_bias,
            bias=b,
            act=act,
        )
    value, goff = _halves(pre, Hd, gate_first)
    out = torch.empty((M, D), device=x.device, dtype=x.dtype)
    fused_gemm(
        value,
        fc2_weight,
        out,
        M,
        D,
        Hd,
        a_strides=(2 * Hd, 1),
        b_strides=(fc2_weight.stride(1), fc2_weight.stride(0)),
        c_strides=(D, 1),
        a_mode=A_GATED,
        goff=goff,
        act=act,
        bias=fc2_bias,
        res=x if residual else None,
        res_rows=M,
    )
    return out, mean, rstd, (pre if save else x.new_empty(0))


def layernorm_glu_bwd(
    dout, x, ln_weight, ln_bias, w1a, w1b, fc2_weight, mean, rstd, pre, act, rms, gate_first, residual
):
    """Returns (dx, d ln_weight, d ln_bias, d w1a, d b1a, d w1b or None, d b1b or None,
    d fc2_weight, d fc2_bias)."""
    M, D = x.shape
    Hd = fc2_weight.shape[1]
    dev, dt = x.device, x.dtype
    value, goff = _halves(pre, Hd, gate_first)
    dpre = torch.empty((M, 2 * Hd), device=dev, dtype=dt)
    dvalue, _ = _halves(dpre, Hd, gate_first)
    fused_gemm(
        dout,
        fc2_weight,
        dvalue,
        M,
        Hd,
        D,
        a_strides=(dout.stride(0), dout.stride(1)),
        b_strides=(fc2_weight.stride(0), fc2_weight.stride(1)),
        c_strides=(2 * Hd, 1),
        pre=value,
        goff=goff,
        act=act,
        epi_dglu=True,
    )
    dw2 = torch.empty((D, Hd), device=dev, dtype=fc2_weight.dtype)
    fused_gemm(
        dout,
        value,
        dw2,
        D,
        Hd,
        M,
        a_strides=(dout.stride(1), dout.stride(0)),
        b_strides=(2 * Hd, 1),
        c_strides=(Hd, 1),
        b_mode=B_GATED,
        goff=goff,
        act=act,
    )
    dln = torch.empty((M, D), device=dev, dtype=torch.float32)
    dws = []
    for i, (w, _, col) in enumerate(_fc1_parts(w1a, None, w1b, None)):
        n = w.shape[0]
        dpart = dpre[:, col : col + n]
        dw = torch.empty((n, D), device=dev, dtype=w.dtype)
        fused_gemm(
            dpart,
            x,
            dw,
            n,
            D,
            M,
            a_strides=(1, 2 * Hd),
            b_strides=(x.stride(0), x.stride(1)),
            c_strides=(D, 1),
            b_mode=B_LAYERNORM,
            mean=mean,
            rstd=rstd,
            ln_weight=ln_weight,
            ln_bias=ln_bias,
        )
        dws.append(dw)
        # d_ln = sum over the fc1 parts of d_part @ W_part; the second adds onto the first in
        # the epilogue (each element is read and written by the same program).
        fused_gemm(
            dpart,
            w,
            dln,
            M,
            D,
            n,
            a_strides=(2 * Hd, 1),
            b_strides=(w.stride(0), w.stride(1)),
            c_strides=(D, 1),
            res=dln if i else None,
            res_rows=M,
        )
    dx, dlnw, dlnb = ln_backward(dln, x, mean, rstd, ln_weight, ln_bias, dout, residual, rms)
    db2 = dout.float().sum(0).to(dt)
    if w1b is None:
        return dx, dlnw, dlnb, dws[0], dpre.float().sum(0).to(dt), None, None, dw2, db2
    db1a, db1b = (dpre[:, half].float().sum(0).to(dt) for half in (slice(0, Hd), slice(Hd, 2 * Hd)))
    return dx, dlnw, dlnb, dws[0], db1a, dws[1], db1b, dw2, db2
