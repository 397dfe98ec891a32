"""GPU build report: compile, with no GPU present, every Triton kernel configuration the
runtime can launch for the model shapes below, for each CUDA architecture and dtype.

The launches are not written down by hand: each launcher runs on CPU tensors of the model
shapes with Triton's launch entry points intercepted (vitkern.triton_kernels.launches), so
every plain launch and every configuration the autotuners' prunes keep for that
architecture's shared memory is recorded with its real arguments, then compiled with the
specialisation Triton's own runtime derives from them.

Per kernel build: registers, spill (local-memory STACK bytes), shared memory, pipelining
(cp.async and TMA copy instructions in the PTX), tensor-core kind (mma.sync, wgmma,
tcgen05, or none) and whether an fp32 path uses TF32. Exits 1 on a compile error
(OutOfResources included), a spill, shared memory over the architecture's limit, or a
TF32 instruction in an fp32 path that torch's settings (default: TF32 off) forbid.

    python scripts/gpu_build_report.py [--arch 80 86 89 90 100 120] [--dtype fp32 fp16 bf16]
                                       [--jobs N] [--kernel REGEX] [--markdown] [--output FILE]
                                       [--dump-ptx DIR]

``--dump-ptx DIR`` also writes each build's PTX to DIR (one file a build, numbered in report
order, named by architecture, dtype, kernel, mode and configuration), so that a refactoring
of a kernel's source can be checked to leave the generated code unchanged.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton

from vitkern.triton_kernels import launches as L
from vitkern.triton_kernels import layernorm_mlp as lnk
from vitkern.triton_kernels import patch_embed as pek
from vitkern.triton_kernels import sp_attention as spk

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (name, batch, image side, patch, embed dim, heads, MLP ratio, prior): ViT-B/16 as ViT and
# SP-ViT, ViT-H/14 (head dim 80), and the ViT-B/16 width with 6 and 24 heads (head dims 128
# and 32) for the attention. Batch 32 / 16: token counts B * 197 and B * 257 that are
# multiples of 16, as at most training batch sizes (the specialisation Triton applies).
MODELS = [
    ("ViT-B/16", 32, 224, 16, 768, 12, 4, False, True),
    ("SP-ViT-B/16", 32, 224, 16, 768, 12, 4, True, False),
    ("ViT-H/14 SP", 16, 224, 14, 1280, 16, 4, True, True),
    ("ViT-B/16 Dh128", 8, 224, 16, 768, 6, 4, False, False),
    ("SP-ViT-B/16 Dh32", 8, 224, 16, 768, 24, 4, True, False),
]


def model_launches(dtype: torch.dtype, smem_limit: int, arch: int | None = None):
    """(model, kernel launch) for every launch of the model's forward and backward."""
    lim = {"smem_limit": smem_limit, "arch": arch}
    for name, B, img, P, D, H, ratio, prior, mlp in MODELS:
        g = img // P
        N = 1 + g * g
        Dh = D // H
        qkv = torch.empty(B, N, 3, H, Dh, dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        om = torch.empty(H, 2 * g - 1, 2 * g - 1, dtype=dtype) if prior else None
        grid, prefix = ((g, g), 1) if prior else (None, 0)
        scale = Dh**-0.5
        out = L.capture(spk.sp_attention_fwd, q, k, v, om, grid, prefix, scale, **lim)
        lse = torch.empty(B, H, N)
        o = torch.empty(B, H, N, Dh, dtype=dtype)
        out += L.capture(spk.sp_attention_bwd, o, q, k, v, om, o, lse, grid, prefix, scale, **lim)
        if mlp:
            M, Hd = B * N, D * ratio
            x = torch.empty(M, D, dtype=dtype)
            lw, lb, w1, b1, w2, b2 = (torch.empty(s, dtype=dtype) for s in ((D,), (D,), (Hd, D), (Hd,), (D, Hd), (D,)))
            args = (x, lw, lb, w1, b1, None, None, w2, b2, 1e-6, 1, False, 0, True, True)  # plain MLP: glu 0
            out += L.capture(lnk.layernorm_mlp_fwd, *args, **lim)
            mean, rstd, pre = torch.empty(M), torch.empty(M), torch.empty(M, Hd, dtype=dtype)
            out += L.capture(
                lnk.layernorm_mlp_bwd, x, x, lw, lb, w1, None, w2, mean, rstd, pre, 1, False, 0, True, **lim
            )
            # The same block as a SwiGLU MLP (split fc1, SiLU; hidden 2/3 of the plain one's).
            Hg = -(-Hd * 2 // 3 // 8) * 8
            wg, wv, w2g = (torch.empty(s, dtype=dtype) for s in ((Hg, D), (Hg, D), (D, Hg)))
            args = (x, lw, lb, wg, None, wv, None, w2g, b2, 1e-6, 4, False, 1, True, True)  # glu 1: gate first
            out += L.capture(lnk.layernorm_mlp_fwd, *args, **lim)
            pre2 = torch.empty(M, 2 * Hg, dtype=dtype)
            out += L.capture(
                lnk.layernorm_mlp_bwd, x, x, lw, lb, wg, wv, w2g, mean, rstd, pre2, 4, False, 1, True, **lim
            )
            images = torch.empty(B, 3, img, img, dtype=dtype)
            w, bias, pos = torch.empty(D, 3, P, P, dtype=dtype), torch.empty(D, dtype=dtype), torch.empty(1, g * g, D)
            out += L.capture(pek.patch_embed_fwd, images, w, bias, pos.to(dtype), **lim)
            dout = torch.empty(B, g * g, D, dtype=dtype)
            out += L.capture(pek.patch_embed_bwd, dout, images, w, True, True, **lim)
        for launch in out:
            yield name, launch


def _mode(launch: L.Launch) -> str:
    """A short name for the fused GEMM's fusion mode, or the kernel's flags."""
    kw = launch.kwargs
    if launch.name == "fused_gemm_kernel":
        flags = [f"A{kw['A_MODE']}", f"B{kw['B_MODE']}", f"C{kw['C_MODE']}"]
        flags += [f for f in ("EPI_GELU", "EPI_DGELU", "EPI_DGLU", "HAS_RES", "STORE_PRE") if kw.get(f)]
        return " ".join(flags)
    if "HAS_PRIOR" in kw:
        return f"Dh={kw['HEAD_DIM']} prior={int(kw['HAS_PRIOR'])}"
    return f"D<={kw.get('BLOCK_D')}"


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


def _mma_kind(ptx: str) -> str:
    if "tcgen05.mma" in ptx:
        return "tcgen05"
    if "wgmma" in ptx:
        return "wgmma"
    return "mma.sync" if "mma.sync" in ptx else "none"


_JOBS: list = []  # (arch, launch): filled before the worker processes fork (launches do not pickle)


def build(index: int, ptx_path: str | None = None):
    """Compile one launch for one architecture; returns the report row's measurements
    (and writes the PTX to ``ptx_path`` if given)."""
    arch, launch = _JOBS[index]
    try:
        compiled = L.compile_launch(launch, arch)
    except Exception as exc:  # OutOfResources and any other compile error
        return {"error": str(exc).splitlines()[0][:80]}
    ptx = compiled.asm["ptx"]
    if ptx_path is not None:
        Path(ptx_path).write_text(ptx)
    reg, stack = _resources(compiled.asm["cubin"])
    return {
        "reg": reg,
        "stack": stack,
        "shared": compiled.metadata.shared,
        "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
        "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        "mma": _mma_kind(ptx),
        "tf32": ".tf32" in ptx,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", type=int, default=[80, 90], choices=sorted(L.SMEM_LIMIT))
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--kernel", default="", help="only kernels whose name matches this regular expression")
    ap.add_argument("--dump-ptx", metavar="DIR", default=None, help="also write each build's PTX to DIR")
    ap.add_argument(
        "--output",
        default=None,
        help="also write the table as markdown to this file, with the command, date and triton version "
        "(e.g. benchmarks/results/gpu_build_report.md)",
    )
    args = ap.parse_args()
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # torch's default: no TF32 for fp32 matmuls
    jobs, rows = [], []
    for arch in args.arch:
        seen = set()
        for dt in args.dtype:
            for model, launch in model_launches(DTYPES[dt], L.SMEM_LIMIT[arch], arch):
                if not re.search(args.kernel, launch.name):
                    continue
                opts, sig, constexprs, attrs = L.specialise(launch, arch)
                key = (launch.name, repr(sorted(sig.items())), repr(constexprs), repr(attrs), repr(opts))
                if key in seen:
                    continue
                seen.add(key)
                jobs.append((arch, launch))
                rows.append([f"sm_{arch}", dt, launch.name.strip("_"), _mode(launch), launch.config(), model])
    _JOBS[:] = jobs
    ptx_paths: list[str | None] = [None] * len(jobs)
    if args.dump_ptx:
        Path(args.dump_ptx).mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows):
            name = re.sub(r"[^A-Za-z0-9=.]+", "_", "_".join([f"{i:04d}", *row[:5]]))
            ptx_paths[i] = str(Path(args.dump_ptx) / f"{name}.ptx")
    if args.jobs > 1:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            results = list(pool.map(build, range(len(jobs)), ptx_paths, chunksize=2))
    else:
        results = [build(i, p) for i, p in enumerate(ptx_paths)]
    failed = []
    table = []
    for (arch, _), row, res in zip(jobs, rows, results, strict=True):
        if "error" in res:
            table.append([*row, "ERROR", "", "", "", "", res["error"]])
            failed.append(f"{' '.join(row)}: {res['error']}")
            continue
        limit = L.SMEM_LIMIT[arch]
        problems = []
        if res["stack"] > 0:
            problems.append(f"spill {res['stack']} B")
        if res["shared"] > limit:
            problems.append(f"shared {res['shared']} > {limit}")
        if res["tf32"] and row[1] == "fp32":
            problems.append("TF32 in an fp32 path with TF32 off")
        if problems:
            failed.append(f"{' '.join(row)}: {', '.join(problems)}")
        stages = f"{res['cp_async']} cp.async" + (f", {res['tma']} TMA" if res["tma"] else "")
        table.append(
            [*row, str(res["reg"]), str(res["stack"]), str(res["shared"]), stages, res["mma"], "; ".join(problems)]
        )
    cols = ["arch", "dtype", "kernel", "mode", "config", "first model", "REG", "spill B", "shared B", "pipelining"]
    cols += ["tensor cores", "problem"]
    if args.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in table:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in table:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)))
    if args.output:
        import datetime

        with open(args.output, "w") as fh:
            cmd = "python scripts/gpu_build_report.py " + " ".join(sys.argv[1:])
            fh.write(f"# GPU build report ({datetime.date.today()}, triton {triton.__version__})\n\n")
            fh.write(f"Written by `{cmd}`: {len(table)} kernel builds, ")
            fh.write(f"{len(failed)} with a problem.\n\n" if failed else "no problem.\n\n")
            fh.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
            fh.writelines("| " + " | ".join(r) + " |\n" for r in table)
    for f in failed:
        print("FAIL", f, file=sys.stderr)
    print(
        f"triton {triton.__version__}; {len(table)} kernel builds; "
        + (f"FAILED: {len(failed)} (compile error, spill, shared memory or TF32)" if failed else "no problem"),
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
