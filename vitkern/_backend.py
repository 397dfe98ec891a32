"""Backend selection: which implementation of an op runs, and a record of it.

Precedence, highest first: an explicit ``backend=`` argument other than
``"auto"``; the innermost :func:`use_backend` context; the ``VITKERN_BACKEND``
environment variable (read at call time); ``"auto"``.

``"auto"`` tries, in order, ``triton`` → ``reference`` for CUDA
tensors and ``cpu`` → ``reference`` for CPU tensors, taking the first backend
that is available and supports the inputs. An explicitly requested backend
that cannot run the inputs raises :class:`BackendError`; ``auto`` never falls
back silently: every skipped backend and its reason is kept in
:func:`backend_report`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from vitkern._ext import extension_error, load_extension

BACKENDS: tuple[str, ...] = ("reference", "triton", "cpu")
_VALID = ("auto", *BACKENDS)
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}

_context: contextvars.ContextVar[str | None] = contextvars.ContextVar("vitkern_backend", default=None)
_local = threading.local()


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


def _check_name(name: object, argname: str = "backend") -> str:
    if not isinstance(name, str) or name not in _VALID:
        raise ValueError(f"{argname} must be one of {list(_VALID)}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the vitkern ops inside the block on backend ``name`` (or ``"auto"``).

    Example::

        with vitkern.use_backend("reference"):
            logits = model(images)
    """
    token = _context.set(_check_name(name))
    try:
        yield
    finally:
        _context.reset(token)


def requested_backend(arg: str | None = "auto") -> str:
    """The backend a call with ``backend=arg`` asks for, after context and env var."""
    if arg is not None and _check_name(arg) != "auto":
        return arg
    ctx = _context.get()
    if ctx is not None and ctx != "auto":
        return ctx
    env = os.environ.get("VITKERN_BACKEND", "").strip()
    if env:
        return _check_name(env, "VITKERN_BACKEND")
    return "auto"


# ----------------------------------------------------------------------------- registry


@dataclass
class _Impl:
    fn: Callable
    # Returns None when the implementation can run the inputs, else the reason.
    supports: Callable[..., str | None] | None = None
    # Consulted by "auto" only: a reason to prefer the next backend although this one
    # can run the inputs (it was measured slower there). An explicit request still runs it.
    auto_skip: Callable[..., str | None] | None = None


_REGISTRY: dict[str, dict[str, _Impl]] = {}


def register_impl(
    op: str,
    backend: str,
    fn: Callable,
    supports: Callable[..., str | None] | None = None,
    auto_skip: Callable[..., str | None] | None = None,
) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, supports, auto_skip)


# Probed once, at import: the dispatch below runs inside torch.compile's trace, where an
# import or a module-spec lookup cannot be traced (fullgraph=True fails on it).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_status() -> str | None:
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU interpreter)"


def backend_status(name: str) -> str | None:
    """``None`` if backend ``name`` is usable on this machine, else why not."""
    _check_name(name)
    if name in ("auto", "reference"):
        return None
    if name == "triton":
        return _triton_status()
    if load_extension() is None:
        return f"vitkern._C is not available ({extension_error()})"
    return None


def available_backends() -> dict[str, str | None]:
    """Every backend name mapped to ``None`` (usable here) or the reason it is not."""
    return {name: backend_status(name) for name in BACKENDS}


def _why_not(op: str, backend: str, device: torch.device, args: tuple, kwargs: dict) -> str | None:
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return f"no {backend} kernel for {op} in this version"
    status = backend_status(backend)
    if status is not None:
        return status
    if backend == "cpu" and device.type != "cpu":
        return f"inputs are on {device}, the cpu backend needs CPU tensors"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"inputs are on {device}, the {backend} backend needs CUDA tensors"
    if impl.supports is not None:
        return impl.supports(*args, **kwargs)
    return None


@dataclass
class DispatchRecord:
    """What ran for one op call: the backend and why others were skipped."""

    op: str
    requested: str
    backend: str
    skipped: dict[str, str] = field(default_factory=dict)


def _records() -> dict[str, DispatchRecord]:
    if not hasattr(_local, "records"):
        _local.records = {}
        _local.last_op = None
    return _local.records


def select(op: str, backend: str | None, device: torch.device, *args, **kwargs) -> Callable:
    """Pick the implementation of ``op`` for inputs on ``device``; record the choice.

    ``args``/``kwargs`` are passed to the implementation's ``supports`` check.
    """
    requested = requested_backend(backend)
    skipped: dict[str, str] = {}
    if requested != "auto":
        reason = _why_not(op, requested, device, args, kwargs)
        if reason is not None:
            raise BackendError(f"backend={requested!r} cannot run vitkern.ops.{op}: {reason}")
        chosen = requested
    else:
        chosen = ""
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            reason = _why_not(op, name, device, args, kwargs)
            impl = _REGISTRY.get(op, {}).get(name)
            if reason is None and impl is not None and impl.auto_skip is not None:
                reason = impl.auto_skip(*args, **kwargs)
            if reason is None:
                chosen = name
                break
            skipped[name] = reason
        if not chosen:  # pragma: no cover - reference is registered for every op
            raise BackendError(f"no backend can run vitkern.ops.{op}: {skipped}")
    if not torch.compiler.is_compiling():
        _records()[op] = DispatchRecord(op, requested, chosen, skipped)
        _local.last_op = op
    return _REGISTRY[op][chosen].fn


def last_backend(op: str | None = None) -> str | None:
    """Name of the backend that ran the last call of ``op`` (or of any op) in this thread."""
    records = _records()
    key = op if op is not None else _local.last_op
    rec = records.get(key) if key is not None else None
    return rec.backend if rec is not None else None


def backend_report() -> dict[str, DispatchRecord]:
    """The last dispatch decision per op in this thread, with skipped backends and reasons."""
    return dict(_records())


# Load vitkern._C now (cheap: torch is imported already) rather than on the first op call, so
# that torch.compile(model, fullgraph=True) as a process's first call traces no import.
load_extension()
