"""Build of vitkern._C, the compiled extension (C++ always, CUDA when possible).

Environment switches (read at build time):

* ``VITKERN_SKIP_CUDA_BUILD=1``  build the C++ part only, even if nvcc is present.
* ``VITKERN_FORCE_CUDA=1``       fail instead of silently skipping CUDA when nvcc or a
                                  CUDA build of torch is missing.
* ``VITKERN_CUDA_ARCHS="80;90"`` SM architectures for the CUDA kernels (default 80 and 90).
* ``CUDA_HOME``                  the toolkit; otherwise the newest ``/usr/local/cuda-*``.
* ``MAX_JOBS``                   ninja's job cap; by default min(cores, RAM GiB / 4).
* ``VITKERN_EXTRA_CFLAGS``       extra flags for both compilers (the sanitizer build uses it).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc" / "vitkern"


def _log(msg: str) -> None:
    print(f"[vitkern setup] {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    """A CUDA toolkit root: has bin/nvcc and include/cuda_runtime.h."""

    def ok(home: str | Path | None) -> bool:
        return bool(home) and Path(home, "bin", "nvcc").exists() and Path(home, "include", "cuda_runtime.h").exists()

    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if ok(env) else None
    candidates = ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:  # may be a wrapper script: only trust it if it sits inside a toolkit
        candidates.insert(0, str(Path(nvcc).resolve().parent.parent))
    return next((c for c in candidates if ok(c)), None)


def _pip_cuda_include_dirs() -> list[str]:
    try:
        import nvidia  # the namespace package of the nvidia-* wheels that torch depends on
    except ImportError:
        return []
    dirs = []
    for root in getattr(nvidia, "__path__", []):
        dirs += sorted(str(p) for p in Path(root).glob("*/include") if p.is_dir())
    return dirs


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _default_max_jobs() -> None:
    if "MAX_JOBS" in os.environ:
        return
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8.0
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(mem_gib // 4))))


def _extensions():
    # The CUDA toolkit must be known before torch.utils.cpp_extension is imported:
    # it resolves CUDA_HOME once, at import time.
    want_cuda = not _flag("VITKERN_SKIP_CUDA_BUILD")
    cuda_home = _find_cuda_home() if want_cuda else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    archs = [a.strip() for a in os.environ.get("VITKERN_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(f"{a[:-1]}.{a[-1]}" for a in archs))
    _default_max_jobs()

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    use_cuda = bool(want_cuda and cuda_home and torch.version.cuda)
    if want_cuda and not use_cuda:
        why = "no nvcc found" if not cuda_home else f"torch {torch.__version__} is not a CUDA build"
        if _flag("VITKERN_FORCE_CUDA"):
            raise RuntimeError(f"VITKERN_FORCE_CUDA=1 but {why}")
        _log(f"building C++ only ({why}); set CUDA_HOME to build the CUDA kernels")

    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    extra = os.environ.get("VITKERN_EXTRA_CFLAGS", "").split()
    # -fopenmp: at::parallel_for is header code built on `#pragma omp parallel`;
    # without it the CPU kernels would silently run on one thread.
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-fvisibility=hidden", *omp, *extra]
    include_dirs = [str(CSRC)]
    if use_cuda:
        # The torch wheels' CUDA math libraries (cuBLAS, cuSPARSE, ...) ship their
        # headers in site-packages/nvidia/*/include; a bare toolkit may lack them.
        include_dirs += _pip_cuda_include_dirs()
        sources += sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        nvcc += [f"-Xcompiler={f}" for f in omp]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        _log(f"building C++ + CUDA with {cuda_home}, archs {archs}, MAX_JOBS={os.environ['MAX_JOBS']}")
        ext = CUDAExtension(
            "vitkern._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("VITKERN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=[*omp, *extra],
        )
    else:
        ext = CppExtension(
            "vitkern._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=[*omp, *extra],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
