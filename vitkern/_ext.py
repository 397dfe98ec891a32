"""Failure-tolerant loading of the compiled extension ``vitkern._C`` (done once, when
``vitkern`` is imported; later calls return the cached module).

``import vitkern`` never fails because of the extension: if ``_C`` is missing
or broken (built against another torch, say), one warning is emitted and the
``cpu``/``cuda`` backends report themselves unavailable with the reason, so
``auto`` takes the other backends.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

_state: dict[str, object] = {}


def load_extension() -> ModuleType | None:
    """Return ``vitkern._C`` or ``None`` (with the reason in :func:`extension_error`)."""
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    module: ModuleType | None = None
    error: str | None = None
    if os.environ.get("VITKERN_DISABLE_EXTENSION", "0") == "1":
        error = "disabled by VITKERN_DISABLE_EXTENSION=1"
    else:
        try:
            import torch  # noqa: F401  (the extension links against libtorch)

            module = importlib.import_module("vitkern._C")
        except Exception as exc:  # ImportError, OSError (undefined symbol), ...
            error = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                "vitkern: the compiled extension vitkern._C could not be loaded, so the 'cpu' and 'cuda' "
                "backends are off and the others are used instead. Reason: "
                f"{error}. See vitkern.available_backends() for details; reinstall with "
                "`pip install --no-build-isolation .` to rebuild it.",
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


def extension_has_cuda() -> bool:
    mod = load_extension()
    return bool(mod is not None and mod.with_cuda())
