"""Shared test helpers. Nothing global is changed at import time."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Per-dtype tolerances of docs/DESIGN.md §5 (relative Frobenius error vs float64).
# tests/kernels/ holds the Triton kernel tests (op x backend x device x dtype). They run in
# this process only where the kernels can: with a CUDA device (natively), or when the whole
# run is under the interpreter. Otherwise this process, which needs Triton's real compiler
# (tests/test_gpu_readiness.py), leaves them out and tests/test_triton_kernels.py::
# test_kernel_suite runs them in one subprocess with TRITON_INTERPRET=1.
KERNEL_SUITE_IN_PROCESS = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"
collect_ignore = [] if KERNEL_SUITE_IN_PROCESS else ["kernels"]

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf (NaN never passes)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if torch.isnan(out64).any() or torch.isnan(ref64).any():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


@pytest.fixture
def poison_empty():
    """Make every torch.empty (also from C++ via at::empty) come back full of NaN,
    so an output element a kernel forgets to write fails the comparison."""
    import torch.utils.deterministic as det

    prev_alg, prev_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    prev_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        det.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_alg, warn_only=prev_warn)


@pytest.fixture
def gen():
    """A fresh, seeded-per-test generator: random inputs, never zeros."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"generator seed: {seed}")  # shown by pytest when the test fails
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, dtype=torch.float32, gen: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a fresh Python that imports the same vitkern as this process: the
    installed wheel in CI (its parent directory first on PYTHONPATH is harmless), the
    source tree in a development checkout run with PYTHONPATH=. . Run such processes with
    ``cwd=SUBPROCESS_CWD``: a cwd at the repository root would put the source tree, which
    has no compiled ``_C``, in front of the installed package."""
    import vitkern

    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(vitkern.__file__)))
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH", "")) if p)
    return env


SUBPROCESS_CWD = tempfile.gettempdir()


def half_gemms(native: bool):
    """A context that makes vitkern see a CPU with (``native``) or without bf16/fp16 GEMM hardware
    (``vitkern.ops._validate.native_half_gemm``); with ``native`` vitkern's own bf16 GEMM kernel is
    off too, so half precision takes torch's GEMMs as on a CPU without that kernel."""
    import contextlib
    from unittest import mock

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("vitkern.ops._validate.native_half_gemm", lambda dtype: native))
    if native:
        stack.enter_context(mock.patch("vitkern.ops._packed._BF16_ROUTE", False))
    return stack


def run_python(args: list[str], **env: str):
    """A fresh Python running ``args`` with ``env`` added to the environment, from SUBPROCESS_CWD."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, *args], env=subprocess_env(**env), cwd=SUBPROCESS_CWD, capture_output=True, text=True
    )


def small_vit(kwargs: dict, img):
    """A small eval-mode ``vitkern.ViT`` (patch 16, 7 classes) with non-trivial norms and biases."""
    import vitkern

    torch.manual_seed(0)
    model = vitkern.ViT(**{"img_size": img, "patch_size": 16, "num_classes": 7, **kwargs}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def grid_image(batch: int, img):
    """A seeded (batch, 3, H, W) image batch; ``img`` an int or (H, W)."""
    h, w = (img, img) if isinstance(img, int) else img
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))
