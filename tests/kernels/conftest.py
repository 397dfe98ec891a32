"""Fixtures of the kernel suite: every Triton kernel test runs per op x backend x device x dtype.

The device is the real GPU when ``torch.cuda.is_available()`` (the kernels compile and
run natively in the test process, bf16 included), else the CPU under Triton's interpreter.
The interpreter must be chosen before triton is first imported (``TRITON_INTERPRET=1``
turns every ``@triton.jit`` into an interpreted function), so on a machine without CUDA
this directory runs as its own pytest process with the variable set:
``TRITON_INTERPRET=1 pytest tests/kernels``. A plain ``pytest tests`` does that for you:
tests/conftest.py leaves this directory out of its own collection and
tests/test_triton_kernels.py::test_kernel_suite runs it in a subprocess and fails with it.
"""

from __future__ import annotations

import os

import pytest
import torch

from vitkern import testing

pytest.importorskip("triton")

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETER else "cpu"
if DEVICE == "cpu" and not INTERPRETER:
    raise pytest.UsageError(
        "tests/kernels: no CUDA device and TRITON_INTERPRET is not 1; run `TRITON_INTERPRET=1 pytest tests/kernels`"
    )
# The Triton backend is the GPU-kernel backend of every op (the cpu backend's kernels are
# tested in tests/test_cpu_*.py in the main process).
BACKENDS = ["triton"]


def dtypes_for(case: dict) -> list[str]:
    """The interpreter runs each case in its own dtype (fp32 or fp16: it computes bf16 on
    raw bit patterns); a GPU runs every case in fp32, fp16 and bf16."""
    return [case["dtype"]] if DEVICE == "cpu" else ["float32", "float16", "bfloat16"]


def _case_id(case: dict) -> str:
    return case["op"] + "-" + "-".join(str(s).replace(" ", "") for s in case["shape"])


def pytest_configure(config):
    config.addinivalue_line("markers", "ops(*names): run the test over the OP_CASES of these ops only")


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)
    if "op_case" in metafunc.fixturenames:
        # @pytest.mark.ops("sp_attention"): only that op's cases; unmarked: every case
        marker = metafunc.definition.get_closest_marker("ops")
        ops = marker.args if marker else None
        cases = [c for c in testing.OP_CASES if ops is None or c["op"] in ops]
        assert cases, f"no case of {ops} in vitkern.testing.OP_CASES"
        params = [(c, dt) for c in cases for dt in dtypes_for(c)]
        ids = [f"{_case_id(c)}-{dt}" for c, dt in params]
        metafunc.parametrize("op_case,dtype_name", params, ids=ids)


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture
def dtype(dtype_name) -> torch.dtype:
    return getattr(torch, dtype_name)


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (random inputs), printed so a failure can be replayed."""
    s = int.from_bytes(os.urandom(4), "little")
    print(f"seed: {s}")
    return s
