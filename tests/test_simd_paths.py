"""The AVX2+FMA code of the cpu kernels on any x86 CPU that has it.

The kernels pick AVX-512, AVX2+FMA or scalar code at run time. A CI machine with AVX-512
would only ever run the first, and the scalar code is covered by the generic build
(scripts/test_generic_simd.sh); so the cpu-kernel tests run once more in a fresh process
with ``VITKERN_SIMD=avx2``, which caps the path (an AVX2-only CPU, e.g. AMD Zen 2/3 or most
laptop Intel parts, takes it by default).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import SUBPROCESS_CWD, subprocess_env

from vitkern._ext import extension_error, load_extension

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = [
    pytest.mark.skipif(load_extension() is None, reason=f"_C not built: {extension_error()}"),
    pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="the CPU has no AVX2"),
]


def _paths(env: dict[str, str]) -> str:
    code = "import vitkern._ext as e; print(e.load_extension().simd_paths())"
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=SUBPROCESS_CWD, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_the_simd_cap_is_honoured():
    if "scalar only" in load_extension().simd_paths():
        pytest.skip("generic build: no x86 vector code to cap")
    assert _paths(subprocess_env(VITKERN_SIMD="avx2")).endswith("active: avx2+fma")
    assert _paths(subprocess_env(VITKERN_SIMD="scalar")).endswith("active: scalar")


def test_cpu_kernels_on_the_avx2_path():
    if "scalar only" in load_extension().simd_paths():
        pytest.skip("generic build: no x86 vector code")
    files = [os.path.join(HERE, f) for f in ("test_cpu_kernels.py", "test_cpu_sp_attention.py", "test_packed_gemm.py")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *files]
    r = subprocess.run(cmd, env=subprocess_env(VITKERN_SIMD="avx2"), cwd=SUBPROCESS_CWD, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]


def test_an_unknown_simd_cap_is_named_in_a_warning():
    code = "import vitkern"
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(VITKERN_SIMD="avx-2"),
        cwd=SUBPROCESS_CWD,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RuntimeWarning" in r.stderr and "VITKERN_SIMD='avx-2'" in r.stderr and "'avx2'" in r.stderr, r.stderr
