"""sp_attention: vitkern vs eager SP-SA, the public SP-ViT code, torch.compile,
compiled FlexAttention and the SDPA floor."""

import os

import pytest

from vitkern.bench import attention_case
from vitkern.bench.pytest_glue import bench_device, bench_dtypes, cached_case, run_provider, vitkern_providers

FULL = os.environ.get("VITKERN_BENCH_FULL", "0") == "1"
DEVICE = bench_device()
DTYPES = bench_dtypes(FULL)
GRIDS = [14, 24, 28, 32] if FULL else [14]
BATCHES = [1, 8] if FULL else [8]
PROVIDERS = [
    *vitkern_providers(),
    "eager",
    "public SP-ViT code",
    "torch.compile(eager)",
    "FlexAttention (compiled)",
    "SDPA (no prior)",
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sp_attention(benchmark, provider, backward, batch, grid, dtype):
    case = cached_case(attention_case, grid, batch=batch, dtype=dtype, device=DEVICE, backward=backward)
    run_provider(benchmark, case, provider, rounds=5 if FULL else 3)
