"""The spatial prior of SP-SA: a per-head relative-offset table and its dense form.

``omega`` has shape (H, 2*gh-1, 2*gw-1) with ``omega[h, dy+gh-1, dx+gw-1]`` the
factor for a key that sits ``dy`` rows below and ``dx`` columns right of the
query (docs/DESIGN.md §1.2). :func:`spatial_prior_matrix` expands it to the dense
(H, N, N) matrix, N = num_prefix_tokens + gh*gw, with factor 1 for any pair
that involves a prefix token. The fused attention kernels never build this
matrix; it exists for the reference path, tests and attention-map inspection.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from vitkern import _backend
from vitkern._ext import load_extension
from vitkern.ops._kernels import Kernels, kernels_of, register_kernels
from vitkern.ops._validate import check_int, check_tensor

__all__ = ["resolve_grid", "relative_index", "spatial_prior_matrix", "spatial_prior_reference"]


def resolve_grid(
    num_tokens: int, num_prefix_tokens: int, omega: torch.Tensor | None, grid: tuple[int, int] | None
) -> tuple[int, int] | None:
    """The (gh, gw) patch grid implied by the arguments, checked for consistency.

    Priority: ``grid`` if given, else the omega table's shape, else a square grid
    (only when N - num_prefix_tokens is a perfect square). Returns ``None`` when no
    grid is needed (``omega is None`` and ``grid is None``).
    """
    check_int("num_prefix_tokens", num_prefix_tokens, 0)
    if grid is not None:
        if (
            not isinstance(grid, (tuple, list))
            or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
        ):
            raise TypeError(f"grid must be a pair of ints (gh, gw), got {grid!r}")
        gh, gw = int(grid[0]), int(grid[1])
        if gh < 1 or gw < 1:
            raise ValueError(f"grid must be positive, got {tuple(grid)}")
    elif omega is not None:
        if omega.dim() != 3 or omega.shape[1] % 2 == 0 or omega.shape[2] % 2 == 0:
            raise ValueError(f"omega must have shape (H, 2*gh-1, 2*gw-1) with odd sizes, got {tuple(omega.shape)}")
        gh, gw = (omega.shape[1] + 1) // 2, (omega.shape[2] + 1) // 2
    else:
        return None
    if num_prefix_tokens + gh * gw != num_tokens:
        raise ValueError(
            f"grid {(gh, gw)} with num_prefix_tokens={num_prefix_tokens} implies "
            f"N = {num_prefix_tokens + gh * gw} tokens, but the inputs have N = {num_tokens}"
        )
    if omega is not None and tuple(omega.shape[1:]) != (2 * gh - 1, 2 * gw - 1):
        raise ValueError(
            f"omega must have shape (H, {2 * gh - 1}, {2 * gw - 1}) for grid {(gh, gw)}, got {tuple(omega.shape)}"
        )
    return gh, gw


def square_grid(num_patches: int) -> tuple[int, int]:
    g = math.isqrt(num_patches)
    if g * g != num_patches:
        raise ValueError(f"cannot infer a square grid from {num_patches} patch tokens; pass grid=(gh, gw)")
    return g, g


def _relative_index(gh: int, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    ry = rows[None, :] - rows[:, None] + gh - 1  # key row - query row
    rx = cols[None, :] - cols[:, None] + gw - 1  # key col - query col
    return ry, rx


_relative_index_cpu = lru_cache(maxsize=64)(_relative_index)


def relative_index(gh: int, gw: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(ry, rx), each (gh*gw, gh*gw): the omega table index of every (query, key) patch pair."""
    # Cached in eager mode; under torch.compile the index is traced (and folded) directly.
    ry, rx = _relative_index(gh, gw) if torch.compiler.is_compiling() else _relative_index_cpu(gh, gw)
    return ry.to(device), rx.to(device)


def spatial_prior_reference(omega: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Plain-PyTorch dense prior (H, N, N) by gathering the table; differentiable."""
    gh, gw = grid
    ry, rx = relative_index(gh, gw, omega.device)
    prior = omega[:, ry, rx]
    if num_prefix_tokens:
        prior = F.pad(prior, (num_prefix_tokens, 0, num_prefix_tokens, 0), value=1.0)
    return prior


_backend.register_impl("spatial_prior", "reference", spatial_prior_reference)


# ----------------------------------------------------------------------------- kernels per backend
# forward(omega, gh, gw, num_prefix) -> (H, N, N); backward(grad (H, N, N), gh, gw, num_prefix)
# -> d omega (H, 2gh-1, 2gw-1). The cpu kernels are a gather and its scatter-add (any float
# dtype, float64 included); CUDA tensors take the reference gather.
def _cpu_forward(omega, gh, gw, num_prefix):
    return load_extension().spatial_prior_forward(omega, gh, gw, num_prefix)


def _cpu_backward(grad, gh, gw, num_prefix):
    return load_extension().spatial_prior_backward(grad, gh, gw, num_prefix)


_KERNELS: dict[str, Kernels] = {
    "cpu": Kernels(_cpu_forward, _cpu_backward, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64)),
}


# ----------------------------------------------------------------------------- the custom ops
@torch.library.custom_op("vitkern::spatial_prior", mutates_args=())
def _spatial_prior_op(omega: torch.Tensor, gh: int, gw: int, num_prefix: int, backend: str) -> torch.Tensor:
    return kernels_of(_KERNELS, backend).forward(omega, gh, gw, num_prefix)


@_spatial_prior_op.register_fake
def _(omega, gh, gw, num_prefix, backend):
    n = num_prefix + gh * gw
    return omega.new_empty((omega.shape[0], n, n))


@torch.library.custom_op("vitkern::spatial_prior_backward", mutates_args=())
def _spatial_prior_backward_op(grad: torch.Tensor, gh: int, gw: int, num_prefix: int, backend: str) -> torch.Tensor:
    return kernels_of(_KERNELS, backend).backward(grad, gh, gw, num_prefix)


@_spatial_prior_backward_op.register_fake
def _(grad, gh, gw, num_prefix, backend):
    return grad.new_empty((grad.shape[0], 2 * gh - 1, 2 * gw - 1))


def _setup_context(ctx, inputs, output):
    _, gh, gw, num_prefix, backend = inputs
    ctx.args = (gh, gw, num_prefix, backend)


def _backward(ctx, grad):
    return _spatial_prior_backward_op(grad.contiguous(), *ctx.args), None, None, None, None


_spatial_prior_op.register_autograd(_backward, setup_context=_setup_context)


def _call(backend, omega, grid, num_prefix_tokens):
    return _spatial_prior_op(omega, grid[0], grid[1], num_prefix_tokens, backend)


register_kernels("spatial_prior", _KERNELS, _call)


def spatial_prior_matrix(
    omega: torch.Tensor,
    grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Expand the relative-position table into the dense SP-SA prior.

    Args:
        omega: (H, 2*gh-1, 2*gw-1) table of multiplicative factors.
        grid: (gh, gw); inferred from ``omega``'s shape when omitted.
        num_prefix_tokens: leading class/register tokens, which get factor 1.
        backend: "auto", "reference" or "cpu" (CUDA tensors: "reference").

    Returns:
        (H, N, N) with N = num_prefix_tokens + gh*gw; differentiable in ``omega``.
        A gather, not a product: it keeps omega's dtype, inside ``torch.autocast`` too.
    """
    check_tensor("omega", omega, 3, "(H, 2*gh-1, 2*gw-1)")
    check_int("num_prefix_tokens", num_prefix_tokens, 0)
    if grid is None:
        grid = ((omega.shape[1] + 1) // 2, (omega.shape[2] + 1) // 2)
    grid = resolve_grid(num_prefix_tokens + grid[0] * grid[1], num_prefix_tokens, omega, tuple(grid))
    fn = _backend.select("spatial_prior", backend, omega.device, omega, grid, num_prefix_tokens)
    return fn(omega, grid, num_prefix_tokens)
