"""``vitkern selftest``: every op forward and backward against the reference, on this
machine's device, dtypes and backends, plus a ViT and an SP-ViT training step (under
autocast for fp16 / bf16). Prints a verdict table and returns non-zero on any failure.

The cases and tolerances are those of the test-suite (vitkern.testing). On the CPU the
Triton backend runs under Triton's interpreter: ``TRITON_INTERPRET=1`` is set before
Triton is first imported when ``--backend triton`` is asked for with ``--device cpu``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_DTYPES = ("float32", "float16", "bfloat16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", nargs="+", choices=_DTYPES, default=None, help="default: float32 (+ bf16/fp16 on cuda)")
    p.add_argument(
        "--backend",
        nargs="+",
        default=None,
        metavar="BACKEND",
        help="backends to check against the reference (names: `vitkern info`); default: those 'auto' tries on "
        "the device that are available here",
    )
    p.add_argument("--no-models", action="store_true", help="skip the ViT / SP-ViT training steps")
    p.add_argument("--seed", type=int, default=0)


def _defaults(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vitkern selftest: --device cuda, but torch.cuda.is_available() is False")
    dtypes = args.dtype or (list(_DTYPES) if device == "cuda" else ["float32"])
    import vitkern  # not at module level: TRITON_INTERPRET must be set before this when asked for

    backends = args.backend
    for b in backends or ():
        if b not in vitkern.BACKENDS or b == "reference":
            names = [n for n in vitkern.BACKENDS if n != "reference"]
            raise SystemExit(f"vitkern selftest: --backend must be among {names}, got {b!r}")
    if backends is None:
        avail = vitkern.available_backends()
        backends = [b for b in vitkern.auto_order(device) if b != "reference" and avail[b] is None]
    return device, dtypes, backends


def run(args) -> int:
    if (args.device or "cpu") == "cpu" and args.backend and "triton" in args.backend:
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"  # the Triton kernels on the CPU: the interpreter
    import torch

    from vitkern import testing

    device, dtypes, backends = _defaults(args)
    if not backends:
        print(f"vitkern selftest: no backend to test on {device} (see `vitkern info`)", file=sys.stderr)
        return 1
    if device == "cpu" and "triton" in backends and os.environ.get("TRITON_INTERPRET") != "1":
        print("vitkern selftest: the triton backend on the CPU needs TRITON_INTERPRET=1", file=sys.stderr)
        return 1
    rows = []
    t0 = time.perf_counter()
    for backend in backends:
        for dt in dtypes:
            dtype = getattr(torch, dt)
            for i, case in enumerate(testing.SELFTEST_CASES):
                rows.append(testing.check_op_case(case, backend, dtype, device, seed=args.seed + i))
            if not args.no_models:
                for sp in (False, True):
                    rows.append(testing.check_model_step(sp, backend, dtype, device, seed=args.seed))
    _print(rows, device)
    failed = [r for r in rows if not r.passed]
    print(
        f"{len(rows) - len(failed)}/{len(rows)} passed on {device} in {time.perf_counter() - t0:.1f} s"
        + (f"; FAILED: {len(failed)}" if failed else "")
    )
    return 1 if failed else 0


def _print(rows, device) -> None:
    cols = ["op", "backend", "dtype", "case", "worst error", "tolerance", "pass"]
    table = []
    for r in rows:
        err = r.error[:70] or f"{r.worst:.2e} ({r.worst_name})"
        table.append([r.op, r.backend, r.dtype, r.case, err, f"{r.tol:.0e}", "PASS" if r.passed else "FAIL"])
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print(f"vitkern selftest on {device}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for t in table:
        print("  ".join(x.ljust(w) for x, w in zip(t, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vitkern selftest", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
