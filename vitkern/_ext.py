"""Failure-tolerant loading of the compiled extension ``vitkern._C`` (done once, when
``vitkern`` is imported; later calls return the cached handle).

``_C`` is built against the LibTorch stable ABI with a floor (``TORCH_TARGET_VERSION``,
recorded in ``vitkern/_build_info.py`` as ``torch_floor``) and against Python's limited
API, so one build loads with every torch >= the floor and every CPython >= 3.10.
Importing ``vitkern._C`` registers its operators with torch's dispatcher as
``torch.ops.vitkern_C.*``; :func:`load_extension` returns a :class:`CompiledExtension`
through which the launchers call them (``load_extension().sp_attention_forward(...)``).

``import vitkern`` never fails because of the extension: if ``_C`` is missing, broken,
or the installed torch is older than the floor, one warning says why (naming the
torch version needed and the one installed) and what the fallback costs, and the
``cpu`` backend reports itself unavailable with the reason, so ``auto`` takes the
reference path. Below the floor ``_C`` is not imported (its C-shim symbols would not
resolve); ``VITKERN_IGNORE_TORCH_VERSION=1`` tries anyway (for testing; it may fail to
load).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

_state: dict[str, object] = {}

# What the fallback costs, measured (benchmarks/NOTES.md, CPU): the reference path is
# plain PyTorch, about as fast as timm eager on plain ViT blocks but about 1.4-2x slower
# on SP-ViT attention (the dense prior is materialised), with more activation memory.
FALLBACK_COST = (
    "the reference (plain PyTorch) path runs instead: about as fast on plain ViT layers, "
    "about 1.4-2x slower on SP-ViT attention on CPU, with more memory"
)

# The operator namespace of _C (not ``vitkern``: the Python custom ops live there).
OPS_NAMESPACE = "vitkern_C"


class CompiledExtension:
    """``vitkern._C`` as the launchers use it: ``simd_paths()``, ``blas_backend()`` and the
    build facts come from the Python module, every other attribute is the operator
    ``torch.ops.vitkern_C.<name>.default`` (looked up once, then cached)."""

    def __init__(self, module: ModuleType):
        self.module = module
        self.__file__ = module.__file__
        self.ops_namespace = getattr(module, "OPS_NAMESPACE", OPS_NAMESPACE)
        self.torch_floor = getattr(module, "TORCH_FLOOR", None)
        self.built_with_torch = getattr(module, "BUILT_WITH_TORCH", None)

    def simd_paths(self) -> str:
        return self.module.simd_paths()

    def blas_backend(self) -> str:
        return self.module.blas_backend()

    def gemm_route(self) -> str:
        return self.module.gemm_route()

    def packed_gemm_active(self) -> bool:
        return bool(self.module.packed_gemm_active())

    def bf16_gemm_active(self) -> bool:
        f = getattr(self.module, "bf16_gemm_active", None)  # (absent from an older build)
        return bool(f()) if f is not None else False

    def abi(self) -> str:
        """One line: which ABIs the binary uses, for ``vitkern info``."""
        limited = getattr(self.module, "PY_LIMITED_API", 0)
        return (
            f"LibTorch stable ABI (torch>={self.torch_floor}, built with torch {self.built_with_torch}), "
            f"Python limited API {limited >> 24}.{(limited >> 16) & 0xFF} (abi3); "
            f"operators torch.ops.{self.ops_namespace}.*"
        )

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        import torch

        try:
            op = getattr(getattr(torch.ops, self.ops_namespace), name).default
        except (AttributeError, RuntimeError) as exc:
            raise AttributeError(f"vitkern._C has no operator {self.ops_namespace}::{name}") from exc
        setattr(self, name, op)  # next time a plain attribute
        return op


def build_info() -> dict | None:
    """What ``_C`` was built with (torch version, floor, flags), or ``None`` without a build."""
    try:
        from vitkern._build_info import BUILD_INFO
    except ImportError:
        return None
    return dict(BUILD_INFO)


def build_info_line() -> str:
    info = build_info()
    if info is None:
        return "no build record (vitkern/_build_info.py is missing)"
    kind = "generic (no x86 SIMD)" if info.get("generic_simd") else "x86 SIMD"
    floor = info.get("torch_floor")
    abi = f"loads with torch>={floor} (stable ABI), CPython>=3.10 (abi3)" if floor else "no ABI record"
    return (
        f"built with torch {info['torch_version']} on Python {info['python']}; {abi}; {kind}, "
        f"{'debug' if info['debug'] else 'release'}"
    )


def _version_tuple(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    nums = []
    for p in parts[:2]:
        digits = "".join(c for c in p if c.isdigit()) or "0"
        nums.append(int(digits))
    return (nums[0], nums[1] if len(nums) > 1 else 0)


def torch_below_floor() -> str | None:
    """Why the installed torch cannot load ``_C`` (older than its stable-ABI floor), else ``None``."""
    import torch

    info = build_info()
    floor = info.get("torch_floor") if info else None
    if floor is None or _version_tuple(torch.__version__) >= _version_tuple(floor):
        return None
    return (
        f"vitkern._C needs torch>={floor} (it uses the LibTorch stable ABI of torch {floor}) "
        f"but torch {torch.__version__} is installed"
    )


def load_extension() -> CompiledExtension | None:
    """Return the loaded ``vitkern._C`` or ``None`` (with the reason in :func:`extension_error`)."""
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    ext: CompiledExtension | None = None
    error: str | None = None
    if os.environ.get("VITKERN_DISABLE_EXTENSION", "0") == "1":
        error = "disabled by VITKERN_DISABLE_EXTENSION=1"
    else:
        import torch  # noqa: F401  (_C resolves its symbols in the already loaded libtorch)

        too_old = torch_below_floor()
        if too_old is not None and os.environ.get("VITKERN_IGNORE_TORCH_VERSION", "0") != "1":
            error = f"{too_old}. Upgrade torch (`pip install 'torch>={build_info()['torch_floor']}'`)"
        else:
            try:
                ext = CompiledExtension(importlib.import_module("vitkern._C"))
                ext.spatial_prior_forward  # noqa: B018  (the operators were registered)
            except Exception as exc:  # ImportError, OSError (undefined symbol), AttributeError ...
                ext = None
                error = f"{type(exc).__name__}: {exc}"
                info = build_info()
                if info is not None:
                    error += f" (built with torch {info['torch_version']}, installed torch {torch.__version__})"
                if too_old is not None:
                    error += f"; {too_old}"
        if error is not None:
            warnings.warn(
                "vitkern: the compiled extension vitkern._C could not be loaded, so the 'cpu' backend is off; "
                f"{FALLBACK_COST}. Reason: {error}. See vitkern.available_backends() for details.",
                RuntimeWarning,
                stacklevel=3,
            )
    for var, values, fallback in _SWITCHES:
        value = os.environ.get(var, "")
        if ext is not None and value not in values:
            warnings.warn(
                f"vitkern: {var}={value!r} is not one of {', '.join(repr(c) for c in values if c)}; "
                f"the cpu kernels ignore it and {fallback}",
                RuntimeWarning,
                stacklevel=3,
            )
    _state["module"] = ext
    _state["error"] = error
    return ext


# The run-time switches the extension reads, their values and what an unknown value means:
# VITKERN_SIMD caps the SIMD path (csrc/vitkern/simd.h, simd_cap), VITKERN_GEMM picks the weight
# GEMMs' route (csrc/vitkern/gemm.cpp, gemm_env).
_SWITCHES = (
    ("VITKERN_SIMD", ("", "avx512", "avx2", "scalar"), "take the best SIMD path the CPU has"),
    ("VITKERN_GEMM", ("", "auto", "blas", "vitkern"), "pick the weight GEMM route for this CPU"),
)


def extension_error() -> str | None:
    """Why ``_C`` is unavailable, or ``None`` when it loaded."""
    load_extension()
    return _state["error"]  # type: ignore[return-value]
