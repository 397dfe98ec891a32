"""layernorm_mlp: vitkern vs eager, torch.compile and the two GEMMs alone."""

import pytest
from conftest import DEVICE, DTYPES, cached_case, run_provider

from vitkern.bench_suites import layernorm_mlp_case

PROVIDERS = ["vitkern[cpu]", "vitkern[triton]", "vitkern[cuda]", "eager", "torch.compile(eager)", "GEMMs alone"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dim", [384, 768])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layernorm_mlp(benchmark, provider, backward, dim, dtype):
    case = cached_case(layernorm_mlp_case, dim, dtype=dtype, device=DEVICE, backward=backward)
    run_provider(benchmark, case, provider)
