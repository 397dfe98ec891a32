"""layernorm_mlp: vitkern vs eager, torch.compile and the two GEMMs alone."""

import os

import pytest

from vitkern.bench import layernorm_mlp_case
from vitkern.bench.pytest_glue import bench_device, bench_dtypes, cached_case, run_provider, vitkern_providers

FULL = os.environ.get("VITKERN_BENCH_FULL", "0") == "1"
DEVICE = bench_device()
DTYPES = bench_dtypes(FULL)
PROVIDERS = [*vitkern_providers(), "eager", "torch.compile(eager)", "GEMMs alone"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dim", [384, 768])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layernorm_mlp(benchmark, provider, backward, dim, dtype):
    case = cached_case(layernorm_mlp_case, dim, dtype=dtype, device=DEVICE, backward=backward)
    run_provider(benchmark, case, provider, rounds=5 if FULL else 3)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("variant", [("quick_gelu", "layernorm"), ("silu", "rmsnorm")], ids="+".join)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layernorm_mlp_variants(benchmark, provider, variant, dtype):
    act, norm = variant
    case = cached_case(layernorm_mlp_case, 768, dtype=dtype, device=DEVICE, activation=act, norm=norm)
    run_provider(benchmark, case, provider, rounds=5 if FULL else 3)
