"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only`.

Each test times one provider of one case (vitkern backends and the baselines of
vitkern.bench_suites), grouped by case so the providers print side by side.
The default sweep is small; VITKERN_BENCH_FULL=1 runs the issue's full sweep
(N = 196..1024, batch 1 and 8). For interleaved timings with ratios, spreads,
GFLOP/s and plots use `vitkern bench`.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

FULL = os.environ.get("VITKERN_BENCH_FULL", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if FULL else [torch.float32]
if DEVICE == "cuda" and FULL:
    DTYPES = [torch.float16, torch.bfloat16]


def pytest_benchmark_update_machine_info(config, machine_info):
    from vitkern.benchmarking import environment

    machine_info["vitkern"] = environment(DEVICE)


@functools.lru_cache(maxsize=4)
def cached_case(builder, *args, **kwargs):
    """Build a case once for all of its providers (compiling baselines is slow)."""
    return builder(*args, **kwargs)


def run_provider(benchmark, case, provider: str) -> None:
    if provider in case.failures:
        pytest.skip(f"{provider} failed: {case.failures[provider]}")
    if provider not in case.providers:
        pytest.skip(f"{provider} is not available here")
    benchmark.group = case.name
    benchmark.extra_info.update(flops=case.flops, compile_s=case.compile_s.get(provider))
    run = case.providers[provider]
    sync = torch.cuda.synchronize if case.device.type == "cuda" else (lambda: None)

    def timed():
        run()
        sync()

    benchmark.pedantic(timed, rounds=5 if FULL else 3, warmup_rounds=1, iterations=1)
