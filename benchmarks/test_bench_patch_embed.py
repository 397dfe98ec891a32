"""patch_embed: vitkern vs timm's Conv2d (eager), torch.compile and the GEMM alone."""

import pytest
from conftest import DEVICE, DTYPES, cached_case, run_provider

from vitkern.bench_suites import patch_embed_case

PROVIDERS = ["vitkern[cpu]", "vitkern[triton]", "vitkern[cuda]", "eager (Conv2d)", "torch.compile(eager)", "GEMM alone"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_patch_embed(benchmark, provider, backward, dtype):
    case = cached_case(patch_embed_case, 224, 16, 768, dtype=dtype, device=DEVICE, backward=backward)
    run_provider(benchmark, case, provider)
