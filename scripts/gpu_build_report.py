"""GPU build report: compile every Triton kernel in every configuration for sm_80
and sm_90 with no GPU present; print kernel, configuration, registers, spills
(local-memory STACK), shared memory and the tensor-core instructions used
(mma.sync on sm_80, wgmma on sm_90). Exit 1 on a compile error or on a spill in
a default configuration.

    python scripts/gpu_build_report.py [--arch 80 90] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vitkern.triton_kernels import gemm
from vitkern.triton_kernels import layernorm_mlp as lnk
from vitkern.triton_kernels import sp_attention as spk

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


_FP32_BUFFERS = ("Lse", "Delta", "DOmega", "Mean", "Rstd", "DWPart", "DBPart", "DLN")
_FLOAT_SCALARS = ("scale", "eps")


def _size_args(fn) -> tuple[str, ...]:
    """Capitalised integer arguments (everything else capitalised is a pointer)."""
    if fn is gemm.fused_gemm_kernel.fn:
        return ("M", "N", "K", "NP", "P")
    return ("B", "H", "N", "M", "D")


def _signature(fn, dtype: str, constexprs: dict, fp32_pointers: tuple[str, ...] = ()) -> dict[str, str]:
    """Pointer args (capitalised names) get the data type, except the fp32 statistics /
    partial-sum buffers; other args are i32 sizes and strides, or fp32 scalars."""
    sig = {}
    for n in fn.arg_names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n[0].isupper() and n not in _size_args(fn):
            sig[n] = "*fp32" if n in _FP32_BUFFERS or n in fp32_pointers else f"*{dtype}"
        else:
            sig[n] = "fp32" if n in _FLOAT_SCALARS else "i32"
    return sig


# The fused GEMM's fusion modes, as the patch-embedding and LayerNorm-MLP launchers use them.
# Strides that are 1 in the launchers' calls are listed: Triton specialises an int argument
# equal to 1 into a constant at launch, so the build does too.
_GEMM_MODES = {
    "lnmlp fc1: LN prologue, bias+GELU, store pre": dict(
        A_MODE=1,
        HAS_LNW=True,
        HAS_LNB=True,
        HAS_BIAS=True,
        STORE_PRE=True,
        EPI_GELU=True,
        stride_ak=1,
        stride_bk=1,
        stride_cn=1,
        stride_pn=1,
    ),
    "lnmlp fc2: bias+residual": dict(HAS_BIAS=True, HAS_RES=True, stride_ak=1, stride_bk=1, stride_cn=1, stride_rn=1),
    "lnmlp bwd d_pre: GELU' epilogue": dict(EPI_DGELU=True, stride_ak=1, stride_bn=1, stride_cn=1, stride_pn=1),
    "lnmlp bwd dW2: GELU B prologue": dict(B_MODE=3, stride_am=1, stride_bn=1, stride_cn=1),
    "lnmlp bwd dW1: LN B prologue": dict(B_MODE=1, HAS_LNW=True, HAS_LNB=True, stride_am=1, stride_bn=1, stride_cn=1),
    "lnmlp bwd d_ln (fp32 out)": dict(stride_ak=1, stride_bn=1, stride_cn=1),
    "patch fwd: gather A, bias+pos": dict(
        A_MODE=2, HAS_BIAS=True, HAS_RES=True, s_iw=1, stride_bk=1, stride_cn=1, stride_rn=1
    ),
    "patch bwd d-image: scatter C": dict(C_MODE=1, stride_ak=1, stride_bn=1, s_iw=1),
    "patch bwd d-weight: gather B": dict(B_MODE=2, stride_am=1, s_iw=1, stride_cn=1),
}
_GEMM_DEFAULTS = dict(
    A_MODE=0,
    B_MODE=0,
    C_MODE=0,
    HAS_LNW=False,
    HAS_LNB=False,
    HAS_BIAS=False,
    HAS_RES=False,
    ACT=1,
    STORE_PRE=False,
    EPI_GELU=False,
    EPI_DGELU=False,
    ALLOW_TF32=False,
)


def _divisibility(fn, sig: dict[str, str], cfg: str) -> dict:
    """What Triton's launch specialisation marks as a multiple of 16: pointers (torch
    allocations are aligned) and, for the GEMM, the strides and the N/K sizes of ViT shapes
    (D, 4D and C*P*P for P = 16 are multiples of 16). K of the weight-gradient GEMMs is the
    token count (B * 197: ragged), so it is left unmarked there."""
    marked = set()
    for n, kind in sig.items():
        if kind.startswith("*"):
            marked.add(n)
        elif fn is gemm.fused_gemm_kernel.fn and kind == "i32":
            ragged_k = any(tag in cfg for tag in ("dW2", "dW1", "d-weight"))
            if n.startswith(("stride_", "s_i")) or n in ("N", "P") or (n == "K" and not ragged_k):
                marked.add(n)
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in marked}


def _gemm_kernels(quick: bool):
    fn = gemm.fused_gemm_kernel.fn  # the JIT function under the autotuner
    for dtype in ("fp16",) if quick else ("fp16", "bf16"):
        for mode, flags in _GEMM_MODES.items():
            for bm, bn, bk, warps, stages in gemm.CONFIGS[:2] if quick else gemm.CONFIGS:
                constexprs = {**_GEMM_DEFAULTS, **flags, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
                fp32_ptrs = ("C",) if mode.startswith("lnmlp bwd d_ln") else ()
                cfg = f"{dtype} {mode} {bm}x{bn}x{bk} w{warps} s{stages}"
                yield "fused_gemm", fn, dtype, constexprs, warps, cfg, fp32_ptrs, stages
    for dim in (384, 768) if quick else (384, 768, 1024):
        block_d = triton.next_power_of_2(dim)
        warps = 4 if block_d <= 2048 else 8
        rows = lnk._stats_rows(block_d)
        yield (
            "ln_stats",
            lnk._ln_stats_kernel,
            "fp16",
            dict(BLOCK_D=block_d, ROWS=rows),
            warps,
            f"fp16 D={dim} rows={rows} w{warps}",
            (),
            3,
        )
        yield (
            "ln_bwd",
            lnk._ln_bwd_kernel,
            "fp16",
            dict(HAS_LNW=True, HAS_RES=True, BLOCK_D=block_d),
            warps,
            f"fp16 D={dim} w{warps}",
            (),
            3,
        )


def _kernels(quick: bool = False):
    """(name, fn, dtype, constexprs, num_warps, configuration, extra fp32 pointers, stages) for
    every kernel configuration the launchers and autotuners can choose: attention for head
    dims 32..128 with and without a prior; the fused GEMM in every autotune configuration and
    fusion mode; the LayerNorm row kernels."""
    yield from _gemm_kernels(quick)
    yield from _attention_kernels(quick)


def _attention_kernels(quick: bool):
    """Every autotune configuration of the three flash kernels, and the deterministic
    d-omega kernel's fixed one: (name, fn, dtype, constexprs, warps, cfg, fp32 ptrs, stages)."""
    kernels = (
        ("sp_attn_fwd", spk._sp_attn_fwd_kernel, "fwd"),
        ("sp_attn_bwd_dkdv", spk._sp_attn_bwd_dkdv_kernel, "dkdv"),
        ("sp_attn_bwd_dq", spk._sp_attn_bwd_dq_kernel, "dq"),
    )
    for dtype in ("fp16",) if quick else ("fp16", "bf16"):
        for head_dim in (64,) if quick else (32, 64, 80, 96, 128):
            block_d = spk._block_sizes(head_dim, True)[2]
            for has_prior in (True, False):
                for name, fn, kind in kernels:
                    for bm, bn, warps, stages in spk.attention_configs(kind, head_dim, has_prior):
                        ce = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, HAS_PRIOR=has_prior)
                        cfg = f"{dtype} Dh={head_dim} {bm}x{bn} w{warps} s{stages} prior={int(has_prior)}"
                        if kind == "dq":
                            ce["ATOMIC_DOMEGA"] = has_prior
                            cfg += f" atomic={int(has_prior)}"
                        yield name, fn, dtype, ce, warps, cfg, (), stages
            bi, dwarps = spk._domega_config(head_dim)
            yield (
                "sp_attn_bwd_domega",
                spk._sp_attn_bwd_domega_kernel,
                dtype,
                dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_I=bi),
                dwarps,
                f"{dtype} Dh={head_dim} I={bi} w{dwarps}",
                (),
                3,
            )


def _resources(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(f.name)
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return int(reg.group(1)) if reg else -1, int(stack.group(1)) if stack else -1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", nargs="+", type=int, default=[80, 90])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fp16, head dim 64 only (the CI check)")
    args = ap.parse_args()
    rows, failed = [], False
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, dtype, constexprs, warps, cfg, fp32_ptrs, stages in _kernels(args.quick):
            sig = _signature(fn, dtype, constexprs, fp32_ptrs)
            attrs = _divisibility(fn, sig, cfg)
            try:
                compiled = triton.compile(
                    ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                    target=target,
                    options={"num_warps": warps, "num_stages": stages},
                )
            except Exception as exc:
                rows.append([f"sm_{arch}", name, cfg, "ERROR", "", "", str(exc).splitlines()[0][:60]])
                failed = True
                continue
            reg, stack = _resources(compiled.asm["cubin"])
            ptx = compiled.asm["ptx"]
            mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
            shared = compiled.metadata.shared
            rows.append([f"sm_{arch}", name, cfg, str(reg), str(stack), str(shared), mma])
            if stack > 0:
                failed = True
    cols = ["arch", "kernel", "configuration", "REG", "STACK (spill)", "shared B", "tensor cores"]
    if args.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)))
    print(
        f"triton {triton.__version__}; {len(rows)} kernel builds; "
        f"{'FAILED: compile error or spill' if failed else 'no compile error, no spill'}",
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
