"""The per-backend implementation table behind each op's custom op.

Each computation (an op's forward and its backward) is one ``torch.library`` custom op that
takes the backend's name as its last argument and calls that backend's entry of the op's
table: one schema, one fake, one autograd registration per computation, however many
backends serve it. The reference path is not in the table: it is plain PyTorch, traced and
differentiated by PyTorch itself, and stays the readable definition of each op.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from vitkern import _backend


@dataclass(frozen=True)
class Kernels:
    """One backend's implementation of one op.

    ``forward`` and ``backward`` are the bodies of the op's forward and backward custom ops
    (their arguments are the custom ops' arguments without the trailing backend name). The
    dispatch rules are :func:`vitkern._backend.register_impl`'s: ``supports`` (the inputs it
    cannot run, beyond the backend row's devices and dtypes), ``auto_skip`` (inputs where
    ``auto`` should prefer the next backend, measured faster there), ``dtypes`` (when this op's
    kernel takes other input dtypes than the backend's default)."""

    forward: Callable
    backward: Callable
    supports: Callable[..., str | None] | None = None
    auto_skip: Callable[..., str | None] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None


def register_kernels(op: str, table: Mapping[str, Kernels], call: Callable) -> None:
    """Register ``call(backend, *args)`` (the op's entry into its custom op) as each table
    backend's implementation of ``op``, with that backend's dispatch rules."""
    for name, k in table.items():
        _backend.register_impl(op, name, functools.partial(call, name), k.supports, k.auto_skip, k.dtypes)


def kernels_of(table: Mapping[str, Kernels], backend: str) -> Kernels:
    """``table[backend]``, or a clear error for a backend that has no kernel for this op."""
    k = table.get(backend)
    if k is None:
        raise ValueError(f"backend must be one of {sorted(table)} for this custom op, got {backend!r}")
    return k
