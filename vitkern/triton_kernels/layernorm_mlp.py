"""LayerNorm (or RMSNorm) + MLP in Triton (docs/DESIGN.md §1.4), forward and backward, on the
fused GEMM of gemm.py: the plain MLP (glu = GLU_NONE) and the gated one (GLU family: SwiGLU,
GeGLU) through one launcher each way. The activation is GELU (erf or tanh), QuickGELU or SiLU
(the ACT_* codes of gemm.py).

The gated fc1 is one (2H, D) weight (timm's GluMlp; ``glu`` says which half is the gate) or
two (H, D) weights, gate and value (timm's SwiGLU). Either way its pre-activation is one
(M, 2H) buffer whose gate half lies ``goff`` columns from its value half (goff = -H when the
gate comes first, +H when it comes last).

Forward, three launches (four for split gated weights):
  1. row statistics (mean, 1/std in fp32) - one read of x;
  2. fc1 with the LayerNorm applied in the GEMM's prologue (the normalised activations never
     exist in memory), the bias in the epilogue; plain: the activation there too, the
     pre-activation stored only when a gradient is wanted; gated: the (M, 2H) pre-activation
     (one GEMM per fc1 weight);
  3. fc2 with bias and the residual x added in the epilogue; gated: act(gate) * value formed in
     its A prologue (A_GATED), so the gated hidden activation never exists in memory.
Saved for backward: x, mean, rstd and the pre-activation (M x H, gated M x 2H) - eager autograd
keeps LN(x), fc1(.) and act(.) as well.

Backward, five launches (seven for split weights), the norm's row kernel and the bias sums:
  d_pre = (dout @ W2) * act'(pre)                        epilogue (gated, EPI_DGLU: both halves,
                                                         d_value = dh act(gate), d_gate = dh value act'(gate))
  dW2   = dout^T @ act(pre)  (gated: act(gate) * value)  B_ACT (B_GATED) prologue
  dW1   = d_pre^T @ LayerNorm(x)                         LayerNorm B prologue, per fc1 weight
  d_ln  = d_pre @ W1                                     fp32; the second split half adds on in the epilogue
  dx, dLN weight/bias partials                           one row kernel (+ dout for the residual);
                                                         the partials are summed in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitkern.triton_kernels.gemm import A_GATED, A_LAYERNORM, B_ACT, B_GATED, B_LAYERNORM, device_guard, fused_gemm

MAX_DIM = 16384
# The ``glu`` argument (vitkern.ops.layernorm_mlp): the plain MLP, or the gated one with the gate first / last.
GLU_NONE, GLU_GATE_FIRST, GLU_GATE_LAST = 0, 1, 2


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


def _halves(pre: torch.Tensor, Hd: int, gate_first: bool) -> tuple[torch.Tensor, int]:
    """(value half view, goff) of a gated (M, 2H) buffer."""
    return (pre[:, Hd:], -Hd) if gate_first else (pre[:, :Hd], Hd)


def _fc1_parts(w1a, b1a, w1b, b1b):
    """[(weight, bias, first output column)] for the fc1 GEMM(s): one, or gate and value."""
    if w1b is None:
        return [(w1a, b1a, 0)]
    return [(w1a, b1a, 0), (w1b, b1b, w1a.shape[0])]


def layernorm_mlp_fwd(
    x, ln_weight, ln_bias, w1a, b1a, w1b, b1b, fc2_weight, fc2_bias, eps, act, rms, glu, residual, save
):
    """x: (M, D) with unit stride in D; the other arguments as vitkern.ops.layernorm_mlp's
    internal ones (act: an ACT_* code of gemm.py; rms: RMSNorm, mean 0 in the saved statistics;
    glu: GLU_NONE or the gate's half). Returns (out, mean, rstd, pre or empty)."""
    M, D = x.shape
    Hd = fc2_weight.shape[1]
    mean, rstd = ln_stats(x, eps, rms)
    norm = dict(a_mode=A_LAYERNORM, mean=mean, rstd=rstd, ln_weight=ln_weight, ln_bias=ln_bias)
    if glu == GLU_NONE:
        # fc1 with bias + act in the epilogue (the pre-activation stored there when saved); fc2 reads h.
        h = torch.empty((M, Hd), device=x.device, dtype=x.dtype)
        pre = torch.empty((M, Hd), device=x.device, dtype=x.dtype) if save else x.new_empty(0)
        epilogue = dict(bias=b1a, pre=pre if save else None, store_pre=save, act=act, epi_gelu=True)
        parts, a, lda, prologue = [(w1a, h, epilogue)], h, Hd, {}
    else:
        # fc1 (per half for split weights) with the bias in the epilogue writes the (M, 2H)
        # pre-activation; fc2 applies act(gate) * value in its A prologue.
        pre = torch.empty((M, 2 * Hd), device=x.device, dtype=x.dtype)
        parts = [(w, pre[:, c : c + w.shape[0]], dict(bias=b, act=act)) for w, b, c in _fc1_parts(w1a, b1a, w1b, b1b)]
        a, goff = _halves(pre, Hd, glu == GLU_GATE_FIRST)
        lda, prologue = 2 * Hd, dict(a_mode=A_GATED, goff=goff, act=act)
    for w, c, epilogue in parts:
        n = w.shape[0]
        a_strides, b_strides = (x.stride(0), x.stride(1)), (w.stride(1), w.stride(0))
        fused_gemm(x, w, c, M, n, D, a_strides=a_strides, b_strides=b_strides, c_strides=(lda, 1), **norm, **epilogue)
    out = torch.empty((M, D), device=x.device, dtype=x.dtype)
    fused_gemm(
        a,
        fc2_weight,
        out,
        M,
        D,
        Hd,
        a_strides=(lda, 1),
        b_strides=(fc2_weight.stride(1), fc2_weight.stride(0)),
        c_strides=(D, 1),
        bias=fc2_bias,
        res=x if residual else None,
        res_rows=M,
        **prologue,
    )
    return out, mean, rstd, (pre if save else x.new_empty(0))


def layernorm_mlp_bwd(dout, x, ln_weight, ln_bias, w1a, w1b, fc2_weight, mean, rstd, pre, act, rms, glu, residual):
    """Returns (dx, d ln_weight, d ln_bias, d w1a, d b1a, d w1b or None, d b1b or None,
    d fc2_weight, d fc2_bias)."""
    M, D = x.shape
    Hd = fc2_weight.shape[1]
    P = Hd if glu == GLU_NONE else 2 * Hd  # pre-activation columns
    dev, dt = x.device, x.dtype
    dpre = torch.empty((M, P), device=dev, dtype=dt)
    if glu == GLU_NONE:  # d_pre = (dout @ W2) * act'(pre); dW2 = dout^T @ act(pre)
        value, dvalue = pre, dpre
        epilogue, b_prologue = dict(epi_dgelu=True), dict(b_mode=B_ACT)
    else:  # both halves of d_pre from dout @ W2 (the gate's goff columns away); dW2 = dout^T @ (act(gate) * value)
        value, goff = _halves(pre, Hd, glu == GLU_GATE_FIRST)
        dvalue, _ = _halves(dpre, Hd, glu == GLU_GATE_FIRST)
        epilogue, b_prologue = dict(goff=goff, epi_dglu=True), dict(b_mode=B_GATED, goff=goff)
    fused_gemm(
        dout,
        fc2_weight,
        dvalue,
        M,
        Hd,
        D,
        a_strides=(dout.stride(0), dout.stride(1)),
        b_strides=(fc2_weight.stride(0), fc2_weight.stride(1)),
        c_strides=(P, 1),
        pre=value,
        act=act,
        **epilogue,
    )
    dw2 = torch.empty((D, Hd), device=dev, dtype=fc2_weight.dtype)
    dout_t = (dout.stride(1), dout.stride(0))
    b_strides = (value.stride(0), value.stride(1))
    fused_gemm(
        dout, value, dw2, D, Hd, M, a_strides=dout_t, b_strides=b_strides, c_strides=(Hd, 1), act=act, **b_prologue
    )
    dln = torch.empty((M, D), device=dev, dtype=torch.float32)
    dws = []
    norm = dict(b_mode=B_LAYERNORM, mean=mean, rstd=rstd, ln_weight=ln_weight, ln_bias=ln_bias)
    x_strides = (x.stride(0), x.stride(1))
    for i, (w, _, col) in enumerate(_fc1_parts(w1a, None, w1b, None)):
        n = w.shape[0]
        dpart = dpre[:, col : col + n]
        dw = torch.empty((n, D), device=dev, dtype=w.dtype)
        # dW_part = d_part^T @ LayerNorm(x), the norm applied in the B prologue
        fused_gemm(dpart, x, dw, n, D, M, a_strides=(1, P), b_strides=x_strides, c_strides=(D, 1), **norm)
        dws.append(dw)
        # d_ln = sum over the fc1 parts of d_part @ W_part; the second adds onto the first in
        # the epilogue (each element is read and written by the same program).
        res = {} if glu == GLU_NONE else dict(res=dln if i else None, res_rows=M)
        fused_gemm(
            dpart, w, dln, M, D, n, a_strides=(P, 1), b_strides=(w.stride(0), w.stride(1)), c_strides=(D, 1), **res
        )
    dx, dlnw, dlnb = ln_backward(dln, x, mean, rstd, ln_weight, ln_bias, dout, residual, rms)
    db2 = dout.float().sum(0).to(dt)
    if w1b is None:
        return dx, dlnw, dlnb, dws[0], dpre.float().sum(0).to(dt), None, None, dw2, db2
    db1a, db1b = (dpre[:, half].float().sum(0).to(dt) for half in (slice(0, Hd), slice(Hd, 2 * Hd)))
    return dx, dlnw, dlnb, dws[0], db1a, dws[1], db1b, dw2, db2


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
