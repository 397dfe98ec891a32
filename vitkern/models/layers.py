"""Building blocks of vitkern.ViT. Module and parameter names mirror timm's
VisionTransformer so that ``load_state_dict(timm_model.state_dict())`` works key
for key; the forward passes call vitkern's fused ops."""

from __future__ import annotations

import torch
import torch.nn as nn

from vitkern.ops import layernorm_mlp, sp_attention
from vitkern.ops._autograd import no_autocast


class LayerScale(nn.Module):
    """Per-channel scale (timm.layers.LayerScale): key ``gamma``."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class SpatialRelation(nn.Module):
    """SP-ViT's spatial relation function, one small MLP per head (SPEC.md 1.3):

        omega_h(dx, dy) = w2_h . ReLU(W1_h [dx, dy] + b1_h) + b2_h

    evaluated once per forward on the (2gh-1)(2gw-1) offsets of the current grid.

    Initialised as SP-ViT's public code does: ``W1`` truncated normal (std 0.02, cut at
    ±2), ``b1 = 0``, ``w2 = 0``, ``b2 = 1``, so a fresh layer is exactly plain attention and
    its hidden layer starts small on the raw integer offsets (a uniform ±0.7 ``W1`` would put
    it at up to ±10 on a 14x14 grid).
    """

    def __init__(self, num_heads: int, hidden: int = 32) -> None:
        super().__init__()
        self.num_heads, self.hidden = num_heads, hidden
        self.w1 = nn.Parameter(torch.empty(num_heads, hidden, 2))
        self.b1 = nn.Parameter(torch.zeros(num_heads, hidden))
        self.w2 = nn.Parameter(torch.zeros(num_heads, hidden))
        self.b2 = nn.Parameter(torch.ones(num_heads))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.w2)
        nn.init.ones_(self.b2)

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        """(H, 2*gh-1, 2*gw-1) table: ``[h, dy+gh-1, dx+gw-1]``, in the parameters' dtype
        (also under autocast: the MLP is tiny and sp_attention takes an fp32 table with
        half-precision q/k/v)."""
        with no_autocast(self.w1.device.type):
            return self._table(grid)

    def _table(self, grid: tuple[int, int]) -> torch.Tensor:
        gh, gw = grid
        dev, dt = self.w1.device, self.w1.dtype
        dy = torch.arange(-(gh - 1), gh, device=dev, dtype=dt)
        dx = torch.arange(-(gw - 1), gw, device=dev, dtype=dt)
        delta = torch.stack(torch.meshgrid(dx, dy, indexing="xy"), dim=-1)  # (2gh-1, 2gw-1, 2) as (dx, dy)
        hidden = torch.einsum("yxc,hkc->hyxk", delta, self.w1) + self.b1[:, None, None, :]
        return torch.einsum("hyxk,hk->hyx", hidden.relu(), self.w2) + self.b2[:, None, None]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, hidden={self.hidden}"


class Attention(nn.Module):
    """Multi-head self-attention (keys ``qkv``, ``proj``) on vitkern's sp_attention.

    With ``spatial_prior=True`` it is an SP-SA layer: ``spatial_relation`` produces
    the Omega table for the current grid, applied to the patch tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        spatial_prior: bool = False,
        sp_hidden: int = 32,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.spatial_relation = SpatialRelation(num_heads, sp_hidden) if spatial_prior else None

    def omega(self, grid: tuple[int, int]) -> torch.Tensor | None:
        return None if self.spatial_relation is None else self.spatial_relation(grid)

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # strided (B, H, N, Dh) views, no copy

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.split_qkv(x)
        omega = self.omega(grid)
        out = sp_attention(
            q,
            k,
            v,
            omega,
            grid=grid if omega is not None else None,
            num_prefix_tokens=num_prefix_tokens,
            scale=self.scale,
        )
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Keys ``fc1``, ``fc2``; the computation is fused with the preceding LayerNorm in Block."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then the fused
    x + ls2(fc2(GELU(fc1(norm2(x)))))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        spatial_prior: bool = False,
        sp_hidden: int = 32,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, spatial_prior, sp_hidden)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=proj_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid, num_prefix_tokens)))
        plain_residual = isinstance(self.ls2, nn.Identity) and not (
            isinstance(self.drop_path2, DropPath) and self.training
        )
        mlp_args = (
            self.norm2.weight,
            self.norm2.bias,
            self.mlp.fc1.weight,
            self.mlp.fc1.bias,
            self.mlp.fc2.weight,
            self.mlp.fc2.bias,
        )
        if plain_residual:  # the residual add is fused into fc2's epilogue
            return layernorm_mlp(x, *mlp_args, eps=self.norm2.eps)
        return x + self.drop_path2(self.ls2(layernorm_mlp(x, *mlp_args, eps=self.norm2.eps, residual=False)))
