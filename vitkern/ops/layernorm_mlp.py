"""LayerNorm + GELU-MLP, the second half of a pre-norm block (SPEC.md 1.4):

y = x + fc2(GELU(fc1(LayerNorm(x))))      (residual=True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitkern import _backend
from vitkern.ops._validate import check_same, check_tensor

__all__ = ["layernorm_mlp", "layernorm_mlp_reference"]

_APPROXIMATE = ("none", "tanh")


def layernorm_mlp_reference(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    eps: float = 1e-6,
    approximate: str = "none",
    residual: bool = True,
) -> torch.Tensor:
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    h = F.gelu(F.linear(h, fc1_weight, fc1_bias), approximate=approximate)
    out = F.linear(h, fc2_weight, fc2_bias)
    return x + out if residual else out


_backend.register_impl("layernorm_mlp", "reference", layernorm_mlp_reference)


def layernorm_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    eps: float = 1e-6,
    approximate: str = "none",
    residual: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused ``x + fc2(GELU(fc1(LayerNorm(x))))``.

    Args:
        x: (..., dim).
        ln_weight, ln_bias: (dim,) LayerNorm affine parameters, or None.
        fc1_weight: (hidden, dim); fc1_bias: (hidden,) or None.
        fc2_weight: (dim, hidden); fc2_bias: (dim,) or None.
        eps: LayerNorm epsilon (timm uses 1e-6).
        approximate: "none" (exact erf GELU) or "tanh".
        residual: add ``x`` to the output (default True).
        backend: "auto", "reference", "triton", "cpu" or "cuda".

    Returns:
        Same shape and dtype as ``x``.
    """
    check_tensor("x", x, range(1, 9), "(..., dim)")
    D = x.shape[-1]
    check_tensor("fc1_weight", fc1_weight, 2, f"(hidden, {D})")
    Hd = fc1_weight.shape[0]
    check_tensor("fc2_weight", fc2_weight, 2, f"({D}, hidden)")
    check_same(
        "x",
        x,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
        fc1_weight=fc1_weight,
        fc1_bias=fc1_bias,
        fc2_weight=fc2_weight,
        fc2_bias=fc2_bias,
    )
    if fc1_weight.shape[1] != D:
        raise ValueError(f"fc1_weight must have shape (hidden, {D}), got {tuple(fc1_weight.shape)}")
    if tuple(fc2_weight.shape) != (D, Hd):
        raise ValueError(f"fc2_weight must have shape ({D}, {Hd}), got {tuple(fc2_weight.shape)}")
    for name, t, n in (
        ("ln_weight", ln_weight, D),
        ("ln_bias", ln_bias, D),
        ("fc1_bias", fc1_bias, Hd),
        ("fc2_bias", fc2_bias, D),
    ):
        if t is not None:
            check_tensor(name, t, 1, f"({n},)")
            if t.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if approximate not in _APPROXIMATE:
        raise ValueError(f"approximate must be one of {_APPROXIMATE}, got {approximate!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    args = (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, float(eps), approximate, bool(residual))
    fn = _backend.select("layernorm_mlp", backend, x.device, *args)
    if x.numel() == 0:
        return layernorm_mlp_reference(*args)
    return fn(*args)
