"""``vitkern`` command line: ``vitkern bench`` (the main job), ``vitkern info`` and
``vitkern selftest`` (vitkern/selftest.py)."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitkern", description="vitkern: fused kernels for Vision Transformers")
    sub = p.add_subparsers(dest="command", required=True)
    from vitkern.bench.suite import add_arguments as _bench_arguments

    _bench_arguments(
        sub.add_parser(
            "bench", help="benchmark vitkern against eager PyTorch, torch.compile, SDPA, FlexAttention, timm"
        )
    )
    i = sub.add_parser("info", help="print the backends available here and why others are not")
    i.add_argument(
        "--timm-zoo",
        action="store_true",
        help="convert every timm VisionTransformer architecture (test size) with ViT.from_timm and patch_timm, "
        "compare logits and gradients with timm, print the coverage",
    )
    i.add_argument("--verbose", action="store_true", help="with --timm-zoo: one line per architecture")
    from vitkern.selftest import add_arguments as _selftest_arguments

    _selftest_arguments(
        sub.add_parser("selftest", help="every op forward and backward against the reference on this device")
    )
    return p


def _info() -> int:
    import torch

    import vitkern
    from vitkern._backend import ops_of
    from vitkern._ext import build_info_line, load_extension
    from vitkern.ops._validate import native_half_gemm

    for b in vitkern.BACKEND_TABLE:
        reason = b.status()
        print(f"{b.name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
        dtypes = ", ".join(str(d).removeprefix("torch.") for d in b.dtypes)
        devices = ", ".join(b.devices) + (f" (cpu with {b.cpu_env}=1)" if b.cpu_env else "") if b.devices else "any"
        print(f"{'':10s} devices: {devices}; dtypes: {dtypes}; ops: {', '.join(ops_of(b.name))}")
        if b.limits:
            print(f"{'':10s} limits: {b.limits}")
    print("auto order: " + "; ".join(f"{d} tensors: {' -> '.join(vitkern.auto_order(d))}" for d in ("cpu", "cuda")))
    ext = load_extension()
    if ext is not None:
        print(f"vitkern._C: {ext.__file__}; CPU BLAS: {ext.blas_backend()}; SIMD paths: {ext.simd_paths()}")
        print(f"vitkern._C weight GEMMs: {ext.gemm_route()}")
        hw = {d: native_half_gemm(getattr(torch, d)) for d in ("bfloat16", "float16")}
        print(
            "half-precision GEMMs in this CPU: "
            + ", ".join(f"{d} {'yes' if v else 'no'}" for d, v in hw.items())
            + " (where not: bf16/fp16 CPU inference and autocast compute in the fp32 kernels; where yes: torch's)"
        )
        print(f"vitkern._C ABI: {ext.abi()}")
        print(f"vitkern._C build: {build_info_line()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        from vitkern.bench.suite import run as _bench

        return _bench(args)
    if args.command == "selftest":
        from vitkern.selftest import run

        return run(args)
    if getattr(args, "timm_zoo", False):
        return _timm_zoo(args.verbose)
    return _info()


def _timm_zoo(verbose: bool) -> int:
    """Coverage of timm's ViT zoo; exit status 1 on any wrong or unclear conversion."""
    from vitkern.interop.zoo import summarize_zoo, timm_zoo_report

    def progress(r: dict) -> None:
        if verbose:
            print(f"{r['outcome']:8s} {r['name']:48s} {r.get('detail') or r.get('reason', '')}", flush=True)

    records = timm_zoo_report(progress=progress)
    print(summarize_zoo(records))
    return 1 if any(r["outcome"] in ("wrong", "unclear") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
