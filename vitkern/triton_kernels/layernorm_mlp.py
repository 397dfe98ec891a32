"""LayerNorm (or RMSNorm) + MLP in Triton (docs/DESIGN.md §1.4), forward and backward.

The activation is GELU (erf or tanh), QuickGELU or SiLU (the ACT_* codes of gemm.py).

Forward, three launches:
  1. row statistics (mean, 1/std in fp32) - one read of x;
  2. fc1 with the LayerNorm applied in the GEMM's prologue (the normalised
     activations never exist in memory), bias + GELU in the epilogue; the
     pre-activation is stored only when a gradient is wanted;
  3. fc2 with bias and the residual x added in the epilogue.
Saved for backward: x, mean, rstd and the pre-activation (M x hidden) - eager
autograd keeps LN(x), fc1(.) and GELU(.) (M x (D + 2 hidden)).

Backward, five launches and two bias sums:
  d_pre = (dout @ W2) * GELU'(pre)            epilogue multiply
  dW2   = dout^T @ GELU(pre)                   GELU in the B prologue
  dW1   = d_pre^T @ LayerNorm(x)               LayerNorm in the B prologue
  d_ln  = d_pre @ W1                           fp32
  dx, dLN weight/bias partials                 one row kernel (+ dout for the residual);
                                               the partials are summed in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitkern.triton_kernels.gemm import A_LAYERNORM, B_ACT, B_LAYERNORM, device_guard, fused_gemm

MAX_DIM = 16384


@triton.jit
def _ln_stats_kernel(X, Mean, Rstd, M, D, stride_xm, eps, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, RMS: tl.constexpr):
    """Per row: mean and 1/std (LayerNorm), or mean 0 and 1/rms (RMSNorm, RMS=True), fp32."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    r_ok = rows < M
    mask = r_ok[:, None] & (cols < D)[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RMS:
        mean = tl.zeros([ROWS], tl.float32)
        var = tl.sum(x * x, 1) / D
    else:
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, 1) / D
    tl.store(Mean + rows, mean, mask=r_ok)
    tl.store(Rstd + rows, 1.0 / tl.sqrt(var + eps), mask=r_ok)


@triton.jit
def _ln_bwd_kernel(
    DLN,
    X,
    Mean,
    Rstd,
    LnW,
    DOut,
    DX,
    DWPart,
    DBPart,
    M,
    D,
    stride_xm,
    stride_dom,
    rows_per_prog,
    HAS_LNW: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RMS: tl.constexpr,
):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = d_ln * w, per row, plus dout
    for the residual; this program's partial sums of d_ln * xhat and d_ln (fp32). An RMSNorm
    (RMS=True, saved mean 0) has no mean to subtract, so no mean(g) term."""
    pid = tl.program_id(0).to(tl.int64)  # 64-bit row offsets: M * D can pass 2**31
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    if HAS_LNW:
        w = tl.load(LnW + cols, mask=c_ok, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_D], tl.float32)
    acc_db = tl.zeros([BLOCK_D], tl.float32)
    row0 = pid * rows_per_prog
    row1 = tl.minimum(row0 + rows_per_prog, M)
    for row in range(row0, row1):  # int64 bounds, so an int64 row
        dln = tl.load(DLN + row * D + cols, mask=c_ok, other=0.0)
        x = tl.load(X + row * stride_xm + cols, mask=c_ok, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(c_ok, (x - mean) * rstd, 0.0)
        acc_dw += dln * xhat
        acc_db += dln
        g = dln * w if HAS_LNW else dln
        c1 = tl.sum(g * xhat, 0) / D
        if RMS:
            dx = (g - xhat * c1) * rstd
        else:
            dx = (g - xhat * c1 - tl.sum(g, 0) / D) * rstd
        if HAS_RES:
            dx += tl.load(DOut + row * stride_dom + cols, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=c_ok)
    tl.store(DWPart + pid * D + cols, acc_dw, mask=c_ok)
    tl.store(DBPart + pid * D + cols, acc_db, mask=c_ok)


def _stats_rows(block_d: int) -> int:
    return max(1, min(16, 2048 // block_d))


def ln_stats(x: torch.Tensor, eps: float, rms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    M, D = x.shape
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_d = triton.next_power_of_2(D)
    rows = _stats_rows(block_d)
    with device_guard(x):
        _ln_stats_kernel[(triton.cdiv(M, rows),)](
            x,
            mean,
            rstd,
            M,
            D,
            x.stride(0),
            eps,
            BLOCK_D=block_d,
            ROWS=rows,
            RMS=rms,
            num_warps=4 if block_d <= 2048 else 8,
        )
    return mean, rstd


def layernorm_mlp_fwd(
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, residual, save, rms=False
):
    """x: (M, D) with unit stride in D; act: an ACT_* code of gemm.py; rms: RMSNorm instead of
    LayerNorm (mean 0 in the saved statistics). Returns (out, mean, rstd, pre or empty)."""
    M, D = x.shape
    Hd = fc1_weight.shape[0]
    mean, rstd = ln_stats(x, eps, rms)
    h = torch.empty((M, Hd), device=x.device, dtype=x.dtype)
    pre = torch.empty((M, Hd), device=x.device, dtype=x.dtype) if save else x.new_empty(0)
    fused_gemm(
        x,
        fc1_weight,
        h,
        M,
        Hd,
        D,
        a_strides=(x.stride(0), x.stride(1)),
        b_strides=(fc1_weight.stride(1), fc1_weight.stride(0)),
        c_strides=(Hd, 1),
        a_mode=A_LAYERNORM,
        mean=mean,
        rstd=rstd,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
        bias=fc1_bias,
        pre=pre if save else None,
        store_pre=save,
        act=act,
        epi_gelu=True,
    )
    out = torch.empty((M, D), device=x.device, dtype=x.dtype)
    fused_gemm(
        h,
        fc2_weight,
        out,
        M,
        D,
        Hd,
        a_strides=(Hd, 1),
        b_strides=(fc2_weight.stride(1), fc2_weight.stride(0)),
        c_strides=(D, 1),
        bias=fc2_bias,
        res=x if residual else None,
        res_rows=M,
    )
    return out, mean, rstd, pre


def layernorm_mlp_bwd(dout, x, ln_weight, ln_bias, fc1_weight, fc2_weight, mean, rstd, pre, act, residual, rms=False):
    """Returns (dx, d ln_weight, d ln_bias, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias)."""
    M, D = x.shape
    Hd = fc1_weight.shape[0]
    dev, dt = x.device, x.dtype
    dpre = torch.empty((M, Hd), device=dev, dtype=dt)
    fused_gemm(
        dout,
        fc2_weight,
        dpre,
        M,
        Hd,
        D,
        a_strides=(dout.stride(0), dout.stride(1)),
        b_strides=(fc2_weight.stride(0), fc2_weight.stride(1)),
        c_strides=(Hd, 1),
        pre=pre,
        act=act,
        epi_dgelu=True,
    )
    dw2 = torch.empty((D, Hd), device=dev, dtype=fc2_weight.dtype)
    fused_gemm(
        dout,
        pre,
        dw2,
        D,
        Hd,
        M,
        a_strides=(dout.stride(1), dout.stride(0)),
        b_strides=(pre.stride(0), pre.stride(1)),
        c_strides=(Hd, 1),
        b_mode=B_ACT,
        act=act,
    )
    dw1 = torch.empty((Hd, D), device=dev, dtype=fc1_weight.dtype)
    fused_gemm(
        dpre,
        x,
        dw1,
        Hd,
        D,
        M,
        a_strides=(1, Hd),
        b_strides=(x.stride(0), x.stride(1)),
        c_strides=(D, 1),
        b_mode=B_LAYERNORM,
        mean=mean,
        rstd=rstd,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
    )
    dln = torch.empty((M, D), device=dev, dtype=torch.float32)
    fused_gemm(
        dpre,
        fc1_weight,
        dln,
        M,
        D,
        Hd,
        a_strides=(Hd, 1),
        b_strides=(fc1_weight.stride(0), fc1_weight.stride(1)),
        c_strides=(D, 1),
    )
    dx, dlnw, dlnb = ln_backward(dln, x, mean, rstd, ln_weight, ln_bias, dout, residual, rms)
    db1 = dpre.float().sum(0).to(dt)
    db2 = dout.float().sum(0).to(dt)
    return dx, dlnw, dlnb, dw1, db1, dw2, db2


def ln_backward(dln, x, mean, rstd, ln_weight, ln_bias, dout, residual, rms):
    """The norm's backward from d LN-output ``dln`` (M, D) fp32: (dx (+ dout when ``residual``),
    d ln_weight, d ln_bias), the affine sums from per-program partials in a fixed order."""
    M, D = x.shape
    dev, dt = x.device, x.dtype
    block_d = triton.next_power_of_2(D)
    rows_per_prog = 16
    progs = triton.cdiv(M, rows_per_prog)
    dx = torch.empty((M, D), device=dev, dtype=dt)
    dw_part = torch.empty((progs, D), device=dev, dtype=torch.float32)
    db_part = torch.empty_like(dw_part)
    with device_guard(x):
        _ln_bwd_kernel[(progs,)](
            dln,
            x,
            mean,
            rstd,
            ln_weight if ln_weight is not None else dln,
            dout,
            dx,
            dw_part,
            db_part,
            M,
            D,
            x.stride(0),
            dout.stride(0),
            rows_per_prog,
            HAS_LNW=ln_weight is not None,
            HAS_RES=residual,
            BLOCK_D=block_d,
            RMS=rms,
            num_warps=4 if block_d <= 2048 else 8,
        )
    dlnw = dw_part.sum(0).to(ln_weight.dtype) if ln_weight is not None else None
    dlnb = db_part.sum(0).to(ln_bias.dtype) if ln_bias is not None else None
    return dx, dlnw, dlnb
