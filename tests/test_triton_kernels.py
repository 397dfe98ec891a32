"""The Triton kernel suite (tests/kernels/: every op case of vitkern/testing.py, whole
models, robustness, per op x backend x device x dtype) and the kernels' autotune spaces.

Where the kernel suite cannot run in this process (no CUDA device, and this process uses
Triton's real compiler for tests/test_gpu_readiness.py), test_kernel_suite runs it in one
subprocess under the interpreter (TRITON_INTERPRET=1 must be set before triton is
imported) and fails with it; with CUDA, pytest collects tests/kernels here and the
kernels run natively (bf16 included)."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from conftest import KERNEL_SUITE_IN_PROCESS, SUBPROCESS_CWD, subprocess_env

from vitkern import testing

pytest.importorskip("triton")

KERNEL_SUITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")


@pytest.mark.skipif(sys.platform != "linux", reason="interpreter run tested on Linux")
@pytest.mark.skipif(KERNEL_SUITE_IN_PROCESS, reason="tests/kernels is collected in this process (CUDA or interpreter)")
def test_kernel_suite(tmp_path):
    """`pytest tests/kernels` under the interpreter in one subprocess: every test passes,
    none is skipped, and every op case is there."""
    report = tmp_path / "kernels.xml"
    cmd = [sys.executable, "-P", "-m", "pytest", KERNEL_SUITE, "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1800, env=subprocess_env(TRITON_INTERPRET="1"), cwd=SUBPROCESS_CWD
    )
    out = res.stdout[-6000:] + res.stderr[-3000:]
    assert res.returncode == 0, out
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, (counts, out)
    n_attention = sum(c["op"] == "sp_attention" for c in testing.OP_CASES)
    assert counts["tests"] >= len(testing.OP_CASES) + n_attention + 3, (counts, out)


def test_autotune_prune_keeps_configs_that_fit(monkeypatch):
    """The GEMM's autotune space: pruned to tiles no larger than the problem whose
    pipelined operand tiles fit in shared memory; one config on the interpreter."""
    import triton

    from vitkern.triton_kernels import gemm

    def names(cfgs):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) for c in cfgs]

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a16 = torch.empty(0, dtype=torch.float16)
    big = gemm._prune(gemm._AUTOTUNE_CONFIGS, {"M": 1576, "N": 1536, "A": a16})
    assert names(big) == names(gemm._AUTOTUNE_CONFIGS)  # all fit at fp16
    small = gemm._prune(gemm._AUTOTUNE_CONFIGS, {"M": 20, "N": 40, "A": a16})
    assert names(small) == [(32, 64, 32, 4)]  # no tile wider than the rounded-up problem
    assert all(c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_N"] <= 64 for c in small)
    for c in gemm._AUTOTUNE_CONFIGS:  # the shared-memory rule itself
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        need = c.num_stages * (bm * bk + bk * bn) * 4
        assert gemm.config_fits(bm, bn, bk, c.num_stages, 4, smem=need)
        assert not gemm.config_fits(bm, bn, bk, c.num_stages, 4, smem=need - 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert len(gemm._prune(gemm._AUTOTUNE_CONFIGS, {"M": 1576, "N": 1536, "A": a16})) == 1
    assert triton.next_power_of_2(20) == 32


def test_attention_autotune_space_follows_the_register_sweep(monkeypatch):
    """The flash kernels' autotuner may pick the spill-free tile of the head dim (from the
    register sweep) at each pipelining depth, or the smaller fallback tiles when those do
    not fit the device's shared memory; the interpreter keeps one."""
    from vitkern.triton_kernels import gemm
    from vitkern.triton_kernels import sp_attention as spk

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for kernel, kind in ((spk._sp_attn_fwd, "fwd"), (spk._sp_attn_bwd_dkdv, "dkdv"), (spk._sp_attn_bwd_dq, "dq")):
        prune = kernel.early_config_prune
        for dtype in (torch.float16, torch.float32):
            q = torch.empty(0, dtype=dtype)
            for head_dim in (32, 64, 80, 128):
                for prior in (True, False):
                    kept = prune(kernel.configs, {"Q": q}, HEAD_DIM=head_dim, HAS_PRIOR=prior)
                    got = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
                    assert got == spk.select_configs(kind, head_dim, prior, dtype.itemsize, gemm._SMEM_DEFAULT)
                    assert got and set(got) <= set(spk.attention_configs(kind, head_dim, prior, dtype.itemsize))
                    if dtype == torch.float16 and head_dim <= 64:  # sm_80 fits the sweep tile at every depth
                        assert got == spk.attention_configs(kind, head_dim, prior)[: len(got)]
                        assert len({g[:3] for g in got}) == 1
        assert kernel.keys[:4] == ["N", "HEAD_DIM", "HAS_PRIOR", "IEEE"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    prune, q = spk._sp_attn_fwd.early_config_prune, torch.empty(0, dtype=torch.float16)
    assert len(prune(spk._sp_attn_fwd.configs, {"Q": q}, HEAD_DIM=64, HAS_PRIOR=True)) == 1
