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

from vitkern.triton_kernels import sp_attention as spk

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _signature(fn, dtype: str, constexprs: dict) -> dict[str, str]:
    """Pointer args (those before the first stride) get the data type, except the
    fp32 statistics buffers; strides and sizes are i32; scale is fp32."""
    names = fn.arg_names
    first_int = names.index("stride_qb")
    sig = {}
    for i, n in enumerate(names):
        if n in constexprs:
            sig[n] = "constexpr"
        elif i < first_int:
            sig[n] = "*fp32" if n in ("Lse", "Delta", "DOmega") else f"*{dtype}"
        else:
            sig[n] = "fp32" if n == "scale" else "i32"
    return sig


def _kernels(quick: bool = False):
    """(name, fn, dtype, constexprs, num_warps, configuration) for every kernel configuration
    the launchers can choose (head dims 32..128, with and without a prior)."""
    for dtype in ("fp16",) if quick else ("fp16", "bf16"):
        for head_dim in (64,) if quick else (32, 64, 80, 96, 128):
            for has_prior in (True, False):
                block_m, block_n, block_d, warps = spk._block_sizes(head_dim, has_prior)
                base = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_PRIOR=has_prior)
                cfg = f"{dtype} Dh={head_dim} {block_m}x{block_n} w{warps} prior={int(has_prior)}"
                yield "sp_attn_fwd", spk._sp_attn_fwd_kernel, dtype, base, warps, cfg
                yield "sp_attn_bwd_dkdv", spk._sp_attn_bwd_dkdv_kernel, dtype, base, warps, cfg
                yield (
                    "sp_attn_bwd_dq",
                    spk._sp_attn_bwd_dq_kernel,
                    dtype,
                    {**base, "ATOMIC_DOMEGA": has_prior},
                    warps,
                    cfg + f" atomic={int(has_prior)}",
                )
            block_d = spk._block_sizes(head_dim, True)[2]
            bi, dwarps = spk._domega_config(head_dim)
            yield (
                "sp_attn_bwd_domega",
                spk._sp_attn_bwd_domega_kernel,
                dtype,
                dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_I=bi),
                dwarps,
                f"{dtype} Dh={head_dim} I={bi} w{dwarps}",
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
        for name, fn, dtype, constexprs, warps, cfg in _kernels(args.quick):
            sig = _signature(fn, dtype, constexprs)
            try:
                compiled = triton.compile(
                    ASTSource(fn, sig, constexprs=constexprs), target=target, options={"num_warps": warps}
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
