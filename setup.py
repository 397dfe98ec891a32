"""Build of vitkern._C, the compiled extension: the C++ kernels of the ``cpu`` backend.

CUDA tensors run on the Triton kernels (or the reference path); there is no CUDA C++
code, so a build needs a C++17 compiler and torch, never nvcc.

_C is built against the LibTorch stable ABI (torch/csrc/stable, torch/headeronly) with
``TORCH_TARGET_VERSION`` set to ``TORCH_FLOOR``, and against Python's limited API
(``Py_LIMITED_API`` 3.10): one binary loads with every torch >= TORCH_FLOOR and every
CPython >= 3.10, so a wheel is tagged ``cp310-abi3`` and requires ``torch>=TORCH_FLOOR``.
Building needs torch >= TORCH_FLOOR installed (its headers and libraries).

Environment switches (read at build time):

* ``VITKERN_GENERIC_SIMD=1``  compile without the x86 AVX-512/AVX2 paths (portable scalar
                               loops only: what an aarch64 build gets; tested in CI).
* ``VITKERN_DEBUG=1``         keep debug info (``-g -O1``); release builds use ``-O3 -g0``
                               and a stripped link (the extension is ~1/30 the size).
* ``MAX_JOBS``                ninja's job cap; by default min(cores, RAM GiB / 4).
* ``VITKERN_EXTRA_CFLAGS``    extra compiler and linker flags (the sanitizer build uses it).

The build writes ``vitkern/_build_info.py`` (torch version, flags) next to the extension;
``vitkern._ext`` and ``vitkern info`` read it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc" / "vitkern"
BASE_VERSION = "0.1.0"
# The oldest torch whose stable ABI has everything csrc/ uses (parallel_for, get_num_threads,
# empty, from_blob, to, contiguous, view, sum, std::string/std::vector arguments: 2.10).
TORCH_FLOOR = (2, 10)


def _log(msg: str) -> None:
    print(f"[vitkern setup] {msg}", file=sys.stderr)


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).lower() in ("1", "true", "yes", "on")


def _default_max_jobs() -> None:
    if "MAX_JOBS" in os.environ:
        return
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8.0
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(mem_gib // 4))))


def _torch_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _floor_str() -> str:
    return f"{TORCH_FLOOR[0]}.{TORCH_FLOOR[1]}"


def _build_info(torch) -> dict:
    return {
        "torch_version": torch.__version__,
        "torch_minor": _torch_minor(torch.__version__),
        "torch_floor": _floor_str(),
        "abi": f"LibTorch stable ABI (torch>={_floor_str()}), Python limited API (abi3, CPython>=3.10)",
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "generic_simd": _flag("VITKERN_GENERIC_SIMD"),
        "debug": _flag("VITKERN_DEBUG"),
    }


def _extensions():
    _default_max_jobs()
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    info = _build_info(torch)
    built = tuple(int(p) for p in info["torch_minor"].split("."))
    if built < TORCH_FLOOR:
        raise RuntimeError(
            f"building vitkern._C needs torch>={_floor_str()} (its LibTorch stable ABI headers); "
            f"torch {torch.__version__} is installed"
        )
    extra = os.environ.get("VITKERN_EXTRA_CFLAGS", "").split()
    # Threads come from torch's own pool (torch::stable::parallel_for), so _C needs no
    # OpenMP runtime: -fopenmp-simd only honours the `#pragma omp simd` loop hints.
    omp = ["-fopenmp-simd"]
    if info["debug"]:
        opt, link = ["-O1", "-g"], []
    else:
        # Release: no DWARF (it was 28 of the 30 MB of _C), symbols stripped at link time.
        opt, link = ["-O3", "-g0"], (["-Wl,--strip-all"] if sys.platform.startswith("linux") else [])
    # Keep only the libraries _C uses in DT_NEEDED (libtorch_cpu.so: the C shim and sgemm_).
    link = [*link, "-Wl,--as-needed"] if sys.platform.startswith("linux") else link
    target = f"0x{TORCH_FLOOR[0]:02x}{TORCH_FLOOR[1]:02x}000000000000"
    macros = [("TORCH_TARGET_VERSION", target)]
    macros += [("VITKERN_GENERIC_SIMD", None)] if info["generic_simd"] else []
    cxx = [*opt, "-fvisibility=hidden", *omp, *extra]
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    ext = CppExtension(
        "vitkern._C",
        sources,
        include_dirs=[str(CSRC)],
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=[*link, *extra],
        # torch's BuildExtension adds -DPy_LIMITED_API=0x030A0000 for this and links no
        # libtorch_python; setuptools names the file _C.abi3.so.
        py_limited_api=True,
    )
    _log(
        f"building vitkern._C against torch {info['torch_version']} (stable ABI floor {_floor_str()}, abi3) "
        f"({'generic' if info['generic_simd'] else 'x86 SIMD'} paths, {'debug' if info['debug'] else 'release'}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']})"
    )

    class build_ext(BuildExtension.with_options(use_ninja=True)):  # noqa: N801 (setuptools command name)
        """Also writes vitkern/_build_info.py next to the extension."""

        def run(self):
            super().run()
            text = (
                f'"""Written by setup.py when vitkern._C was built; read by vitkern._ext."""\n\nBUILD_INFO = {info!r}\n'
            )
            targets = [ROOT / "vitkern"] if self.inplace else [Path(self.build_lib) / "vitkern"]
            for d in targets:
                d.mkdir(parents=True, exist_ok=True)
                (d / "_build_info.py").write_text(text)

    return [ext], {"build_ext": build_ext}, info


ext_modules, cmdclass, build_info = _extensions()

# One requirement for the sdist and every wheel: _C uses only the stable ABI of TORCH_FLOOR.
torch_requirement = f"torch>={_floor_str()}"

setup(
    version=BASE_VERSION,
    install_requires=[torch_requirement, "numpy", "triton>=3.0; platform_system == 'Linux'"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # The wheel tag: cp310-abi3 (the extension uses Python's limited API 3.10).
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
