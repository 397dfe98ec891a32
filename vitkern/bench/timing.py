"""Timing: interleaved samples, their summary, peak memory, and one case measured into a
result record (``vitkern bench`` and benchmarks/).

Timings are interleaved (A B A B ...; the order rotates every round so neither
provider always runs first), follow a warm-up, and are summarised by the median
and the interquartile spread. On CUDA each call is timed with CUDA events after a synchronisation.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Timing:
    name: str
    samples_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def spread(self) -> tuple[float, float]:
        """(25th, 75th) percentile in ms."""
        s = sorted(self.samples_ms)
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
        return q[0], q[2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeats: int = 7,
    settle_s: float = 0.0,
) -> dict[str, Timing]:
    """Time each zero-argument callable ``repeats`` times, interleaved, after ``warmup`` rounds.

    With ``settle_s`` each timed call starts that long after the previous one ended (the models
    suite: ``Case.settle_s``, 0.1 s where a peer engine is among the CPU providers):
    ONNX Runtime's worker threads keep spinning for tens of milliseconds after a run returns and
    slow down whatever runs next on the other cores (measured, 2 threads, ViT-S batch 1: the next
    forward 1.6-2x slower; with a 50 ms pause, not at all), and in a fixed cyclic order that is
    always the same provider (benchmarks/NOTES.md, "A spinning thread pool")."""
    device = torch.device(device)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    out = {n: Timing(n) for n in names}
    cuda = device.type == "cuda"
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            if cuda:  # device time between CUDA events, not host time
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                _sync(device)
                start.record()
                fns[n]()
                end.record()
                end.synchronize()
                out[n].samples_ms.append(start.elapsed_time(end))
            else:
                if settle_s:
                    time.sleep(settle_s)
                t0 = time.perf_counter()
                fns[n]()
                out[n].samples_ms.append((time.perf_counter() - t0) * 1e3)
    return out


def ratio_spread(base: Timing, other: Timing) -> tuple[float, float, float]:
    """Speed-up of ``other`` over ``base``: median ratio and the range over paired repeats' quartiles."""
    pairs = sorted(b / o for b, o in zip(base.samples_ms, other.samples_ms, strict=True))
    med = base.median / other.median
    q = statistics.quantiles(pairs, n=4) if len(pairs) >= 2 else [pairs[0]] * 3
    return med, q[0], q[2]


def environment(device: torch.device | str = "cpu") -> dict[str, object]:
    """Device, library versions and thread count, recorded with every run."""
    import vitkern

    device = torch.device(device)
    env: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "vitkern": vitkern.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "backends": vitkern.available_backends(),
    }
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def as_dict(t: Timing) -> dict[str, object]:
    d = asdict(t)
    d["median_ms"], d["spread_ms"] = t.median, t.spread
    return d


def peak_memory_mb(run, device: torch.device) -> float:
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


def run_case(case, repeats: int, peak_gflops: float) -> dict:
    """Time every provider of ``case`` interleaved; ratios to its baseline and floor, GFLOP/s,
    % of the GEMM peak and peak memory per provider, with its failures and notes: one JSON record."""
    default_threads = torch.get_num_threads()
    if case.threads:
        torch.set_num_threads(case.threads)
    try:
        timings = time_interleaved(
            case.providers, case.device, warmup=1 if repeats <= 3 else 2, repeats=repeats, settle_s=case.settle_s
        )
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
        row["peak_mem_mb"] = peak_memory_mb(case.providers[name], case.device)
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
