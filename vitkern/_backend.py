"""Backends: the one table that declares them, selection, and a record of what ran.

:data:`BACKEND_TABLE` declares every backend once (name, devices, dtypes, limits,
availability probe, where ``auto`` tries it); dispatch, ``vitkern info``, the
benchmark suite, ``vitkern selftest`` and the tests all read it.

Precedence, highest first: an explicit ``backend=`` argument other than
``"auto"``; the innermost :func:`use_backend` context; the ``VITKERN_BACKEND``
environment variable (read at call time); ``"auto"``.

``"auto"`` tries the backends whose ``auto`` field ranks the inputs' device type,
lowest rank first (CUDA tensors: ``triton`` → ``reference``; CPU tensors: ``cpu`` →
``reference``), taking the first that is available and supports the inputs. An
explicitly requested backend that cannot run the inputs raises
:class:`BackendError`; ``auto`` never falls back silently: every skipped backend
and its reason is kept in :func:`backend_report`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from vitkern._ext import extension_error, load_extension

_HALF_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)
_ALL_FLOATS = (*_HALF_AND_SINGLE, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Backend:
    """One backend, declared once (xformers' per-operator ``SUPPORTED_*`` fields are the model).

    An op's implementation may narrow or widen ``dtypes`` and add shape limits of its own
    (:func:`register_impl`'s ``dtypes`` and ``supports``)."""

    name: str
    # Device types of the tensors its kernels take; () means any device.
    devices: tuple[str, ...]
    # Input dtypes its kernels take by default, and why the others go elsewhere.
    dtypes: tuple[torch.dtype, ...]
    dtype_note: str
    # Where "auto" tries it: device type ("*": any) -> rank; "auto" tries the lowest rank first.
    auto: Mapping[str, int]
    # None when it can run on this machine, else why not. Called at dispatch time, so it
    # must be cheap and traceable by torch.compile (no import, no module lookup).
    probe: Callable[[], str | None]
    # Human-readable limits beyond devices and dtypes (shown by `vitkern info`).
    limits: str = ""
    # An environment variable that, set to "1", lets it run CPU tensors (Triton's interpreter).
    cpu_env: str | None = None

    def status(self) -> str | None:
        """``None`` if this backend is usable on this machine, else why not."""
        return self.probe()

    def runs_on(self, device_type: str) -> bool:
        """Whether its kernels take tensors of ``device_type`` in this process."""
        if not self.devices or device_type in self.devices:
            return True
        return device_type == "cpu" and self.cpu_env is not None and os.environ.get(self.cpu_env, "0") == "1"

    def device_reason(self, device: torch.device) -> str | None:
        if self.runs_on(device.type):
            return None
        need = " or ".join(d.upper() for d in self.devices)
        return f"inputs are on {device}, the {self.name} backend needs {need} tensors"

    def dtype_reason(self, dtype: torch.dtype, dtypes: tuple[torch.dtype, ...] | None = None) -> str | None:
        if dtype in (self.dtypes if dtypes is None else dtypes):
            return None
        return f"{_dtype_name(dtype)} {self.dtype_note}"


# Probed once, at import: the dispatch below runs inside torch.compile's trace, where an
# import or a module-spec lookup cannot be traced (fullgraph=True fails on it).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_probe() -> str | None:
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU interpreter)"


def _cpu_probe() -> str | None:
    if load_extension() is None:
        return f"vitkern._C is not available ({extension_error()})"
    return None


BACKEND_TABLE: tuple[Backend, ...] = (
    Backend(
        name="reference",
        devices=(),
        dtypes=_ALL_FLOATS,
        dtype_note="is not supported",
        auto={"*": 9},  # the last resort on every device
        probe=lambda: None,
        limits="plain PyTorch, the definition of every op; half inputs are computed in fp32 where the op says so",
    ),
    Backend(
        name="triton",
        devices=("cuda",),
        dtypes=_HALF_AND_SINGLE,
        dtype_note="is not supported by the Triton kernels (reference path)",
        auto={"cuda": 0},
        probe=_triton_probe,
        limits="sp_attention head_dim 8..128; layernorm_mlp dim up to the LayerNorm kernels' MAX_DIM",
        cpu_env="TRITON_INTERPRET",
    ),
    Backend(
        name="cpu",
        devices=("cpu",),
        dtypes=_HALF_AND_SINGLE,
        dtype_note="runs on the reference path (the cpu kernel computes in fp32)",
        auto={"cpu": 0},
        probe=_cpu_probe,
        limits="C++ kernels of vitkern._C, fp32 compute; auto prefers torch's GEMMs for half-precision GEMM ops "
        "on CPUs with bf16/fp16 GEMM hardware",
    ),
)
_TABLE = {b.name: b for b in BACKEND_TABLE}
BACKENDS: tuple[str, ...] = tuple(_TABLE)
_VALID = ("auto", *BACKENDS)


def _auto_order(device_type: str) -> tuple[str, ...]:
    ranked = [(b.auto.get(device_type, b.auto.get("*")), i, b.name) for i, b in enumerate(BACKEND_TABLE)]
    return tuple(name for rank, _, name in sorted(r for r in ranked if r[0] is not None))


# Computed once (the dispatch below runs inside torch.compile's trace); other device types
# get "reference" alone unless a backend names them.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {d: _auto_order(d) for d in ("cpu", "cuda", "*")}


def auto_order(device_type: str) -> tuple[str, ...]:
    """The backends ``auto`` tries, in order, for tensors of ``device_type``."""
    return _AUTO_ORDER.get(device_type, _AUTO_ORDER["*"])


def get_backend(name: str) -> Backend:
    """The :class:`Backend` row named ``name``."""
    if name not in _TABLE:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    return _TABLE[name]


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


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    # Returns None when the implementation can run the inputs, else the reason.
    supports: Callable[..., str | None] | None = None
    # Consulted by "auto" only: a reason to prefer the next backend although this one
    # can run the inputs (it was measured slower there). An explicit request still runs it.
    auto_skip: Callable[..., str | None] | None = None
    # The input dtypes this op's kernel takes when they differ from the backend's default.
    dtypes: tuple[torch.dtype, ...] | None = None


_REGISTRY: dict[str, dict[str, _Impl]] = {}


def register_impl(
    op: str,
    backend: str,
    fn: Callable,
    supports: Callable[..., str | None] | None = None,
    auto_skip: Callable[..., str | None] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``.

    ``fn`` takes the op's normalised arguments, the first being its main input tensor (whose
    device and dtype are checked against the backend's row); ``supports`` adds the op's own
    limits, ``auto_skip`` where ``auto`` should prefer the next backend, ``dtypes`` overrides
    the backend's default input dtypes for this op."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, supports, auto_skip, dtypes)


def ops_of(backend: str) -> list[str]:
    """The ops ``backend`` has an implementation of."""
    return sorted(op for op, impls in _REGISTRY.items() if backend in impls)


def backend_status(name: str) -> str | None:
    """``None`` if backend ``name`` is usable on this machine, else why not."""
    if _check_name(name) == "auto":
        return None
    return _TABLE[name].status()


def available_backends() -> dict[str, str | None]:
    """Every backend name mapped to ``None`` (usable here) or the reason it is not."""
    return {b.name: b.status() for b in BACKEND_TABLE}


def usable_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run tensors on ``device`` in this process, in table order."""
    device_type = torch.device(device).type
    return [b.name for b in BACKEND_TABLE if b.status() is None and b.runs_on(device_type)]


def _reason(op: str, backend: str, device: torch.device, args: tuple, kwargs: dict) -> str | None:
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return f"no {backend} kernel for {op} in this version"
    row = _TABLE[backend]
    reason = row.status() or row.device_reason(device)
    if reason is None and args and isinstance(args[0], torch.Tensor):
        reason = row.dtype_reason(args[0].dtype, impl.dtypes)
    if reason is None and impl.supports is not None:
        reason = impl.supports(*args, **kwargs)
    return reason


def not_supported_reason(op: str, backend: str, *args, **kwargs) -> str | None:
    """``None`` if ``backend`` can run ``vitkern.ops.<op>`` on these arguments here, else why not.

    ``args``/``kwargs`` are the op's normalised arguments as its implementations take them (the
    first one, the main input tensor, gives the device and dtype checked against the backend's
    row). Checked in order: an implementation exists, the backend is available, the device, the
    dtype, the op's own limits."""
    get_backend(backend)
    device = args[0].device if args and isinstance(args[0], torch.Tensor) else torch.device("cpu")
    return _reason(op, backend, device, args, kwargs)


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
        reason = _reason(op, requested, device, args, kwargs)
        if reason is not None:
            raise BackendError(f"backend={requested!r} cannot run vitkern.ops.{op}: {reason}")
        chosen = requested
    else:
        chosen = ""
        for name in auto_order(device.type):
            reason = _reason(op, name, device, args, kwargs)
            impl = _REGISTRY.get(op, {}).get(name)
            if reason is None and impl is not None and impl.auto_skip is not None:
                reason = impl.auto_skip(*args, **kwargs)
            if reason is None:
                chosen = name
                break
            skipped[name] = reason
        if not chosen:  # pragma: no cover - reference is registered for every op
            raise BackendError(f"no backend can run vitkern.ops.{op}: {skipped}")
    record_choice(op, chosen, requested, skipped)
    return _REGISTRY[op][chosen].fn


def record_choice(op: str, backend: str, requested: str | None = None, skipped: dict[str, str] | None = None) -> None:
    """Record that ``backend`` ran ``op`` (``select`` does; so does a caller that runs a kernel
    without it, the models' one-call inference block), for ``last_backend`` / ``backend_report``."""
    if not torch.compiler.is_compiling():
        req = requested if requested is not None else requested_backend()
        _records()[op] = DispatchRecord(op, req, backend, dict(skipped or {}))
        _local.last_op = op


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
