"""pytest-benchmark glue for benchmarks/: one test times one provider of one case."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

import vitkern
from vitkern.bench.cases import Case


def bench_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_dtypes(full: bool) -> list[torch.dtype]:
    """fp32 by default; the full sweep adds bf16 on the CPU, fp16 and bf16 on a GPU."""
    if not full:
        return [torch.float32]
    return [torch.float16, torch.bfloat16] if bench_device() == "cuda" else [torch.float32, torch.bfloat16]


def vitkern_providers() -> list[str]:
    """The provider names of vitkern's backends other than reference (one per table row)."""
    return [f"vitkern[{b}]" for b in vitkern.BACKENDS if b != "reference"]


@functools.lru_cache(maxsize=4)
def cached_case(builder: Callable[..., Case], *args, **kwargs) -> Case:
    """Build a case once for all of its providers (compiling the baselines is slow)."""
    return builder(*args, **kwargs)


def run_provider(benchmark, case: Case, provider: str, rounds: int = 3) -> None:
    """Time one provider of a case with pytest-benchmark, grouped by case."""
    import pytest

    if provider in case.failures:
        pytest.skip(f"{provider} failed: {case.failures[provider]}")
    if provider not in case.providers:
        pytest.skip(f"{provider} is not available here")
    benchmark.group = case.name
    benchmark.extra_info.update(flops=case.flops, compile_s=case.compile_s.get(provider))
    run = case.providers[provider]
    sync = torch.cuda.synchronize if case.device.type == "cuda" else (lambda: None)

    def timed() -> None:
        run()
        sync()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
