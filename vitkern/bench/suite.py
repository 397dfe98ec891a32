"""The ``vitkern bench`` suite: its command-line arguments, the rows it runs, and the run
(GEMM floor, interleaved timings, tables, results.json, plots).

Every benchmark row is declared in :func:`suite_cases`; the case builders are in
:mod:`vitkern.bench.cases`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(b: argparse.ArgumentParser) -> None:
    """The ``vitkern bench`` options."""
    b.add_argument("--suite", choices=["ops", "models", "all"], default="all")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32"])
    b.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 8; 2 with --quick)")
    b.add_argument(
        "--img",
        nargs="+",
        type=int,
        default=None,
        help="image sizes for the attention sweep, patch 16 (default 224 384 448 512)",
    )
    b.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="models (default vit_small_patch16_224 vit_base_patch16_224 sp_vit_small_patch16_224)",
    )
    b.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    b.add_argument("--repeats", type=int, default=None, help="timed repeats per provider (default 7; 3 with --quick)")
    b.add_argument(
        "--threads",
        nargs="+",
        type=int,
        default=None,
        help="intra-op threads for the models suite, one run per value (default: torch's current setting)",
    )
    b.add_argument("--no-peers", action="store_true", help="models suite: skip the OpenVINO / ONNX Runtime baselines")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile / FlexAttention baselines")
    b.add_argument("--quick", action="store_true", help="tiny shapes, few repeats, no compile: a smoke run in seconds")
    b.add_argument("--out", default="bench_out", help="output folder for results.json and the plots")


# ----------------------------------------------------------------------------- the rows
def suite_cases(args: argparse.Namespace, device: torch.device):
    from vitkern.bench import cases as S

    quick, compile_ = args.quick, not (args.no_compile or args.quick)
    batches = args.batch or ([2] if quick else [8])
    imgs = args.img or ([64] if quick else [224, 384, 448, 512])
    for dname in args.dtype:
        dtype = DTYPES[dname]
        for bwd in [p == "fwd+bwd" for p in args.passes]:
            kw = dict(dtype=dtype, device=device, backward=bwd, compile=compile_)
            if args.suite in ("ops", "all"):
                for batch in batches:
                    for img in imgs:
                        yield lambda img=img, batch=batch, kw=kw: S.attention_case(
                            img // 16, batch=batch, heads=2 if quick else 6, head_dim=32 if quick else 64, **kw
                        )
                    for dim in [64] if quick else [384, 768]:
                        yield lambda dim=dim, batch=batch, kw=kw: S.layernorm_mlp_case(
                            dim, tokens=17 if quick else 197, batch=batch, **kw
                        )
                    # The op's variants (CLIP's QuickGELU; RMSNorm + SiLU), at ViT-B width.
                    for act, norm in [("quick_gelu", "layernorm"), ("silu", "rmsnorm")]:
                        yield lambda batch=batch, kw=kw, act=act, norm=norm: S.layernorm_mlp_case(
                            64 if quick else 768,
                            tokens=17 if quick else 197,
                            batch=batch,
                            activation=act,
                            norm=norm,
                            **kw,
                        )
                    yield lambda batch=batch, kw=kw: S.patch_embed_case(
                        img=64 if quick else 224, dim=64 if quick else 768, batch=batch, **kw
                    )
            if args.suite in ("models", "all"):
                names = args.models or (
                    ["vit_tiny_patch16_224"]
                    if quick
                    else ["vit_small_patch16_224", "vit_base_patch16_224", "sp_vit_small_patch16_224"]
                )
                for threads in args.threads or [None]:
                    for batch in batches:
                        for name in names:
                            if bwd and not quick and name != "vit_small_patch16_224" and args.models is None:
                                continue  # training step: vit_small only by default
                            mk = dict(batch=batch, img=64 if quick else 224, threads=threads, **kw)
                            yield lambda name=name, mk=mk: S.model_case(name, peers=not args.no_peers, **mk)
                            if dtype == torch.float32:  # the mixed-precision row: both models under autocast
                                amp = torch.float16 if device.type == "cuda" else torch.bfloat16
                                # the engines' bf16 mode here unless a bf16 row already has them
                                amp_peers = not (args.no_peers or quick) and "bfloat16" not in args.dtype
                                yield lambda name=name, mk=mk, amp=amp, ap=amp_peers: S.model_case(
                                    name, autocast=amp, peers=ap, **mk
                                )


# ----------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> int:
    from vitkern.bench.baselines import gemm_routes_gflops
    from vitkern.bench.report import Progress, plots, results_table, summary_table
    from vitkern.bench.timing import environment, run_case

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    env = environment(device)
    start = time.perf_counter()
    peaks, env["gemm_routes_gflops"] = {}, {}
    for dname in args.dtype:
        routes = gemm_routes_gflops(device, DTYPES[dname], n=512 if args.quick else 1536)
        env["gemm_routes_gflops"][dname] = routes
        peaks[DTYPES[dname]] = max(routes.values())
    print(
        f"vitkern bench: {env['device_name']} ({device}), torch {env['torch']}, {env['threads']} threads; "
        "GEMM floor (GFLOP/s, fastest route per dtype): "
        + "; ".join(
            f"{d}: " + ", ".join(f"{r} {g:.0f}" for r, g in routes.items())
            for d, routes in env["gemm_routes_gflops"].items()
        )
    )
    repeats = args.repeats or (3 if args.quick else 7)
    builders = list(suite_cases(args, device))
    progress = Progress(len(builders))
    results = []
    try:
        for build in builders:
            case = build()
            results.append(run_case(case, repeats, peaks[case.dtype]))
            progress.step(case.name)
            del case
    finally:
        progress.stop()
    results_table(results)
    summary_table(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env["wall_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps({"environment": env, "results": results}, indent=2, default=str))
    written = plots(results, out)
    print(
        f"wrote {out / 'results.json'}"
        + (f" and {', '.join(written)}" if written else "")
        + f" in {env['wall_s']:.0f} s"
    )
    return 0
