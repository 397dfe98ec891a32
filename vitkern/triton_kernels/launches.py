"""What a Triton launcher would run on a GPU, found without one.

:func:`capture` runs a launcher (e.g. :func:`~vitkern.triton_kernels.sp_attention.sp_attention_fwd`)
on CPU tensors with Triton's launch entry points intercepted: every plain launch, and
for an autotuned kernel every configuration its prune keeps (each one the autotuner
could select), is recorded with its real arguments and grid instead of being run.
:func:`compile_launch` then compiles a recorded launch for a CUDA architecture with the
specialisation Triton's own runtime derives from those arguments (its generated binder:
integer arguments equal to 1 become constants, multiples of 16 and 16-byte aligned
pointers are marked divisible), so the build is the one that would run on that device.

Used by scripts/gpu_build_report.py and tests/test_gpu_readiness.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

# Opt-in shared memory per block (bytes) by compute capability (CUDA C++ Programming Guide,
# technical specifications per compute capability: 163 KiB on 8.0, 99 KiB on 8.6/8.9/12.0,
# 227 KiB on 9.0/10.0).
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict  # constexprs, the configuration's kwargs and num_warps / num_stages
    grid: tuple[int, ...]
    autotuned: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def config(self) -> str:
        keys = [k for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_W", "BLOCK_D") if k in self.kwargs]
        tile = "x".join(str(self.kwargs[k]) for k in keys)
        return f"{tile} w{self.kwargs.get('num_warps', 4)} s{self.kwargs.get('num_stages', 3)}"


def _grid(grid, names, args, kwargs) -> tuple[int, ...]:
    if callable(grid):
        grid = grid({**dict(zip(names, args, strict=False)), **kwargs})
    return tuple(int(g) for g in grid)


def capture(
    launcher: Callable, *args, smem_limit: int | None = None, arch: int | None = None, **kwargs
) -> list[Launch]:
    """Run ``launcher(*args, **kwargs)`` recording its Triton launches instead of running
    them (outputs stay uninitialised). ``smem_limit``: the shared memory the kernels'
    prunes see as the device's (default: the launcher's own answer for the tensors);
    ``arch``: the compute capability they see (default: likewise)."""
    launches: list[Launch] = []

    def jit_run(self, *a, grid, warmup=False, **kw):
        launches.append(Launch(self, a, dict(kw), _grid(grid, self.arg_names, a, kw)))

    def tuner_run(self, *a, **kw):
        grid = kw.pop("grid")
        kw.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, a, strict=False))
        try:
            for cfg in self.prune_configs(kw):
                full = {**kw, **cfg.all_kwargs()}
                launches.append(Launch(self.fn, a, full, _grid(grid, self.arg_names, a, full), autotuned=True))
        finally:
            self.nargs = None

    patches = [mock.patch.object(JITFunction, "run", jit_run), mock.patch.object(Autotuner, "run", tuner_run)]
    if smem_limit is not None:
        from vitkern.triton_kernels import gemm, sp_attention

        patches += [
            mock.patch.object(gemm, "smem_limit", lambda device=None: smem_limit),
            mock.patch.object(sp_attention, "smem_limit", lambda device=None: smem_limit),
        ]
    if arch is not None:
        from vitkern.triton_kernels import gemm, sp_attention

        patches += [
            mock.patch.object(gemm, "capability", lambda device=None: arch),
            mock.patch.object(sp_attention, "capability", lambda device=None: arch),
        ]
    for p in patches:
        p.start()
    try:
        launcher(*args, **kwargs)
    finally:
        for p in reversed(patches):
            p.stop()
    return launches


def specialise(launch: Launch, arch: int):
    """(signature, constexprs, attrs, options) exactly as Triton's runtime computes them for
    this launch on a CUDA device of compute capability ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    return fn._pack_args(backend, launch.kwargs, bound_args, specialization, options)


def compile_launch(launch: Launch, arch: int):
    """Compile ``launch`` for sm_``arch`` (no GPU needed); returns Triton's CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options, signature, constexprs, attrs = specialise(launch, arch)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
