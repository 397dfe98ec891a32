"""One fused, autotuned Triton GEMM that the patch-embedding and LayerNorm-MLP
kernels are built from (docs/DESIGN.md §1.1 and 1.4), forward and backward.

    C[m, n] = epilogue( sum_k prologue_A(A)[m, k] * prologue_B(B)[k, n] )

Operands are read through arbitrary strides (so a transposed weight or a
transposed gradient is a stride swap, never a copy), and each operand can be
produced on the fly instead of read from memory:

A prologue (A_MODE)   0 strided   1 LayerNorm of the row (x - mean[m]) * rstd[m] * w[k] + b[k]
                        (an RMSNorm is the same prologue with mean 0 and no b)
                      2 patch gather: row m = patch token, column k = (c, py, px) pixel of the image
B prologue (B_MODE)   0 strided   1 LayerNorm with statistics per row k, affine per column n
                      2 patch gather with k = token, n = pixel   3 activation of the stored pre-activation
                      B_GATED (4) gated activation act(gate) * value of a stored (tokens, 2 hidden) pre-activation
A prologue A_GATED (3) act(gate) * value of the stored pre-activation (gated MLPs): A points at the
                      value half, the gate half is ``goff`` columns away (negative: gate first)
Epilogue              + bias[n]; store the pre-activation; the activation (EPI_GELU: GELU erf/tanh,
                      QuickGELU or SiLU by the ACT code, ACT_* below) or, for the backward (EPI_DGELU),
                      multiply by act'(pre); + residual[m % res_rows, n]; store strided or
                      scatter back into image layout (C_MODE 1, the patch embedding's d-image).
                      EPI_DGLU (gated backward): acc = dh, Pre = the value half of the stored
                      pre-activation (gate ``goff`` columns away); stores d value = dh * act(gate)
                      at C and d gate = dh * value * act'(gate) at C + goff columns.

fp32 accumulation for every input dtype. fp32 inputs use tf32 tensor cores only
when torch's matmul precision setting allows it, like torch's own matmul
(:func:`tf32_allowed`, which reads the current ``fp32_precision`` API and falls
back to the legacy ``allow_tf32`` flag).

Row, column and image offsets are formed in 64 bits: Triton types an integer
argument below 2**31 as i32, and ``row * stride`` overflows 32 bits well inside
real batch sizes (ViT-L/16 at 1024 px: the MLP GEMM from batch 128). Launches run
under the operands' CUDA device (so on its current stream), and the shared-memory
prune reads that device's limit.

Autotuning: the configurations below, keyed on the problem size and the fusion
mode, pruned to those whose tiles are not larger than the problem and whose
pipelined operand tiles fit the device's shared memory; the interpreter keeps one.
"""

from __future__ import annotations

import contextlib
import os
from collections import namedtuple

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Every one is compiled for sm_80 and
# sm_90 in every fusion mode by scripts/gpu_build_report.py (no spill).
CONFIGS = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 8, 3),
    (64, 64, 32, 4, 4),
    (32, 64, 32, 4, 4),
]
# Prologue / store modes by name (module docstring): the Python ints are what launches pass, the
# tl.constexpr twins what the kernels compare against.
A_STRIDED, A_LAYERNORM, A_PATCH_GATHER, A_GATED = 0, 1, 2, 3
B_STRIDED, B_LAYERNORM, B_PATCH_GATHER, B_ACT, B_GATED = 0, 1, 2, 3, 4
C_STRIDED, C_IMAGE_SCATTER = 0, 1
_A_LAYERNORM, _A_PATCH_GATHER, _A_GATED = tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
_B_LAYERNORM, _B_PATCH_GATHER, _B_ACT, _B_GATED = tl.constexpr(1), tl.constexpr(2), tl.constexpr(3), tl.constexpr(4)
_C_IMAGE_SCATTER = tl.constexpr(1)
# Default shared-memory budget for the prune when no device can be queried: sm_80's 163 KiB.
_SMEM_DEFAULT = 166912


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32 tensor cores. The ``fp32_precision``
    API (``torch.backends.cuda.matmul``, then the global ``torch.backends``) decides
    when set ("tf32" or "ieee"); otherwise the legacy ``allow_tf32`` flag, which
    raises once the new API has been used, so it is read only as the fallback."""
    matmul = torch.backends.cuda.matmul
    for prec in (getattr(matmul, "fp32_precision", "none"), getattr(torch.backends, "fp32_precision", "none")):
        if prec == "tf32":
            return True
        if prec == "ieee":
            return False
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def device_guard(t: torch.Tensor):
    """Context in which a Triton launch for ``t`` runs on ``t``'s CUDA device (Triton
    launches on the current device and its current stream); nothing for CPU tensors."""
    return cuda_device_guard(t.device)


def cuda_device_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def smem_limit(device: torch.device | None = None) -> int:
    """Opt-in shared memory per block (bytes) of ``device`` (a CUDA device; sm_80's
    163 KiB when there is none, e.g. under the interpreter)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return int(getattr(props, "shared_memory_per_block_optin", _SMEM_DEFAULT))
    return _SMEM_DEFAULT


def capability(device: torch.device | None = None) -> int:
    """Compute capability of ``device`` as 10 * major + minor (80, sm_80's, when there is no
    CUDA device, e.g. under the interpreter)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return 10 * major + minor
    return 80


def config_fits(bm: int, bn: int, bk: int, stages: int, elem_bytes: int, smem: int = _SMEM_DEFAULT) -> bool:
    """The pipelined A and B tiles (stages x (BM x BK + BK x BN)) fit in shared memory."""
    return stages * (bm * bk + bk * bn) * elem_bytes <= smem


def _spills_on_sm120(bm: int, bn: int, stages: int, kwargs) -> bool:
    """Tiles that spill only in sm_120's code generation (fp16/bf16, the build report): the
    GELU and image-gather B prologues (B_MODE 2, 3) at 64 x 128 (8 B) and 64 x 64 with 4
    stages (16 B, bf16), the image scatter (C_MODE 1) at 128 x 128 (40 B)."""
    if kwargs.get("B_MODE") in (B_PATCH_GATHER, B_ACT) and bm == 64 and (bn == 128 or stages == 4):
        return True
    return kwargs.get("C_MODE") == C_IMAGE_SCATTER and bm == 128 and bn == 128


def _prune(configs, named_args, **kwargs):
    M, N = named_args["M"], named_args["N"]
    a = named_args["A"]
    elem = a.element_size() if hasattr(a, "element_size") else 2
    smem = smem_limit(a.device) if hasattr(a, "device") else _SMEM_DEFAULT
    arch = capability(a.device) if hasattr(a, "device") else 80
    # Tiles larger than the (power-of-two rounded) problem only add masked work.
    cap_m = max(32, triton.next_power_of_2(M))
    cap_n = max(32, triton.next_power_of_2(N))
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if bm > cap_m or bn > cap_n or not config_fits(bm, bn, bk, c.num_stages, elem, smem):
            continue
        fp32_wide = (arch >= 120 and kwargs.get("A_MODE", 0) in (A_STRIDED, A_LAYERNORM)) or (
            100 <= arch < 120 and kwargs.get("A_MODE", 0) == A_GATED
        )
        if elem == 4 and fp32_wide and kwargs.get("B_MODE", 0) == 0:
            # fp32 on sm_120: 32 x 64 w4 s4 spills with the LayerNorm prologue (32 B, with or without
            # STORE_PRE) and with a plain A + residual (8 B); on sm_100 with the gated prologue (16 B);
            # 64 x 64 w4 s4 is clean there (no B prologue to spill as in dW1/dW2). These take 64 x 64
            # instead (32 x 64 if the problem is smaller than 64 rows).
            spills_at_32 = kwargs.get("A_MODE") in (A_LAYERNORM, A_GATED) or (
                kwargs.get("A_MODE", 0) == 0 and kwargs.get("HAS_RES")
            )
            if spills_at_32 and cap_m >= 64:
                if (bm, bn, c.num_stages) != (64, 64, 4):
                    continue
                kept.append(c)
                continue
        if elem == 4 and bm > 32:  # fp32 (IEEE dots on CUDA cores): 64/128-row tiles spill in dW1/dW2 on sm_80
            continue
        if (
            kwargs.get("EPI_DGELU") or kwargs.get("EPI_DGLU")
        ) and bm == 128:  # the GELU' epilogue at 128 rows: 8 B spill on sm_80 (REG 255)
            continue
        if (
            kwargs.get("C_MODE") == C_IMAGE_SCATTER and bm == 128 and c.num_warps == 4
        ):  # image scatter: 16 B spill on sm_90
            continue
        if arch >= 120 and _spills_on_sm120(bm, bn, c.num_stages, kwargs):
            continue
        if kwargs.get("A_MODE") == A_GATED and (
            (bm, bn, c.num_warps, c.num_stages) == (128, 64, 4, 4)  # 256-280 B spill on sm_86/89/120 (fp16/bf16)
            or (100 <= arch < 120 and (bm, bn) == (64, 128))  # 8 B on sm_100 (bf16)
        ):
            continue
        kept.append(c)
    if not kept:
        kept = [configs[-1]]
    if _interpreting():  # no benchmarking on the interpreter: the smallest tile that covers the problem
        kept = [kept[-1]]
    return kept


_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in CONFIGS
]


# Activation codes (constexpr ACT), shared with the C++ kernels (csrc/vitkern/simd.h, enum Act)
# and vitkern/ops/layernorm_mlp.py: the MLP's nonlinearity.
ACT_GELU = 1  # exact GELU, x * Phi(x) (erf)
ACT_GELU_TANH = 2  # GELU, tanh approximation
ACT_QUICK_GELU = 3  # x * sigmoid(1.702 x) (CLIP)
ACT_SILU = 4  # x * sigmoid(x) (SwiGLU's gate)


@triton.jit
def _act(x, ACT: tl.constexpr):
    """The activation ``ACT`` of fp32 ``x`` (see the ACT_* codes above)."""
    if ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        return 0.5 * x * (1.0 + t)
    elif ACT == 3:
        return x * tl.sigmoid(1.702 * x)
    else:
        return x * tl.sigmoid(x)


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """d act / dx of fp32 ``x``."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        du = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    elif ACT == 3:
        s = tl.sigmoid(1.702 * x)
        return s + 1.702 * x * s * (1.0 - s)
    else:
        s = tl.sigmoid(x)
        return s + x * s * (1.0 - s)


# Argument groups of the K-loop step _mac_block, built in the kernel and passed as named
# tuples (Triton 3.x passes tuples into and between @triton.jit functions and keeps their
# constexpr members constexpr): the A prologue's per-row values, the B prologue's per-column
# values, the LayerNorm operands, the patch geometry and the fusion modes.
_ARows = namedtuple("_ARows", "row mean rstd goff")
_BCols = namedtuple("_BCols", "col w b goff")
_LnArgs = namedtuple("_LnArgs", "Mean Rstd LnW LnB")
_Image = namedtuple("_Image", "NP gw P s_ib s_ic s_ih s_iw")
_Modes = namedtuple("_Modes", "A_MODE B_MODE HAS_LNW HAS_LNB ACT ALLOW_TF32")


@triton.jit
def _token_offset(tok, img):
    """int64 image offset of patch token ``tok`` (i32, b * NP + row * gw + col) in the image
    ``img`` (an _Image). Token and pixel offsets are separate, so an (M, K) tile costs one
    add; the divisions stay in 32 bits (a 64-bit division is a long software routine), the
    products are 64-bit."""
    b = (tok // img.NP).to(tl.int64)
    t = tok % img.NP
    return b * img.s_ib + (t // img.gw).to(tl.int64) * img.P * img.s_ih + (t % img.gw).to(tl.int64) * img.P * img.s_iw


@triton.jit
def _pixel_offset(pix, img):
    """int64 image offset of pixel ``pix`` (i32, (c * P + py) * P + px) within a patch of ``img``."""
    PP = img.P * img.P
    r = pix % PP
    return (
        (pix // PP).to(tl.int64) * img.s_ic + (r // img.P).to(tl.int64) * img.s_ih + (r % img.P).to(tl.int64) * img.s_iw
    )


@triton.jit
def _mac_block(acc, A, B, a_ptrs, b_ptrs, offs_k, K, arow, bcol, ln, img, modes, MASKED: tl.constexpr):
    """acc += prologue_A(A tile) @ prologue_B(B tile) for the K columns ``offs_k``.
    ``arow`` (_ARows), ``bcol`` (_BCols), ``ln`` (_LnArgs), ``img`` (_Image) and the
    constexpr ``modes`` (_Modes) are the kernel's argument groups; ``MASKED``: the ragged
    tail block (loads masked to k < K)."""
    k_ok = offs_k < K
    # ---- A tile (BLOCK_M, BLOCK_K)
    if modes.A_MODE == _A_PATCH_GATHER:
        a_col = _pixel_offset(offs_k, img)
        a_src = A + arow.row[:, None] + a_col[None, :]
    else:
        a_src = a_ptrs
    if MASKED:
        a = tl.load(a_src, mask=k_ok[None, :], other=0.0)
    else:
        a = tl.load(a_src)
    if modes.A_MODE == _A_GATED:
        # act(gate) * value, each rounded to the storage dtype like the eager product.
        if MASKED:
            ag = tl.load(a_src + arow.goff, mask=k_ok[None, :], other=0.0)
        else:
            ag = tl.load(a_src + arow.goff)
        ag = _act(ag.to(tl.float32), modes.ACT).to(A.dtype.element_ty).to(tl.float32)
        a = (ag * a.to(tl.float32)).to(A.dtype.element_ty)
    if modes.A_MODE == _A_LAYERNORM:
        if MASKED:
            lw = tl.load(ln.LnW + offs_k, mask=k_ok, other=0.0) if modes.HAS_LNW else None
            lb = tl.load(ln.LnB + offs_k, mask=k_ok, other=0.0) if modes.HAS_LNB else None
        else:
            lw = tl.load(ln.LnW + offs_k) if modes.HAS_LNW else None
            lb = tl.load(ln.LnB + offs_k) if modes.HAS_LNB else None
        xhat = (a.to(tl.float32) - arow.mean[:, None]) * arow.rstd[:, None]
        if modes.HAS_LNW:
            xhat = xhat * lw.to(tl.float32)[None, :]
        if modes.HAS_LNB:
            xhat = xhat + lb.to(tl.float32)[None, :]
        if MASKED:
            xhat = tl.where(k_ok[None, :], xhat, 0.0)
        a = xhat.to(A.dtype.element_ty)
    # ---- B tile (BLOCK_K, BLOCK_N)
    if modes.B_MODE == _B_PATCH_GATHER:
        b_row = _token_offset(offs_k, img)
        b_src = B + b_row[:, None] + bcol.col[None, :]
    else:
        b_src = b_ptrs
    if MASKED:
        b = tl.load(b_src, mask=k_ok[:, None], other=0.0)
    else:
        b = tl.load(b_src)
    if modes.B_MODE == _B_LAYERNORM:
        if MASKED:
            k_mean = tl.load(ln.Mean + offs_k, mask=k_ok, other=0.0)
            k_rstd = tl.load(ln.Rstd + offs_k, mask=k_ok, other=0.0)
        else:
            k_mean = tl.load(ln.Mean + offs_k)
            k_rstd = tl.load(ln.Rstd + offs_k)
        bhat = (b.to(tl.float32) - k_mean[:, None]) * k_rstd[:, None] * bcol.w[None, :] + bcol.b[None, :]
        if MASKED:
            bhat = tl.where(k_ok[:, None], bhat, 0.0)
        b = bhat.to(B.dtype.element_ty)
    if modes.B_MODE == _B_ACT:
        b = _act(b.to(tl.float32), modes.ACT).to(B.dtype.element_ty)
    if modes.B_MODE == _B_GATED:
        if MASKED:
            bg = tl.load(b_src + bcol.goff, mask=k_ok[:, None], other=0.0)
        else:
            bg = tl.load(b_src + bcol.goff)
        bg = _act(bg.to(tl.float32), modes.ACT).to(B.dtype.element_ty).to(tl.float32)
        b = (bg * b.to(tl.float32)).to(B.dtype.element_ty)
    b = b.to(a.dtype)
    if modes.ALLOW_TF32:
        acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.autotune(
    configs=_AUTOTUNE_CONFIGS,
    key=["M", "N", "K", "A_MODE", "B_MODE", "C_MODE", "EPI_GELU", "EPI_DGELU", "EPI_DGLU", "HAS_RES"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def fused_gemm_kernel(
    A,
    B,
    C,
    Bias,
    Res,
    Pre,
    Mean,
    Rstd,
    LnW,
    LnB,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_rm,
    stride_rn,
    stride_pm,
    stride_pn,
    res_rows,
    goff,
    NP,
    gw,
    P,
    s_ib,
    s_ic,
    s_ih,
    s_iw,
    A_MODE: tl.constexpr,
    B_MODE: tl.constexpr,
    C_MODE: tl.constexpr,
    HAS_LNW: tl.constexpr,
    HAS_LNB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    ACT: tl.constexpr,
    STORE_PRE: tl.constexpr,
    EPI_GELU: tl.constexpr,
    EPI_DGELU: tl.constexpr,
    EPI_DGLU: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks share their B column blocks in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Operand rows/columns past the edge wrap around (loads stay in bounds without a mask;
    # the epilogue's store mask drops those results), so the K loop masks only K.
    rm = offs_m % M
    rn = offs_n % N
    offs_kb = tl.arange(0, BLOCK_K)
    # Per-mode row/column values; placeholders (unused) in the other modes.
    a_mean = tl.zeros([BLOCK_M], tl.float32)
    a_rstd = a_mean
    if A_MODE == _A_LAYERNORM:
        a_mean = tl.load(Mean + rm)
        a_rstd = tl.load(Rstd + rm)
    img = _Image(NP, gw, P, s_ib, s_ic, s_ih, s_iw)
    a_row = _token_offset(rm, img)
    a_ptrs = A + rm.to(tl.int64)[:, None] * stride_am + offs_kb[None, :] * stride_ak
    b_w = tl.full([BLOCK_N], 1.0, tl.float32)
    b_b = tl.zeros([BLOCK_N], tl.float32)
    if B_MODE == _B_LAYERNORM:
        if HAS_LNW:
            b_w = tl.load(LnW + rn).to(tl.float32)
        if HAS_LNB:
            b_b = tl.load(LnB + rn).to(tl.float32)
    b_col = _pixel_offset(rn, img)
    b_ptrs = B + offs_kb[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
    # Gated modes: the gate half's element offset from the value half (signed; small, so 32-bit).
    arow = _ARows(a_row, a_mean, a_rstd, goff * stride_ak)
    bcol = _BCols(b_col, b_w, b_b, goff * stride_bn)
    ln = _LnArgs(Mean, Rstd, LnW, LnB)
    modes: tl.constexpr = _Modes(A_MODE, B_MODE, HAS_LNW, HAS_LNB, ACT, ALLOW_TF32)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Full K blocks without a mask (their loads pipeline through shared memory), then
    # one masked tail block when K is ragged (K = tokens in the weight-gradient GEMMs).
    k_full = (K // BLOCK_K) * BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        acc = _mac_block(acc, A, B, a_ptrs, b_ptrs, k0 + offs_kb, K, arow, bcol, ln, img, modes, False)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if k_full < K:
        acc = _mac_block(acc, A, B, a_ptrs, b_ptrs, k_full + offs_kb, K, arow, bcol, ln, img, modes, True)

    # ---- epilogue
    c_mask = m_ok[:, None] & n_ok[None, :]
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    if HAS_BIAS:
        acc = acc + tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        tl.store(
            Pre + rows[:, None] * stride_pm + cols[None, :] * stride_pn,
            acc.to(Pre.dtype.element_ty),
            mask=c_mask,
        )
    if EPI_DGELU:
        pre = tl.load(Pre + rows[:, None] * stride_pm + cols[None, :] * stride_pn, mask=c_mask, other=0.0)
        acc = acc * _act_grad(pre.to(tl.float32), ACT)
    if EPI_DGLU:
        p_ptrs = Pre + rows[:, None] * stride_pm + cols[None, :] * stride_pn
        p_goff = goff * stride_pn
        v = tl.load(p_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        gt = tl.load(p_ptrs + p_goff, mask=c_mask, other=0.0).to(tl.float32)
        ag = _act(gt, ACT).to(C.dtype.element_ty).to(tl.float32)
        c_ptrs = C + rows[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs + goff * stride_cn, (acc * v * _act_grad(gt, ACT)).to(C.dtype.element_ty), mask=c_mask)
        acc = acc * ag
    if EPI_GELU:
        # GELU of the pre-activation as stored in the output dtype (what eager PyTorch computes).
        acc = _act(acc.to(C.dtype.element_ty).to(tl.float32), ACT)
    if HAS_RES:
        r_rows = (offs_m % res_rows).to(tl.int64)
        acc = acc + tl.load(Res + r_rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=c_mask, other=0.0).to(
            tl.float32
        )
    if C_MODE == _C_IMAGE_SCATTER:
        c_row = _token_offset(offs_m, img)
        c_col = _pixel_offset(offs_n, img)
        tl.store(C + c_row[:, None] + c_col[None, :], acc.to(C.dtype.element_ty), mask=c_mask)
    else:
        tl.store(C + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(C.dtype.element_ty), mask=c_mask)


def _strides(t: torch.Tensor | None, transpose: bool = False) -> tuple[int, int]:
    if t is None:
        return 0, 0
    s0, s1 = t.stride(-2), t.stride(-1)
    return (s1, s0) if transpose else (s0, s1)


def fused_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    M: int,
    N: int,
    K: int,
    *,
    a_strides: tuple[int, int] = (0, 0),
    b_strides: tuple[int, int] = (0, 0),
    c_strides: tuple[int, int] = (0, 0),
    a_mode: int = 0,
    b_mode: int = 0,
    c_mode: int = 0,
    bias: torch.Tensor | None = None,
    res: torch.Tensor | None = None,
    res_rows: int = 1,
    pre: torch.Tensor | None = None,
    store_pre: bool = False,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    act: int = 1,
    epi_gelu: bool = False,
    epi_dgelu: bool = False,
    epi_dglu: bool = False,
    goff: int = 0,
    patch: tuple[int, int, int, tuple[int, int, int, int]] | None = None,
) -> torch.Tensor:
    """Launch :func:`fused_gemm_kernel`; see the module docstring for the modes.
    ``goff``: the gated modes' column offset of the gate half from the value half.
    ``patch`` = (tokens per image, grid width, P, image strides (b, c, h, w))."""
    dummy = out
    NP, gw, P, img_strides = patch if patch is not None else (1, 1, 1, (0, 0, 0, 0))
    allow_tf32 = out.dtype == torch.float32 and tf32_allowed() and not _interpreting()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    with device_guard(out):
        fused_gemm_kernel[grid](
            a,
            b,
            out,
            bias if bias is not None else dummy,
            res if res is not None else dummy,
            pre if pre is not None else dummy,
            mean if mean is not None else dummy,
            rstd if rstd is not None else dummy,
            ln_weight if ln_weight is not None else dummy,
            ln_bias if ln_bias is not None else dummy,
            M,
            N,
            K,
            *a_strides,
            *b_strides,
            *c_strides,
            *_strides(res),
            *_strides(pre),
            res_rows,
            goff,
            NP,
            gw,
            P,
            *img_strides,
            A_MODE=a_mode,
            B_MODE=b_mode,
            C_MODE=c_mode,
            HAS_LNW=ln_weight is not None,
            HAS_LNB=ln_bias is not None,
            HAS_BIAS=bias is not None,
            HAS_RES=res is not None,
            ACT=act,
            STORE_PRE=store_pre,
            EPI_GELU=epi_gelu,
            EPI_DGELU=epi_dgelu,
            EPI_DGLU=epi_dglu,
            ALLOW_TF32=allow_tf32,
        )
    return out
