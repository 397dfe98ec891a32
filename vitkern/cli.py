"""``vitkern`` command line: ``vitkern bench`` (the main job) and ``vitkern info``."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitkern", description="vitkern: fused kernels for Vision Transformers")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmark vitkern against eager PyTorch / timm, print a table, write JSON")
    b.add_argument("--suite", choices=["models", "ops", "all"], default="models")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    b.add_argument("--batch", type=int, default=None, help="batch size (default 8; 2 with --quick)")
    b.add_argument("--models", nargs="+", default=None, help="model names (default vit_small and vit_base)")
    b.add_argument("--repeats", type=int, default=None, help="timed repeats per provider (default 7; 3 with --quick)")
    b.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke run in seconds")
    b.add_argument("--out", default="bench_out", help="output folder for results.json")
    sub.add_parser("info", help="print the backends available here and why others are not")
    return p


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="right" if c not in ("model", "provider", "op") else "left")
        for r in rows:
            table.add_row(*r)
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
        console.print(table)
    except ImportError:  # plain text fallback
        print(title)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for r in rows:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)))


def _progress(total: int, description: str):
    try:
        from rich.progress import Progress

        prog = Progress(transient=True)
        prog.start()
        task = prog.add_task(description, total=total)
        return lambda: prog.advance(task), prog.stop
    except ImportError:
        return (lambda: None), (lambda: None)


def _bench_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    import vitkern
    from vitkern.benchmarking import as_dict, ratio_spread, time_interleaved

    try:
        import timm
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("the models suite compares against timm: pip install timm") from exc
    names = args.models or (
        ["vit_tiny_patch16_224"] if args.quick else ["vit_small_patch16_224", "vit_base_patch16_224"]
    )
    batch = args.batch or (2 if args.quick else 8)
    repeats = args.repeats or (3 if args.quick else 7)
    img = 64 if args.quick else 224
    results = []
    advance, stop = _progress(len(names), "models")
    try:
        for name in names:
            torch.manual_seed(0)
            kw = {"img_size": img} if args.quick else {}
            ref = timm.create_model(name, pretrained=False, **kw).to(device=device, dtype=dtype).eval()
            ours = vitkern.ViT.from_timm(ref).eval()
            x = torch.randn(batch, 3, img, img, device=device, dtype=dtype)
            with torch.inference_mode():
                a, b = ref(x).float(), ours(x).float()
                err = ((a - b).norm() / a.norm()).item()
                backends = {op: r.backend for op, r in vitkern.backend_report().items()}
                t = time_interleaved(
                    {"timm eager": functools.partial(ref, x), "vitkern": functools.partial(ours, x)},
                    device,
                    warmup=2,
                    repeats=repeats,
                )
            speed, lo, hi = ratio_spread(t["timm eager"], t["vitkern"])
            results.append(
                {
                    "suite": "models",
                    "model": name,
                    "batch": batch,
                    "img_size": img,
                    "dtype": str(dtype),
                    "rel_err_vs_timm": err,
                    "backends": backends,
                    "speedup_vs_timm_eager": speed,
                    "speedup_iqr": [lo, hi],
                    "timings": {k: as_dict(v) for k, v in t.items()},
                }
            )
            advance()
    finally:
        stop()
    rows = [
        [
            r["model"],
            str(r["batch"]),
            f"{r['timings']['timm eager']['median_ms']:.1f}",
            f"{r['timings']['vitkern']['median_ms']:.1f}",
            f"{r['speedup_vs_timm_eager']:.2f}x",
            f"{r['speedup_iqr'][0]:.2f}-{r['speedup_iqr'][1]:.2f}",
            f"{r['rel_err_vs_timm']:.1e}",
            ",".join(sorted(set(r["backends"].values()))),
        ]
        for r in results
    ]
    _print_table(
        f"vitkern.ViT vs timm eager, inference, {device}, {str(dtype).removeprefix('torch.')}",
        ["model", "batch", "timm ms", "vitkern ms", "speed-up", "IQR", "rel err", "backend"],
        rows,
    )
    return results


def _bench(args: argparse.Namespace) -> int:
    from vitkern.benchmarking import environment

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    dtype = _DTYPES[args.dtype]
    env = environment(device)
    print(f"vitkern bench: {env['device_name']} ({device}), torch {env['torch']}, {env['threads']} threads")
    results: list[dict] = []
    if args.suite in ("models", "all"):
        results += _bench_models(args, device, dtype)
    if args.suite in ("ops", "all"):
        print("the ops suite runs with pytest: pytest benchmarks/ --benchmark-only")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"environment": env, "results": results}, indent=2, default=str))
    print(f"wrote {out / 'results.json'}")
    return 0


def _info() -> int:
    import vitkern

    for name, reason in vitkern.available_backends().items():
        print(f"{name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    return _info()


if __name__ == "__main__":
    sys.exit(main())
