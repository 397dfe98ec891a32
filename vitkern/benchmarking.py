"""Timing utilities shared by ``vitkern bench`` and benchmarks/.

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
) -> dict[str, Timing]:
    """Time each zero-argument callable ``repeats`` times, interleaved, after ``warmup`` rounds."""
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
