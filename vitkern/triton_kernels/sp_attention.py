"""Flash-style spatial-prior attention in Triton (SPEC.md 1.2), forward and backward.

Forward: one program per (query block, batch*head); keys stream through in
blocks with an online softmax in fp32; Omega is gathered from the small
(H, 2gh-1, 2gw-1) table with the relative index computed in registers; the
log-sum-exp is saved, never the probabilities. No N x N tensor exists.

Backward (FlashAttention-2 layout): delta = rowsum(dO * O); one kernel per key
block accumulates dK and dV over query blocks, one per query block accumulates
dQ over key blocks (and, by default, d-omega with atomics). In deterministic
mode d-omega comes from its own kernel instead: one program per table cell
sums, in a fixed order, every (query, key) pair at that offset - no atomics,
bit-identical across runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prior_tile(Omega, h, offs_m, offs_n, N, gh, gw, num_prefix, stride_oh, TW):
    """(BLOCK_M, BLOCK_N) prior factors: omega[h, ry, rx] for patch pairs, 1 elsewhere.

    The table offset (ry * TW + rx) splits into a query part and a key part, so
    only one int tile is built from two vectors: keeping ry and rx as separate
    tiles spilled registers at 64 x 64 (scripts/gpu_build_report.py).
    Returns (prior, table offset, valid mask)."""
    pm = offs_m - num_prefix
    pn = offs_n - num_prefix
    q_ok = (offs_m >= num_prefix) & (offs_m < N)
    k_ok = (offs_n >= num_prefix) & (offs_n < N)
    q_base = (gh - 1 - pm // gw) * TW + (gw - 1 - pm % gw)
    k_base = (pn // gw) * TW + pn % gw
    idx = q_base[:, None] + k_base[None, :]
    valid = q_ok[:, None] & k_ok[None, :]
    return tl.load(Omega + h * stride_oh + idx, mask=valid, other=1.0).to(tl.float32), idx, valid


@triton.jit
def _sp_attn_fwd_kernel(
    Q,
    K,
    V,
    Omega,
    Out,
    Lse,  # q/k/v/out: (B, H, N, Dh) strided; omega: (H, 2gh-1, 2gw-1); lse: (B, H, N) fp32
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    stride_omh,
    H,
    N,
    gh,
    gw,
    num_prefix,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # q stays in registers for the whole key loop.
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=(offs_m < N)[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    TW = 2 * gw - 1
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k = tl.load(
            K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k)) * scale
        if HAS_PRIOR:
            prior, _, _ = _prior_tile(Omega, h, offs_m, offs_n, N, gh, gw, num_prefix, stride_omh, TW)
            s = s * prior
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    m_ok = offs_m < N
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
        acc.to(Out.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(Lse + pid_bh * N + offs_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _sp_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    Omega,
    DO,
    Lse,
    Delta,
    DK,
    DV,  # q/k/v/do: (B, H, N, Dh) strided; dk/dv: contiguous (B, H, N, Dh)
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    stride_omh,
    H,
    N,
    gh,
    gw,
    num_prefix,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < N
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    TW = 2 * gw - 1
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        do = tl.load(
            DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        lse = tl.load(Lse + pid_bh * N + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(Delta + pid_bh * N + offs_m, mask=m_ok, other=0.0)
        logit = tl.dot(q, tl.trans(k)) * scale
        if HAS_PRIOR:
            prior, _, _ = _prior_tile(Omega, h, offs_m, offs_n, N, gh, gw, num_prefix, stride_omh, TW)
        else:
            prior = tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32)
        p = tl.exp(logit * prior - lse[:, None])
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])  # gradient of the post-prior logit
        dlogit = ds * prior * scale  # chain through the prior and the scale
        dk += tl.dot(tl.trans(dlogit.to(q.dtype)), q)
    out_off = pid_bh * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _sp_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    Omega,
    DO,
    Lse,
    Delta,
    DQ,
    DOmega,  # dq: contiguous (B, H, N, Dh); domega: fp32 (H, 2gh-1, 2gw-1)
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    stride_omh,
    H,
    N,
    gh,
    gw,
    num_prefix,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    ATOMIC_DOMEGA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=q_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
        mask=q_mask,
        other=0.0,
    )
    lse = tl.load(Lse + pid_bh * N + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + pid_bh * N + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    TW = 2 * gw - 1
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k = tl.load(
            K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        logit = tl.dot(q, tl.trans(k)) * scale
        if HAS_PRIOR:
            prior, idx, valid = _prior_tile(Omega, h, offs_m, offs_n, N, gh, gw, num_prefix, stride_omh, TW)
        else:
            prior = tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32)
        p = tl.exp(logit * prior - lse[:, None])
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if HAS_PRIOR:
            if ATOMIC_DOMEGA:
                tl.atomic_add(DOmega + h * (2 * gh - 1) * TW + idx, ds * logit, mask=valid)
        dq += tl.dot((ds * prior * scale).to(k.dtype), k)
    tl.store(
        DQ + pid_bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit
def _sp_attn_bwd_domega_kernel(
    Q,
    K,
    V,
    Omega,
    DO,
    Lse,
    Delta,
    DOmega,  # one program per table cell (h, dy, dx); fixed summation order
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    stride_omh,
    B,
    H,
    N,
    gh,
    gw,
    num_prefix,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    cell = tl.program_id(0)
    TW = 2 * gw - 1
    TH = 2 * gh - 1
    h = cell // (TH * TW)
    dy = (cell // TW) % TH - (gh - 1)
    dx = cell % TW - (gw - 1)
    r0 = tl.maximum(0, -dy)
    r1 = tl.minimum(gh, gh - dy)
    c0 = tl.maximum(0, -dx)
    c1 = tl.minimum(gw, gw - dx)
    width = c1 - c0
    count = (r1 - r0) * width
    omega = tl.load(Omega + h * stride_omh + (dy + gh - 1) * TW + (dx + gw - 1)).to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_I], tl.float32)
    for b in range(0, B):
        bh = b * H + h
        for t0 in range(0, count, BLOCK_I):
            t = t0 + tl.arange(0, BLOCK_I)
            ok = t < count
            r = r0 + t // tl.maximum(width, 1)
            c = c0 + t % tl.maximum(width, 1)
            i = num_prefix + r * gw + c
            j = i + dy * gw + dx
            mask = ok[:, None] & d_ok[None, :]
            q = tl.load(
                Q + b * stride_qb + h * stride_qh + i[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            k = tl.load(
                K + b * stride_kb + h * stride_kh + j[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            v = tl.load(
                V + b * stride_vb + h * stride_vh + j[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            do = tl.load(
                DO + b * stride_dob + h * stride_doh + i[:, None] * stride_don + offs_d[None, :] * stride_dod,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            lse = tl.load(Lse + bh * N + i, mask=ok, other=0.0)
            delta = tl.load(Delta + bh * N + i, mask=ok, other=0.0)
            logit = tl.sum(q * k, 1) * scale
            p = tl.exp(logit * omega - lse)
            ds = p * (tl.sum(do * v, 1) - delta)
            acc += tl.where(ok, ds * logit, 0.0)
    tl.store(DOmega + cell, tl.sum(acc, 0))


def _block_sizes(head_dim: int, has_prior: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps), chosen from a register sweep on sm_80
    and sm_90 (benchmarks/NOTES.md): the largest tiles with no spill in any of the
    three kernels. With a prior, 64 x 64 / 8 warps spills 16-32 B at Dh 64/128 on
    sm_80 (the prior's offset tile costs registers), so those use 32-row tiles."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d <= 32:
        return 64, 32, block_d, 4
    return (32, 64, block_d, 8) if has_prior else (64, 64, block_d, 8)


def _dkdv_block_m(head_dim: int, has_prior: bool) -> int:
    """Query-block rows of the dK/dV kernel (its inner loop). With 16-byte-aligned
    pointers (as every launch has them) 64 rows spill 8 B on sm_80 at Dh 64 without a
    prior (REG 255); 32 rows do not (scripts/gpu_build_report.py)."""
    block_m, _, block_d, _ = _block_sizes(head_dim, has_prior)
    return 32 if block_d == 64 and not has_prior else block_m


def _domega_config(head_dim: int) -> tuple[int, int]:
    """(BLOCK_I, num_warps) of the deterministic d-omega kernel (four fp32 tiles of
    BLOCK_I x BLOCK_D live at once); from the same register sweep, spill-free on
    sm_80 and sm_90 in fp16 and bf16."""
    if head_dim <= 32:
        return 64, 4
    if head_dim <= 64:
        return 32, 4
    return (32, 8) if head_dim < 128 else (8, 4)


# ----------------------------------------------------------------------------- autotuning
# The tile (BLOCK_M, BLOCK_N, warps) per head-dim class and prior comes from the register
# sweep above; the autotuner chooses the software-pipelining depth on the device, keyed on
# the sequence length, head dim, prior and dtype. Every configuration it can pick is compiled
# for sm_80 and sm_90 by scripts/gpu_build_report.py (no spill). The first is the default
# (and the interpreter's only one).
ATTN_STAGES = (3, 2)
_BLOCK_D_CLASSES = (16, 32, 64, 128)
# (kernel, BLOCK_D, prior, stages) left out of the space: the build report showed a spill
# (dK/dV at Dh 80-128 without a prior, 2 stages: 8 B of STACK on sm_90, REG 255).
_EXCLUDED = {("dkdv", 128, False, 2)}


def attention_configs(kind: str, head_dim: int, has_prior: bool) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may pick for kernel ``kind``
    ("fwd", "dkdv" or "dq") at this head dim, with or without a prior."""
    bm, bn, block_d, warps = _block_sizes(head_dim, has_prior)
    if kind == "dkdv":
        bm = _dkdv_block_m(head_dim, has_prior)
    return [(bm, bn, warps, st) for st in ATTN_STAGES if (kind, block_d, has_prior, st) not in _EXCLUDED]


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotuned(kernel, kind: str, extra_key: tuple[str, ...] = (), reset_to_zero=None):
    every = {cfg for bd in _BLOCK_D_CLASSES for prior in (True, False) for cfg in attention_configs(kind, bd, prior)}
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in sorted(every, key=lambda c: (c[0], c[1], c[2], -c[3]))
    ]

    def prune(configs, named_args, **kwargs):
        allowed = attention_configs(kind, kwargs["HEAD_DIM"], kwargs["HAS_PRIOR"])
        by_key = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs}
        kept = [by_key[a] for a in allowed]
        return kept[:1] if _interpreting() else kept

    return triton.autotune(
        configs=configs,
        key=["N", "HEAD_DIM", "HAS_PRIOR", *extra_key],
        prune_configs_by={"early_config_prune": prune},
        reset_to_zero=reset_to_zero,
    )(kernel)


_sp_attn_fwd = _autotuned(_sp_attn_fwd_kernel, "fwd")
_sp_attn_bwd_dkdv = _autotuned(_sp_attn_bwd_dkdv_kernel, "dkdv")
# d-omega is accumulated with atomics: zeroed before each benchmarked configuration and again
# before the real launch (triton's reset_to_zero).
_sp_attn_bwd_dq = _autotuned(_sp_attn_bwd_dq_kernel, "dq", ("ATOMIC_DOMEGA",), reset_to_zero=["DOmega"])


def sp_attention_fwd(q, k, v, omega, grid, num_prefix, scale):
    """Returns (out (B, H, N, Dh) in q's dtype, lse (B, H, N) fp32)."""
    B, H, N, Dh = q.shape
    gh, gw = grid if grid is not None else (1, 1)
    BLOCK_D = _block_sizes(Dh, omega is not None)[2]
    out = torch.empty((B, H, N, Dh), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    om = omega.contiguous() if omega is not None else q  # dummy pointer when there is no prior
    _sp_attn_fwd[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q,
        k,
        v,
        om,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        om.stride(0) if omega is not None else 0,
        H,
        N,
        gh,
        gw,
        num_prefix,
        scale,
        HEAD_DIM=Dh,
        BLOCK_D=BLOCK_D,
        HAS_PRIOR=omega is not None,
    )
    return out, lse


def sp_attention_bwd(dout, q, k, v, omega, out, lse, grid, num_prefix, scale, deterministic: bool):
    """Returns (dq, dk, dv, domega or None)."""
    B, H, N, Dh = q.shape
    gh, gw = grid if grid is not None else (1, 1)
    BLOCK_D = _block_sizes(Dh, omega is not None)[2]
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (B, H, N)
    dq = torch.empty((B, H, N, Dh), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    has_prior = omega is not None
    om = omega.contiguous() if has_prior else q
    domega = torch.zeros((H, 2 * gh - 1, 2 * gw - 1), device=q.device, dtype=torch.float32) if has_prior else None
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), om.stride(0) if has_prior else 0)
    common = dict(HEAD_DIM=Dh, BLOCK_D=BLOCK_D, HAS_PRIOR=has_prior)
    _sp_attn_bwd_dkdv[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        q,
        k,
        v,
        om,
        dout,
        lse,
        delta,
        dk,
        dv,
        *strides,
        H,
        N,
        gh,
        gw,
        num_prefix,
        scale,
        **common,
    )
    _sp_attn_bwd_dq[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q,
        k,
        v,
        om,
        dout,
        lse,
        delta,
        dq,
        domega if has_prior else dq,
        *strides,
        H,
        N,
        gh,
        gw,
        num_prefix,
        scale,
        ATOMIC_DOMEGA=has_prior and not deterministic,
        **common,
    )
    if has_prior and deterministic:
        _sp_attn_bwd_domega_kernel[(H * (2 * gh - 1) * (2 * gw - 1),)](
            q,
            k,
            v,
            om,
            dout,
            lse,
            delta,
            domega,
            *strides,
            B,
            H,
            N,
            gh,
            gw,
            num_prefix,
            scale,
            HEAD_DIM=Dh,
            BLOCK_D=BLOCK_D,
            BLOCK_I=_domega_config(Dh)[0],
            num_warps=_domega_config(Dh)[1],
        )
    return dq, dk, dv, (domega.to(omega.dtype) if has_prior else None)
