"""Build of vitkern._C, the compiled extension: the C++ kernels of the ``cpu`` backend.

CUDA tensors run on the Triton kernels (or the reference path); there is no CUDA C++
code, so a build needs a C++17 compiler and torch, never nvcc.

Environment switches (read at build time):

* ``VITKERN_GENERIC_SIMD=1``  compile without the x86 AVX-512/AVX2 paths (portable scalar
                               loops only: what an aarch64 build gets; tested in CI).
* ``VITKERN_DEBUG=1``         keep debug info (``-g -O1``); release builds use ``-O3 -g0``
                               and a stripped link (the extension is ~1/30 the size).
* ``VITKERN_LOCAL_VERSION=1``  append ``+torch<major>.<minor>`` to the version of a wheel
                               (scripts/build_wheels.sh sets it: a release wheel only loads with
                               the torch minor release it was built against). Off by default, so
                               that installing the sdist (version 0.1.0) builds a 0.1.0 wheel.
* ``MAX_JOBS``                ninja's job cap; by default min(cores, RAM GiB / 4).
* ``VITKERN_EXTRA_CFLAGS``    extra compiler and linker flags (the sanitizer build uses it).

The build writes ``vitkern/_build_info.py`` (torch version, flags) next to the extension;
``vitkern._ext`` reads it to explain a torch mismatch instead of failing obscurely.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc" / "vitkern"
BASE_VERSION = "0.1.0"


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


def _building_sdist() -> bool:
    return "sdist" in sys.argv


def _build_info(torch) -> dict:
    return {
        "torch_version": torch.__version__,
        "torch_minor": _torch_minor(torch.__version__),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "generic_simd": _flag("VITKERN_GENERIC_SIMD"),
        "debug": _flag("VITKERN_DEBUG"),
    }


def _extensions():
    _default_max_jobs()
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    info = _build_info(torch)
    extra = os.environ.get("VITKERN_EXTRA_CFLAGS", "").split()
    # -fopenmp: at::parallel_for is header code built on `#pragma omp parallel`;
    # without it the CPU kernels would silently run on one thread.
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    if info["debug"]:
        opt, link = ["-O1", "-g"], []
    else:
        # Release: no DWARF (it was 28 of the 30 MB of _C), symbols stripped at link time.
        opt, link = ["-O3", "-g0"], (["-Wl,--strip-all"] if sys.platform.startswith("linux") else [])
    macros = [("VITKERN_GENERIC_SIMD", None)] if info["generic_simd"] else []
    cxx = [*opt, "-fvisibility=hidden", *omp, *extra]
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    ext = CppExtension(
        "vitkern._C",
        sources,
        include_dirs=[str(CSRC)],
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=[*omp, *link, *extra],
    )
    _log(
        f"building vitkern._C against torch {info['torch_version']} "
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

if _building_sdist():
    # The sdist builds against whatever torch is installed where it is built.
    version, torch_requirement = BASE_VERSION, "torch>=2.5"
else:
    # A wheel's _C is bound to the torch minor release it was compiled against (it
    # uses libtorch's C++ ABI, which changes between minor releases).
    local = _flag("VITKERN_LOCAL_VERSION")
    version = f"{BASE_VERSION}+torch{build_info['torch_minor']}" if local else BASE_VERSION
    torch_requirement = f"torch=={build_info['torch_minor']}.*"

setup(
    version=version,
    install_requires=[torch_requirement, "numpy", "triton>=3.0; platform_system == 'Linux'"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
