"""Failure-tolerant loading of the compiled extension ``vitkern._C`` (done once, when
``vitkern`` is imported; later calls return the cached module).

``import vitkern`` never fails because of the extension: if ``_C`` is missing,
broken, or was built for another torch, one warning says why (naming the torch
it was built for and the one installed) and what the fallback costs, and the
``cpu`` backend reports itself unavailable with the reason, so ``auto`` takes
the reference path.

``_C`` uses libtorch's C++ ABI, which changes between torch minor releases, so
it is only imported when the installed torch has the minor release recorded at
build time (``vitkern/_build_info.py``). ``VITKERN_IGNORE_TORCH_VERSION=1``
tries anyway (for testing other torch releases; it may fail to load or crash).
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


def build_info() -> dict | None:
    """What ``_C`` was built with (torch version, flags), or ``None`` without a build."""
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
    return f"torch {info['torch_version']}, Python {info['python']}, {kind}, {'debug' if info['debug'] else 'release'}"


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def torch_mismatch() -> str | None:
    """Why the installed torch cannot load ``_C`` (another minor release), else ``None``."""
    import torch

    info = build_info()
    if info is None or _minor(info["torch_version"]) == _minor(torch.__version__):
        return None
    return (
        f"vitkern._C was built for torch {info['torch_version']} (it needs torch=={info['torch_minor']}.*) "
        f"but torch {torch.__version__} is installed"
    )


def load_extension() -> ModuleType | None:
    """Return ``vitkern._C`` or ``None`` (with the reason in :func:`extension_error`)."""
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    module: ModuleType | None = None
    error: str | None = None
    if os.environ.get("VITKERN_DISABLE_EXTENSION", "0") == "1":
        error = "disabled by VITKERN_DISABLE_EXTENSION=1"
    else:
        import torch  # noqa: F401  (the extension links against libtorch)

        mismatch = torch_mismatch()
        if mismatch is not None and os.environ.get("VITKERN_IGNORE_TORCH_VERSION", "0") != "1":
            error = (
                f"{mismatch}. Install the vitkern wheel built for your torch (its version ends in "
                f"+torch{_minor(torch.__version__)}) or build from source: "
                "`pip install --no-build-isolation --no-binary vitkern vitkern`"
            )
        else:
            try:
                module = importlib.import_module("vitkern._C")
            except Exception as exc:  # ImportError, OSError (undefined symbol), ...
                error = f"{type(exc).__name__}: {exc}"
                info = build_info()
                if info is not None:
                    error += f" (built for torch {info['torch_version']}, installed torch {torch.__version__})"
                if mismatch is not None:
                    error += f"; {mismatch}"
        if error is not None:
            warnings.warn(
                "vitkern: the compiled extension vitkern._C could not be loaded, so the 'cpu' backend is off; "
                f"{FALLBACK_COST}. Reason: {error}. See vitkern.available_backends() for details.",
                RuntimeWarning,
                stacklevel=3,
            )
    _state["module"] = module
    _state["error"] = error
    return module


def extension_error() -> str | None:
    """Why ``_C`` is unavailable, or ``None`` when it loaded."""
    load_extension()
    return _state["error"]  # type: ignore[return-value]
