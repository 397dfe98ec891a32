"""Whole models: vitkern.ViT vs timm (eager and compiled); SP-ViT vs the public code."""

import os

import pytest

from vitkern.bench import model_case
from vitkern.bench.pytest_glue import bench_device, bench_dtypes, cached_case, run_provider

FULL = os.environ.get("VITKERN_BENCH_FULL", "0") == "1"
DEVICE = bench_device()
DTYPES = bench_dtypes(FULL)
PROVIDERS = ["vitkern", "timm eager", "timm compiled", "eager SP-ViT (public code)"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    "name,backward",
    [
        ("vit_small_patch16_224", False),
        ("vit_base_patch16_224", False),
        ("sp_vit_small_patch16_224", False),
        ("vit_small_patch16_224", True),
    ],
    ids=["vit_small-infer", "vit_base-infer", "sp_vit_small-infer", "vit_small-train"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model(benchmark, provider, name, backward, dtype):
    case = cached_case(model_case, name, batch=8, dtype=dtype, device=DEVICE, backward=backward)
    run_provider(benchmark, case, provider, rounds=5 if FULL else 3)
