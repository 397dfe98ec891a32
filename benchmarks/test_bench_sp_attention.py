"""sp_attention: vitkern vs eager SP-SA, the public SP-ViT code, torch.compile,
compiled FlexAttention and the SDPA floor."""

import pytest
from conftest import DEVICE, DTYPES, FULL, cached_case, run_provider

from vitkern.bench_suites import attention_case

GRIDS = [14, 24, 28, 32] if FULL else [14]
BATCHES = [1, 8] if FULL else [8]
PROVIDERS = [
    "vitkern[cpu]",
    "vitkern[triton]",
    "vitkern[cuda]",
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
    run_provider(benchmark, case, provider)
