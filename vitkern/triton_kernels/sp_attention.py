"""Flash-style spatial-prior attention in Triton (docs/DESIGN.md §1.2), forward and backward.

Forward: one program per (query block, batch*head); keys stream through in
blocks with an online softmax in fp32; Omega is gathered from the small
(H, 2gh-1, 2gw-1) table with the relative index computed in registers; the
log-sum-exp is saved, never the probabilities. No N x N tensor exists.

Backward (FlashAttention-2 layout): delta = rowsum(dO * O); one kernel per key
block accumulates dK and dV over query blocks, one per query block accumulates
dQ over key blocks. d-omega comes from its own kernel, without atomics: one
program per (head, row offset dy, batch chunk) walks the pairs of patch rows
(query row r, key row r + dy), recomputes their (gw x gw) score tile with the
tensor cores and accumulates ds * logit into a register tile; the tile's
diagonals (kx - qx = dx) are summed once at the end into a partial table that
torch sums over the batch chunks. Fixed summation order: bit-identical across
runs, and no atomic per score element (the previous kernel issued one per
(query, key) pair).

Launch rules that matter on a real GPU:
- one-dimensional grid (query blocks fastest, then batch*head), so B*H is not
  bound by grid axis y's 65,535 limit and the query blocks of one head still
  run next to each other (K/V reuse in L2);
- batch/head offsets are formed in 64 bits (``.to(tl.int64)`` before the
  stride multiply): Triton types an integer argument below 2**31 as i32;
- fp32 inputs use TF32 tensor cores only when torch's matmul setting allows it
  (:func:`vitkern.triton_kernels.gemm.tf32_allowed`), otherwise IEEE fp32 dots;
- each launch runs under the inputs' CUDA device (and so its current stream);
- the autotuner only sees configurations whose shared memory fits the device.
"""

from __future__ import annotations

from collections import namedtuple

import torch
import triton
import triton.language as tl

from vitkern.triton_kernels.gemm import capability, device_guard, smem_limit, tf32_allowed

# The prior's arguments as one group for the prior helpers (a named tuple: Triton passes
# tuples into @triton.jit functions): the table, the head, the sequence length, the patch
# grid, the prefix tokens, the table's head stride and row width (2 gw - 1).
_PriorArgs = namedtuple("_PriorArgs", "Omega h N gh gw num_prefix stride_omh TW")


@triton.jit
def _prior_tile(pr, offs_m, offs_n):
    """(BLOCK_M, BLOCK_N) prior factors: omega[h, ry, rx] for patch pairs, 1 elsewhere
    (``pr``: the prior's arguments, a _PriorArgs).

    The table offset (ry * TW + rx) splits into a query part and a key part, so
    only one int tile is built from two vectors: keeping ry and rx as separate
    tiles spilled registers at 64 x 64 (scripts/gpu_build_report.py).
    """
    pm = offs_m - pr.num_prefix
    pn = offs_n - pr.num_prefix
    q_ok = (offs_m >= pr.num_prefix) & (offs_m < pr.N)
    k_ok = (offs_n >= pr.num_prefix) & (offs_n < pr.N)
    q_base = (pr.gh - 1 - pm // pr.gw) * pr.TW + (pr.gw - 1 - pm % pr.gw)
    k_base = (pn // pr.gw) * pr.TW + pn % pr.gw
    idx = q_base[:, None] + k_base[None, :]
    valid = q_ok[:, None] & k_ok[None, :]
    return tl.load(pr.Omega + pr.h * pr.stride_omh + idx, mask=valid, other=1.0).to(tl.float32)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation; ``IEEE``: full fp32 products (no TF32) for
    fp32 operands when torch's matmul precision setting forbids TF32."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _program_ids(N, H, BLOCK: tl.constexpr):
    """(block index along the sequence, batch, head, batch*head) of this program in the
    one-dimensional grid of :func:`attention_grid` (sequence blocks fastest). The divisions
    stay in 32 bits (a 64-bit division is a software routine with a stack frame); batch,
    head and batch*head come back as int64 for the offset products."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(N, BLOCK)
    bh = pid // num_blocks
    return pid % num_blocks, (bh // H).to(tl.int64), (bh % H).to(tl.int64), bh.to(tl.int64)


@triton.jit
def _head_ptr(X, b, h, stride_b, stride_h):
    """X advanced to the (N, Dh) matrix of batch b, head h (b and h int64: no 32-bit overflow)."""
    return X + b * stride_b + h * stride_h


@triton.jit
def _tile_ptrs(base, rows, offs_d, stride_n, stride_d):
    """(len(rows), BLOCK_D) pointers base[rows, offs_d] into one head's (N, Dh) matrix."""
    return base + rows[:, None] * stride_n + offs_d[None, :] * stride_d


@triton.jit
def _load_rows(base, rows, offs_d, stride_n, stride_d, mask):
    """(len(rows), BLOCK_D) tile base[rows, offs_d] of one head's (N, Dh) matrix; 0 where
    ``mask`` (rows in range & d < Dh) is false."""
    return tl.load(_tile_ptrs(base, rows, offs_d, stride_n, stride_d), mask=mask, other=0.0)


@triton.jit
def _load_row_stats(Lse, Delta, row0, offs, ok):
    """The forward's log-sum-exp and delta = rowsum(dO * O) at rows ``offs`` of one head
    (``row0`` = batch*head * N: both are contiguous (B, H, N))."""
    lse = tl.load(Lse + row0 + offs, mask=ok, other=0.0)
    delta = tl.load(Delta + row0 + offs, mask=ok, other=0.0)
    return lse, delta


@triton.jit
def _dot_nt(a, b, ROWS: tl.constexpr, COLS: tl.constexpr, IEEE: tl.constexpr):
    """a @ b^T into a fresh (ROWS, COLS) fp32 tile (scores q k^T and dp = dO v^T)."""
    return _dot(a, tl.trans(b), tl.zeros([ROWS, COLS], tl.float32), IEEE)


@triton.jit
def _prior_or_one(pr, offs_m, offs_n, BLOCK_M, BLOCK_N, HAS_PRIOR: tl.constexpr):
    """(BLOCK_M, BLOCK_N) prior factors of :func:`_prior_tile`, or ones without a prior."""
    if HAS_PRIOR:
        prior = _prior_tile(pr, offs_m, offs_n)
    else:
        prior = tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32)
    return prior


@triton.jit
def _probs(logit, prior, lse):
    """Softmax probabilities recomputed from the saved log-sum-exp: exp(logit * prior - lse)."""
    return tl.exp(logit * prior - lse[:, None])


@triton.jit
def _dsoftmax(p, dp, delta):
    """ds = p * (dp - delta): the gradient of the post-prior logit (softmax backward)."""
    return p * (dp - delta[:, None])


@triton.jit
def _bwd_probs(q, k, lse, offs_m, offs_n, m_ok, n_ok, pr, scale, BLOCK_M, BLOCK_N, HAS_PRIOR, IEEE):
    """The backward's recomputed (BLOCK_M, BLOCK_N) tile: (p, prior), the probabilities
    exp(q k^T * scale * prior - lse), 0 outside the sequence, and the prior factors
    (ones without a prior). ``pr``: the prior's arguments (_PriorArgs)."""
    logit = _dot_nt(q, k, BLOCK_M, BLOCK_N, IEEE) * scale
    prior = _prior_or_one(pr, offs_m, offs_n, BLOCK_M, BLOCK_N, HAS_PRIOR)
    p = _probs(logit, prior, lse)
    p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
    return p, prior


@triton.jit
def _bwd_dlogit(do, v, p, prior, delta, scale, BLOCK_M, BLOCK_N, IEEE):
    """Gradient of the raw score q k^T: ds * prior * scale, with ds = p * (dO v^T - delta)."""
    dp = _dot_nt(do, v, BLOCK_M, BLOCK_N, IEEE)
    ds = _dsoftmax(p, dp, delta)
    return ds * prior * scale  # chain through the prior and the scale


@triton.jit
def _sp_attn_fwd_kernel(
    Q,  # (B, H, N, Dh), any strides: stride_q{b,h,n,d}
    K,  # (B, H, N, Dh), any strides: stride_k{b,h,n,d}
    V,  # (B, H, N, Dh), any strides: stride_v{b,h,n,d}
    Omega,  # (H, 2gh-1, 2gw-1) prior table, contiguous rows: stride_omh (q's pointer if no prior)
    Out,  # (B, H, N, Dh) in q's dtype: stride_o{b,h,n,d}
    Lse,  # (B, H, N) fp32, contiguous: row log-sum-exp of the (prior-scaled) logits
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
    IEEE: tl.constexpr,
):
    pid_m, b, h, pid_bh = _program_ids(N, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # q stays in registers for the whole key loop. Written out rather than with the load
    # helpers: both ways tried moved the row-bound compare in the PTX, and one cost a
    # register on sm_90 (fp16, Dh 64 with a prior: 123 instead of 122).
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=(offs_m < N)[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = _head_ptr(K, b, h, stride_kb, stride_kh)
    v_base = _head_ptr(V, b, h, stride_vb, stride_vh)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pr = _PriorArgs(Omega, h, N, gh, gw, num_prefix, stride_omh, 2 * gw - 1)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, n_ok[:, None] & d_ok[None, :])
        s = _dot_nt(q, k, BLOCK_M, BLOCK_N, IEEE) * scale
        if HAS_PRIOR:
            s = s * _prior_tile(pr, offs_m, offs_n)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, offs_n, offs_d, stride_vn, stride_vd, n_ok[:, None] & d_ok[None, :])
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    acc = acc / l_i[:, None]
    m_ok = offs_m < N
    tl.store(
        Out + b * stride_ob + h * stride_oh + rows_m[:, None] * stride_on + offs_d[None, :] * stride_od,
        acc.to(Out.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(Lse + pid_bh * N + offs_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _sp_attn_bwd_dkdv_kernel(
    Q,  # (B, H, N, Dh), any strides: stride_q{b,h,n,d}
    K,  # (B, H, N, Dh), any strides: stride_k{b,h,n,d}
    V,  # (B, H, N, Dh), any strides: stride_v{b,h,n,d}
    Omega,  # (H, 2gh-1, 2gw-1) prior table, contiguous rows: stride_omh (q's pointer if no prior)
    DO,  # (B, H, N, Dh) upstream gradient, any strides: stride_do{b,h,n,d}
    Lse,  # (B, H, N) fp32, contiguous: the forward's row log-sum-exp
    Delta,  # (B, H, N) fp32, contiguous: rowsum(dO * O)
    DK,  # (B, H, N, Dh) contiguous, q's dtype
    DV,  # (B, H, N, Dh) contiguous, q's dtype
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
    IEEE: tl.constexpr,
):
    pid_n, b, h, pid_bh = _program_ids(N, H, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < N
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = _load_rows(_head_ptr(K, b, h, stride_kb, stride_kh), rows_n, offs_d, stride_kn, stride_kd, kv_mask)
    v = _load_rows(_head_ptr(V, b, h, stride_vb, stride_vh), rows_n, offs_d, stride_vn, stride_vd, kv_mask)
    q_base = _head_ptr(Q, b, h, stride_qb, stride_qh)
    do_base = _head_ptr(DO, b, h, stride_dob, stride_doh)
    lse_base = Lse + pid_bh * N  # lse and delta offsets formed once, outside the loop
    delta_base = Delta + pid_bh * N
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    pr = _PriorArgs(Omega, h, N, gh, gw, num_prefix, stride_omh, 2 * gw - 1)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        q = _load_rows(q_base, offs_m, offs_d, stride_qn, stride_qd, m_ok[:, None] & d_ok[None, :])
        do = _load_rows(do_base, offs_m, offs_d, stride_don, stride_dod, m_ok[:, None] & d_ok[None, :])
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        p, prior = _bwd_probs(q, k, lse, offs_m, offs_n, m_ok, n_ok, pr, scale, BLOCK_M, BLOCK_N, HAS_PRIOR, IEEE)
        dv = _dot(tl.trans(p.to(do.dtype)), do, dv, IEEE)
        dlogit = _bwd_dlogit(do, v, p, prior, delta, scale, BLOCK_M, BLOCK_N, IEEE)
        dk = _dot(tl.trans(dlogit.to(q.dtype)), q, dk, IEEE)
    out_off = pid_bh * N * HEAD_DIM + rows_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _sp_attn_bwd_dq_kernel(
    Q,  # (B, H, N, Dh), any strides: stride_q{b,h,n,d}
    K,  # (B, H, N, Dh), any strides: stride_k{b,h,n,d}
    V,  # (B, H, N, Dh), any strides: stride_v{b,h,n,d}
    Omega,  # (H, 2gh-1, 2gw-1) prior table, contiguous rows: stride_omh (q's pointer if no prior)
    DO,  # (B, H, N, Dh) upstream gradient, any strides: stride_do{b,h,n,d}
    Lse,  # (B, H, N) fp32, contiguous: the forward's row log-sum-exp
    Delta,  # (B, H, N) fp32, contiguous: rowsum(dO * O)
    DQ,  # (B, H, N, Dh) contiguous, q's dtype
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
    IEEE: tl.constexpr,
):
    pid_m, b, h, pid_bh = _program_ids(N, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = _load_rows(_head_ptr(Q, b, h, stride_qb, stride_qh), rows_m, offs_d, stride_qn, stride_qd, q_mask)
    do = _load_rows(_head_ptr(DO, b, h, stride_dob, stride_doh), rows_m, offs_d, stride_don, stride_dod, q_mask)
    lse, delta = _load_row_stats(Lse, Delta, pid_bh * N, offs_m, m_ok)
    k_base = _head_ptr(K, b, h, stride_kb, stride_kh)
    v_base = _head_ptr(V, b, h, stride_vb, stride_vh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pr = _PriorArgs(Omega, h, N, gh, gw, num_prefix, stride_omh, 2 * gw - 1)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, n_ok[:, None] & d_ok[None, :])
        v = _load_rows(v_base, offs_n, offs_d, stride_vn, stride_vd, n_ok[:, None] & d_ok[None, :])
        p, prior = _bwd_probs(q, k, lse, offs_m, offs_n, m_ok, n_ok, pr, scale, BLOCK_M, BLOCK_N, HAS_PRIOR, IEEE)
        dlogit = _bwd_dlogit(do, v, p, prior, delta, scale, BLOCK_M, BLOCK_N, IEEE)
        dq = _dot(dlogit.to(k.dtype), k, dq, IEEE)
    tl.store(
        DQ + pid_bh * N * HEAD_DIM + rows_m[:, None] * HEAD_DIM + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit
def _sp_attn_bwd_domega_kernel(
    Q,  # (B, H, N, Dh), any strides: stride_q{b,h,n,d}
    K,  # (B, H, N, Dh), any strides: stride_k{b,h,n,d}
    V,  # (B, H, N, Dh), any strides: stride_v{b,h,n,d}
    Omega,  # (H, 2gh-1, 2gw-1) prior table, contiguous rows: stride_omh
    DO,  # (B, H, N, Dh) upstream gradient, any strides: stride_do{b,h,n,d}
    Lse,  # (B, H, N) fp32, contiguous: the forward's row log-sum-exp
    Delta,  # (B, H, N) fp32, contiguous: rowsum(dO * O)
    Part,  # (H, 2gh-1, chunks, 2gw-1) fp32, contiguous: this program's row of partial sums
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
    batch_per_prog,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One program per (head, row offset dy, chunk of batch_per_prog images). For each
    image and each query patch row r whose key row r + dy exists, the (gw x gw) tile
    of ds * logit between the two rows is recomputed (two tensor-core dots) and added
    into ``acc``; ``acc[qx, kx]`` then holds the sum over every pair at offset
    (dy, kx - qx), so the 2gw-1 diagonals of ``acc`` are the table entries."""
    pid = tl.program_id(0)
    chunks = tl.num_programs(0) // (H * (2 * gh - 1))
    chunk = (pid % chunks).to(tl.int64)
    hy = pid // chunks  # h * (2gh - 1) + (dy + gh - 1)
    TW = 2 * gw - 1
    TH = 2 * gh - 1
    h = (hy // TH).to(tl.int64)
    dy = hy % TH - (gh - 1)
    r0 = tl.maximum(0, -dy)
    r1 = tl.minimum(gh, gh - dy)
    offs_x = tl.arange(0, BLOCK_W)
    x_ok = offs_x < gw
    pair_ok = x_ok[:, None] & x_ok[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_mask = x_ok[:, None] & d_ok[None, :]
    diag = offs_x[None, :] - offs_x[:, None] + (gw - 1)  # kx - qx + gw - 1, in [0, 2gw-2]
    omega = tl.load(Omega + h * stride_omh + (dy + gh - 1) * TW + diag, mask=pair_ok, other=1.0).to(tl.float32)
    acc = tl.zeros([BLOCK_W, BLOCK_W], tl.float32)
    b0 = chunk * batch_per_prog
    b1 = tl.minimum(b0 + batch_per_prog, B)
    for bi in range(0, b1 - b0):
        b64 = b0 + bi
        bh = b64 * H + h
        q_base = _head_ptr(Q, b64, h, stride_qb, stride_qh)
        k_base = _head_ptr(K, b64, h, stride_kb, stride_kh)
        v_base = _head_ptr(V, b64, h, stride_vb, stride_vh)
        do_base = _head_ptr(DO, b64, h, stride_dob, stride_doh)
        for r in range(r0, r1):
            i = num_prefix + r * gw + offs_x  # query tokens of patch row r
            j = i + dy * gw  # key tokens of patch row r + dy
            q = _load_rows(q_base, i, offs_d, stride_qn, stride_qd, row_mask)
            k = _load_rows(k_base, j, offs_d, stride_kn, stride_kd, row_mask)
            v = _load_rows(v_base, j, offs_d, stride_vn, stride_vd, row_mask)
            do = _load_rows(do_base, i, offs_d, stride_don, stride_dod, row_mask)
            lse, delta = _load_row_stats(Lse, Delta, bh * N, i, x_ok)
            logit = _dot_nt(q, k, BLOCK_W, BLOCK_W, IEEE) * scale
            p = _probs(logit, omega, lse)
            dp = _dot_nt(do, v, BLOCK_W, BLOCK_W, IEEE)
            acc += tl.where(pair_ok, _dsoftmax(p, dp, delta) * logit, 0.0)
    out = Part + (hy * chunks + chunk) * TW
    for t in range(0, TW):
        tl.store(out + t, tl.sum(tl.sum(tl.where(diag == t, acc, 0.0), 1), 0))


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


def domega_config(gw: int, head_dim: int, elem_bytes: int = 2) -> tuple[int, int]:
    """(BLOCK_W, num_warps) of the d-omega kernel: the patch-row tile (at least 16, the
    smallest tensor-core dot) and its warps. fp32 (IEEE dots on CUDA cores) takes 8 warps
    above 16 x 64: with 4 the ViT-H/14 case (16 x 128, Dh 80) left an 8 B stack frame on
    sm_90, while 8 warps at 16 x 64 left 8 B on sm_86/sm_89."""
    block_w = max(16, triton.next_power_of_2(gw))
    small = block_w * max(16, triton.next_power_of_2(head_dim)) <= (32 * 128 if elem_bytes < 4 else 16 * 64)
    return block_w, 4 if small else 8


def domega_batch_per_program(B: int, H: int, gh: int) -> int:
    """Images per d-omega program: enough programs (about 2048) to fill a GPU, each
    walking whole images (B = 256, ViT-B: 324 cells x 7 chunks of 37 images)."""
    chunks = max(1, 2048 // (H * (2 * gh - 1)))
    return triton.cdiv(B, min(B, chunks))


def attention_grid(B: int, H: int, N: int, block: int) -> tuple[int]:
    """Launch grid of the three flash kernels: one axis (limit 2**31 - 1) holding
    cdiv(N, block) sequence blocks for each of the B*H heads."""
    programs = triton.cdiv(N, block) * B * H
    if programs > 2**31 - 1:
        raise ValueError(f"sp_attention: B*H*cdiv(N, {block}) = {programs} programs exceed the CUDA grid limit")
    return (programs,)


# ----------------------------------------------------------------------------- autotuning
# The tile (BLOCK_M, BLOCK_N, warps) per head-dim class and prior comes from the register
# sweep above; the autotuner chooses the software-pipelining depth on the device, keyed on
# the sequence length, head dim, prior, dtype and dot precision. Smaller fallback tiles follow:
# at run time every configuration whose shared memory (an upper bound, smem_bound) exceeds
# the device's opt-in limit is pruned, so the large tiles of fp16 on sm_80/sm_90 give way
# to the fallbacks on sm_86/89/120 (99 KiB) and in fp32. Every configuration is compiled for
# each architecture by scripts/gpu_build_report.py (no spill, shared memory within the bound).
# The first surviving one is the interpreter's only one.
ATTN_STAGES = (3, 2)
_BLOCK_D_CLASSES = (16, 32, 64, 128)
# (kernel, BLOCK_D, prior, stages) left out of the space: the build report showed a spill
# (dK/dV at Dh 80-128 without a prior, 2 stages: 8 B of STACK on sm_90, REG 255).
# Also the forward at Dh <= 32 with a prior, 2 stages: 16 B on sm_86 (fp16).
_EXCLUDED = {("dkdv", 128, False, 2), ("fwd", 32, True, 2)}
# Per compute capability, fp16/bf16 only, the same kind of key: spills that only that
# architecture's code generation shows (scripts/gpu_build_report.py --arch 100 120 --dtype fp16):
# sm_100 forward Dh <= 32 with a prior at 3 stages (8 B; tcgen05), sm_120 dK/dV Dh 64 without a
# prior at 2 stages (56 B). The prune reads the capability of the tensor's device.
_EXCLUDED_ON = {100: {("fwd", 32, True, 3)}, 120: {("dkdv", 64, False, 2)}}
# Per compute capability, fp16/bf16, keyed (kernel, BLOCK_D, prior): a tile (BLOCK_M, BLOCK_N,
# warps) offered before the register-sweep tile, at each pipelining depth. sm_90: with a prior
# the sweep's 32-row tiles compile to mma.sync; wgmma needs 64 rows per warpgroup, and at Dh 64
# (BLOCK_D 64) 64 x 64 / 8 warps reaches it without a spill in all three kernels (fp16, 3 / 2
# stages: forward 122 / 122 registers, dK/dV 212 / 213, dQ 128 / 128; benchmarks/NOTES.md).
_TILES_ON = {90: {("fwd", 64, True): (64, 64, 8), ("dkdv", 64, True): (64, 64, 8), ("dq", 64, True): (64, 64, 8)}}
# Fallback tiles (BLOCK_M, BLOCK_N, warps, stages), tried after the register-sweep tile.
_FALLBACKS = ((32, 32, 4, 2), (16, 32, 4, 2))
# fp32 tiles (BLOCK_M, BLOCK_N, warps, stages) per kernel, for every head dim and prior. With
# IEEE fp32 dots (torch's default) the dots run on CUDA cores, where Triton's FMA layout needs
# far more registers per output than the tensor-core layouts the tiles above were swept for:
# those spilled 8 B - 8 KB in fp32 on sm_80/sm_90. These are the tiles of an fp32 sweep
# (Dh 32/48/64/80/96/128, prior on/off, sm_80 and sm_90) with no spill in any model case (and
# one 8 B spill elsewhere, dK/dV at Dh 48 with a prior on sm_90: _FP32_TILES_ON); larger ones spilled, e.g. the
# forward at 32 x 32 / 8 warps 8-24 B with a prior, dQ at 32 x 32 / 4 warps 24-40 B at Dh 128,
# dK/dV at 32 x 16 or 16 x 32 192-608 B (benchmarks/NOTES.md, GPU readiness (#13)). Two stages
# only: one stage allocates more shared memory than smem_bound allows for. They are used for
# fp32 inputs whether or not TF32 is allowed (smaller tiles are valid tensor-core tiles too).
_FP32_TILES = {
    "fwd": ((16, 16, 8, 2),),
    "dkdv": ((16, 16, 8, 2),),
    "dq": ((16, 16, 8, 2),),
}
# Per compute capability, fp32, keyed (kernel, BLOCK_D, prior): a tile in place of the one
# above where that architecture's code generation spills. sm_90 dK/dV with a prior at
# BLOCK_D 64: 16 x 16 / 8 warps leaves 8 B of stack at Dh 48 (REG 128; Dh 64 is clean);
# 32 x 16 / 8 warps is clean at Dh 48 and 64 (REG 182 / 176, 28,928 B of shared memory).
_FP32_TILES_ON = {90: {("dkdv", 64, True): ((32, 16, 8, 2),)}}


def attention_configs(
    kind: str, head_dim: int, has_prior: bool, elem_bytes: int = 2, arch: int = 80
) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may pick for kernel ``kind``
    ("fwd", "dkdv" or "dq") at this head dim, with or without a prior, for inputs of
    ``elem_bytes`` bytes, before the shared-memory prune: in fp16/bf16 the register-sweep
    tile at each pipelining depth (after compute capability ``arch``'s own tile, _TILES_ON),
    then the smaller fallback tiles; in fp32 (4 bytes) the fp32 tile set (_FP32_TILES, or
    _FP32_TILES_ON for ``arch``)."""
    bm, bn, block_d, warps = _block_sizes(head_dim, has_prior)
    if elem_bytes == 4:
        return list(_FP32_TILES_ON.get(arch, {}).get((kind, block_d, has_prior), _FP32_TILES[kind]))
    if kind == "dkdv":
        bm = _dkdv_block_m(head_dim, has_prior)
    if kind == "dq" and has_prior and block_d == 128:
        # 32 x 64 / 8 warps left an 8 B stack frame on sm_90 (fp16, Dh 80); 32 x 32 / 4 warps is
        # clean on sm_80/86/90 in fp16 and bf16 (176 registers, scripts/gpu_build_report.py).
        bm, bn, warps = 32, 32, 4
    if kind == "dkdv" and has_prior and block_d == 64:
        # 32 x 64 / 8 warps spilled 16-24 B on sm_86 (fp16, Dh 64); 32 x 32 / 4 warps is clean on
        # sm_80/86/90 in fp16 and bf16 (sm_90 then uses mma.sync instead of wgmma).
        bm, bn, warps = 32, 32, 4
    out = [(bm, bn, warps, st) for st in ATTN_STAGES if (kind, block_d, has_prior, st) not in _EXCLUDED]
    extra = _TILES_ON.get(arch, {}).get((kind, block_d, has_prior))
    if extra is not None:
        out = [(*extra, st) for st in ATTN_STAGES] + out
    return out + [c for c in _FALLBACKS if c[0] * c[1] < bm * bn]


def smem_bound(kind: str, bm: int, bn: int, block_d: int, stages: int, elem_bytes: int) -> int:
    """Upper bound (bytes) of the shared memory Triton 3.x allocates for one attention
    kernel configuration. Fitted to the compiled kernels (sm_80, fp32, every tile of
    attention_configs): the streamed operand tiles plus a (BLOCK_M x BLOCK_N) fp32 score
    buffer for each extra pipelining stage, the resident tiles and one score buffer; with
    a 6 % + 1 KiB margin. Checked against compiled kernels by tests/test_gpu_readiness.py,
    and every selectable build against the architecture's limit by
    scripts/gpu_build_report.py."""
    if kind == "fwd":  # K and V streamed, Q resident
        streamed, resident = 2 * bn * block_d, bm * block_d
    elif kind == "dkdv":  # Q and dO streamed (+ lse, delta), K and V resident
        streamed, resident = 2 * bm * block_d, 2 * bn * block_d
    else:  # dq: K and V streamed, Q and dO resident
        streamed, resident = 2 * bn * block_d, 2 * bm * block_d
    score = bm * bn * 4
    fitted = (stages - 1) * (streamed * elem_bytes + score + 512) + resident * elem_bytes + score
    return fitted + fitted // 16 + 1024


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_configs(kind: str, head_dim: int, has_prior: bool, elem_bytes: int, smem_limit: int, arch: int = 80):
    """The configurations the autotuner may run on a device of compute capability ``arch``
    with ``smem_limit`` bytes of shared memory per block: the register-sweep tiles within
    the limit and not excluded on that architecture; if none is, the fallback tiles within
    it; if none of those either, the smallest fallback."""
    block_d = _block_sizes(head_dim, has_prior)[2]
    every = attention_configs(kind, head_dim, has_prior, elem_bytes, arch)
    if elem_bytes < 4:
        excluded = _EXCLUDED_ON.get(arch, set())
        every = [c for c in every if (kind, block_d, has_prior, c[3]) not in excluded or c in _FALLBACKS]
    fits = [c for c in every if smem_bound(kind, c[0], c[1], block_d, c[3], elem_bytes) <= smem_limit]
    primary = [c for c in fits if c not in _FALLBACKS]
    return primary or fits[:1] or every[-1:]


def _autotuned(kernel, kind: str):
    every = {
        cfg
        for bd in _BLOCK_D_CLASSES
        for prior in (True, False)
        for size in (2, 4)
        for arch in (80, *_FP32_TILES_ON, *_TILES_ON)
        for cfg in attention_configs(kind, bd, prior, size, arch)
    }
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in sorted(every, key=lambda c: (c[0], c[1], c[2], -c[3]))
    ]

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        allowed = select_configs(
            kind, kwargs["HEAD_DIM"], kwargs["HAS_PRIOR"], q.element_size(), smem_limit(q.device), capability(q.device)
        )
        by_key = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs}
        kept = [by_key[a] for a in allowed]
        return kept[:1] if _interpreting() else kept

    return triton.autotune(
        configs=configs,
        key=["N", "HEAD_DIM", "HAS_PRIOR", "IEEE"],
        prune_configs_by={"early_config_prune": prune},
    )(kernel)


_sp_attn_fwd = _autotuned(_sp_attn_fwd_kernel, "fwd")
_sp_attn_bwd_dkdv = _autotuned(_sp_attn_bwd_dkdv_kernel, "dkdv")
_sp_attn_bwd_dq = _autotuned(_sp_attn_bwd_dq_kernel, "dq")


def _ieee(q: torch.Tensor) -> bool:
    """fp32 dots without TF32: fp32 inputs while torch's matmul setting forbids TF32."""
    return q.dtype == torch.float32 and not tf32_allowed()


def _launch_grid(B: int, H: int, N: int, key: str):
    return lambda meta: attention_grid(B, H, N, meta[key])


def sp_attention_fwd(q, k, v, omega, grid, num_prefix, scale):
    """Returns (out (B, H, N, Dh) in q's dtype, lse (B, H, N) fp32)."""
    B, H, N, Dh = q.shape
    gh, gw = grid if grid is not None else (1, 1)
    BLOCK_D = _block_sizes(Dh, omega is not None)[2]
    out = torch.empty((B, H, N, Dh), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    om = omega.contiguous() if omega is not None else q  # dummy pointer when there is no prior
    with device_guard(q):
        _sp_attn_fwd[_launch_grid(B, H, N, "BLOCK_M")](
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
            IEEE=_ieee(q),
        )
    return out, lse


def sp_attention_bwd(dout, q, k, v, omega, out, lse, grid, num_prefix, scale):
    """Returns (dq, dk, dv, domega or None). No gradient uses atomics (d-omega: per-chunk
    partial sums, then a fixed-order sum), so the result is bit-identical across runs."""
    B, H, N, Dh = q.shape
    gh, gw = grid if grid is not None else (1, 1)
    BLOCK_D = _block_sizes(Dh, omega is not None)[2]
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (B, H, N)
    dq = torch.empty((B, H, N, Dh), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    has_prior = omega is not None
    om = omega.contiguous() if has_prior else q
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), om.stride(0) if has_prior else 0)
    common = dict(HEAD_DIM=Dh, BLOCK_D=BLOCK_D, HAS_PRIOR=has_prior, IEEE=_ieee(q))
    sizes = (H, N, gh, gw, num_prefix, scale)
    domega = None
    with device_guard(q):
        _sp_attn_bwd_dkdv[_launch_grid(B, H, N, "BLOCK_N")](
            q, k, v, om, dout, lse, delta, dk, dv, *strides, *sizes, **common
        )
        _sp_attn_bwd_dq[_launch_grid(B, H, N, "BLOCK_M")](q, k, v, om, dout, lse, delta, dq, *strides, *sizes, **common)
        if has_prior:
            TH, TW = 2 * gh - 1, 2 * gw - 1
            per_prog = domega_batch_per_program(B, H, gh)
            chunks = triton.cdiv(B, per_prog)
            part = torch.empty((H, TH, chunks, TW), device=q.device, dtype=torch.float32)
            block_w, warps = domega_config(gw, Dh, q.element_size())
            _sp_attn_bwd_domega_kernel[(H * TH * chunks,)](
                q,
                k,
                v,
                om,
                dout,
                lse,
                delta,
                part,
                *strides,
                B,
                *sizes,
                per_prog,
                HEAD_DIM=Dh,
                BLOCK_D=BLOCK_D,
                BLOCK_W=block_w,
                IEEE=_ieee(q),
                num_warps=warps,
            )
            domega = part.sum(2).to(omega.dtype)
    return dq, dk, dv, domega
