"""``vitkern`` command line: ``vitkern bench`` (the main job), ``vitkern info`` and
``vitkern selftest`` (vitkern/selftest.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitkern", description="vitkern: fused kernels for Vision Transformers")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench", help="benchmark vitkern against eager PyTorch, torch.compile, SDPA, FlexAttention, timm"
    )
    b.add_argument("--suite", choices=["ops", "models", "all"], default="all")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--dtype", nargs="+", choices=sorted(_DTYPES), default=["float32"])
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


# ----------------------------------------------------------------------------- output helpers
def _console():
    try:
        from rich.console import Console
    except ImportError:
        return None
    c = Console()
    return c if c.is_terminal else Console(width=200)


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    console = _console()
    if console is not None:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=escape(title), title_justify="left")
        for c in columns:
            table.add_column(c, justify="left" if c in ("case", "provider") else "right")
        for r in rows:
            table.add_row(*(escape(x) for x in r))
        console.print(table)
        return
    print(title)
    widths = (
        [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)] if rows else [len(c) for c in columns]
    )
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)))


class _Progress:
    def __init__(self, total: int) -> None:
        self._done, self._total = 0, total
        console = _console()
        if console is None or not console.is_terminal:  # logs (CI): one line per finished case
            self._p = None
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            self._p.start()
            self._task = self._p.add_task("bench", total=total)
        except ImportError:
            self._p = None

    def step(self, description: str) -> None:
        self._done += 1
        if self._p is not None:
            self._p.update(self._task, advance=1, description=description)
        else:
            print(f"[{self._done}/{self._total}] {description}", flush=True)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()


def _peak_memory_mb(run, device: torch.device) -> float:
    """Extra peak memory of one call: CUDA allocator peak, or peak RSS on the CPU (Linux)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        import gc

        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")

        def status(key: str) -> float:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key):
                        return float(line.split()[1]) / 1024
            return float("nan")

        before = status("VmRSS")
        run()
        return max(0.0, status("VmHWM") - before)
    except OSError:
        return float("nan")


# ----------------------------------------------------------------------------- the runs
def _cases(args: argparse.Namespace, device: torch.device):
    from vitkern import bench_suites as S

    quick, compile_ = args.quick, not (args.no_compile or args.quick)
    batches = args.batch or ([2] if quick else [8])
    imgs = args.img or ([64] if quick else [224, 384, 448, 512])
    for dname in args.dtype:
        dtype = _DTYPES[dname]
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


def _run_case(case, repeats: int, peak_gflops: float) -> dict:
    from vitkern.benchmarking import as_dict, ratio_spread, time_interleaved

    default_threads = torch.get_num_threads()
    if case.threads:
        torch.set_num_threads(case.threads)
    try:
        timings = time_interleaved(case.providers, case.device, warmup=1 if repeats <= 3 else 2, repeats=repeats)
    finally:
        torch.set_num_threads(default_threads)
    base = timings.get(case.baseline)
    floor = timings.get(case.floor) if case.floor else None
    rows = {}
    for name, t in timings.items():
        row = as_dict(t)
        if base is not None:
            row["speedup_vs_baseline"], *iqr = ratio_spread(base, t)
            row["speedup_iqr"] = iqr
        if floor is not None:
            row["x_floor"] = t.median / floor.median
        if case.flops:
            row["gflops"] = case.flops / (t.median * 1e-3) / 1e9
            row["pct_gemm_peak"] = 100.0 * row["gflops"] / peak_gflops
        row["peak_mem_mb"] = _peak_memory_mb(case.providers[name], case.device)
        rows[name] = row
    return {
        "case": case.name,
        "op": case.op,
        "params": case.params,
        "dtype": str(case.dtype),
        "backward": case.backward,
        "baseline": case.baseline,
        "floor": case.floor,
        "providers": rows,
        "failures": case.failures,
        "compile_s": case.compile_s,
        "notes": case.notes,
    }


def _table(results: list[dict]) -> None:
    cols = ["case", "provider", "median ms", "IQR ms", "x baseline", "x floor", "GFLOP/s", "% peak", "peak MB"]
    rows = []
    for r in results:
        first = True
        for name, p in r["providers"].items():
            lo, hi = p["spread_ms"]
            rows.append(
                [
                    r["case"] if first else "",
                    name,
                    f"{p['median_ms']:.2f}",
                    f"{lo:.2f}-{hi:.2f}",
                    f"{p['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in p else "",
                    f"{p['x_floor']:.2f}" if "x_floor" in p else "",
                    f"{p['gflops']:.1f}" if "gflops" in p else "",
                    f"{p['pct_gemm_peak']:.0f}" if "pct_gemm_peak" in p else "",
                    f"{p['peak_mem_mb']:.1f}",
                ]
            )
            first = False
        for name, why in r["failures"].items():
            rows.append(["", name, "failed", why[:60], "", "", "", "", ""])
        for name, val in r.get("notes", {}).items():
            rows.append(["", name, f"{val:.1e}" if isinstance(val, float) else str(val), "", "", "", "", "", ""])
        for name, secs in r["compile_s"].items():  # compile time, excluded from the timings above
            rows.append(["", f"{name}: compile", f"{secs * 1e3:.0f}", "(first call)", "", "", "", "", ""])
    _print_table(
        "x baseline: speed-up over the case's baseline (eager / timm / public code); "
        "x floor: time / floor (SDPA without prior, or the bare GEMMs)",
        cols,
        rows,
    )


def _summary(results: list[dict]) -> None:
    """vitkern's speed-up against each baseline, one row per case (baseline time / vitkern time)."""
    names = []
    rows_data = []
    for r in results:
        mine = [n for n in r["providers"] if n.startswith("vitkern")]
        for m in mine:
            t = r["providers"][m]["median_ms"]
            ratios = {n: p["median_ms"] / t for n, p in r["providers"].items() if not n.startswith("vitkern")}
            names += [n for n in ratios if n not in names]
            rows_data.append((f"{r['case']} {m}", ratios))
    if not rows_data:
        return
    rows = [[case, *(f"{ratios[n]:.2f}x" if n in ratios else "" for n in names)] for case, ratios in rows_data]
    _print_table(
        "vitkern speed-up vs each baseline (baseline median / vitkern median; < 1 = baseline faster)",
        ["case", *names],
        rows,
    )


def _plots(results: list[dict], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    att = [r for r in results if r["op"] == "sp_attention"]
    written = []
    for metric, ylabel, fname in [
        ("speedup_vs_baseline", "speed-up over eager SP-SA", "attention_speedup.png"),
        ("peak_mem_mb", "peak extra memory (MB)", "attention_memory.png"),
    ]:
        groups: dict[tuple, dict[str, list[tuple[int, float]]]] = {}
        for r in att:
            key = (r["dtype"].removeprefix("torch."), "fwd+bwd" if r["backward"] else "fwd", r["params"]["B"])
            for name, p in r["providers"].items():
                if metric in p:
                    groups.setdefault(key, {}).setdefault(name, []).append((r["params"]["N"], p[metric]))
        if not groups:
            continue
        names = sorted({n for series in groups.values() for n in series})
        colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}  # same colour in every panel
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
        for ax, (key, series) in zip(axes[0], sorted(groups.items()), strict=True):
            for name, pts in sorted(series.items()):
                pts.sort()
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name, color=colors[name])
            ax.set_title(f"sp_attention {key[0]} {key[1]} B={key[2]}")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(str(out / fname))
    return written


def _bench(args: argparse.Namespace) -> int:
    from vitkern.bench_suites import gemm_routes_gflops
    from vitkern.benchmarking import environment

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    env = environment(device)
    start = time.perf_counter()
    peaks, env["gemm_routes_gflops"] = {}, {}
    for dname in args.dtype:
        routes = gemm_routes_gflops(device, _DTYPES[dname], n=512 if args.quick else 1536)
        env["gemm_routes_gflops"][dname] = routes
        peaks[_DTYPES[dname]] = max(routes.values())
    print(
        f"vitkern bench: {env['device_name']} ({device}), torch {env['torch']}, {env['threads']} threads; "
        "GEMM floor (GFLOP/s, fastest route per dtype): "
        + "; ".join(
            f"{d}: " + ", ".join(f"{r} {g:.0f}" for r, g in routes.items())
            for d, routes in env["gemm_routes_gflops"].items()
        )
    )
    repeats = args.repeats or (3 if args.quick else 7)
    builders = list(_cases(args, device))
    progress = _Progress(len(builders))
    results = []
    try:
        for build in builders:
            case = build()
            results.append(_run_case(case, repeats, peaks[case.dtype]))
            progress.step(case.name)
            del case
    finally:
        progress.stop()
    _table(results)
    _summary(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env["wall_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps({"environment": env, "results": results}, indent=2, default=str))
    plots = _plots(results, out)
    print(
        f"wrote {out / 'results.json'}" + (f" and {', '.join(plots)}" if plots else "") + f" in {env['wall_s']:.0f} s"
    )
    return 0


def _info() -> int:
    import vitkern
    from vitkern._ext import build_info_line, load_extension

    for name, reason in vitkern.available_backends().items():
        print(f"{name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    ext = load_extension()
    if ext is not None:
        print(f"vitkern._C: {ext.__file__}; CPU BLAS: {ext.blas_backend()}; SIMD paths: {ext.simd_paths()}")
        print(f"vitkern._C ABI: {ext.abi()}")
        print(f"vitkern._C build: {build_info_line()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "selftest":
        from vitkern.selftest import run

        return run(args)
    if getattr(args, "timm_zoo", False):
        return _timm_zoo(args.verbose)
    return _info()


def _timm_zoo(verbose: bool) -> int:
    """Coverage of timm's ViT zoo; exit status 1 on any wrong or unclear conversion."""
    from vitkern.zoo import summarize_zoo, timm_zoo_report

    def progress(r: dict) -> None:
        if verbose:
            print(f"{r['outcome']:8s} {r['name']:48s} {r.get('detail') or r.get('reason', '')}", flush=True)

    records = timm_zoo_report(progress=progress)
    print(summarize_zoo(records))
    return 1 if any(r["outcome"] in ("wrong", "unclear") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
