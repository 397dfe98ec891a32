"""patch_embed: vitkern vs timm's Conv2d (eager), torch.compile and the GEMM alone."""

import os

import pytest

from vitkern.bench import patch_embed_case
from vitkern.bench.pytest_glue import bench_device, bench_dtypes, cached_case, run_provider, vitkern_providers

FULL = os.environ.get("VITKERN_BENCH_FULL", "0") == "1"
DEVICE = bench_device()
DTYPES = bench_dtypes(FULL)
PROVIDERS = [*vitkern_providers(), "eager (Conv2d)", "torch.compile(eager)", "GEMM alone"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_patch_embed(benchmark, provider, backward, dtype):
    case = cached_case(patch_embed_case, 224, 16, 768, dtype=dtype, device=DEVICE, backward=backward)
    run_provider(benchmark, case, provider, rounds=5 if FULL else 3)
