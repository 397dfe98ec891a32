"""vitkern.ViT: a drop-in for timm's VisionTransformer running on vitkern's
fused ops, with an SP-ViT mode (SPEC.md section 2)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkern.models.layers import Block
from vitkern.ops import patch_embed

__all__ = ["ViT", "PatchEmbed", "resample_pos_embed"]


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int = 0
) -> torch.Tensor:
    """Bicubic (antialiased) resampling of a (1, prefix + gh*gw, D) position embedding,
    the same computation as timm.layers.resample_abs_pos_embed."""
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid_part = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim, dtype = pos_embed.shape[-1], pos_embed.dtype
    grid_part = grid_part.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid_part = F.interpolate(grid_part, size=tuple(new_grid), mode="bicubic", antialias=True)
    grid_part = grid_part.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)
    return torch.cat([prefix, grid_part], dim=1) if num_prefix_tokens else grid_part


class PatchEmbed(nn.Module):
    """Keys ``proj.weight``/``proj.bias`` as in timm (a Conv2d), computed by the fused op."""

    def __init__(
        self,
        img_size: tuple[int, int],
        patch_size: tuple[int, int],
        in_chans: int,
        embed_dim: int,
        bias: bool,
        strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        if patch_size[0] != patch_size[1]:
            raise ValueError(f"patch_size must be square, got {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def grid_for(self, images: torch.Tensor) -> tuple[int, int]:
        if images.dim() != 4:
            raise ValueError(f"images must have shape (batch, channels, height, width), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if self.strict_img_size and (H, W) != self.img_size:
            raise ValueError(
                f"input image size {(H, W)} does not match the model's img_size {self.img_size}; "
                "build the model with dynamic_img_size=True for other sizes"
            )
        P = self.patch_size[0]
        if H % P or W % P:
            raise ValueError(f"image size {(H, W)} is not divisible by the patch size {P}")
        return H // P, W // P

    def forward(self, images: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        return patch_embed(images, self.proj.weight, self.proj.bias, pos_embed)


class ViT(nn.Module):
    """Vision Transformer with timm's constructor, state_dict and logits.

    Args follow ``timm.models.vision_transformer.VisionTransformer``. SP-ViT mode:

    Args:
        spatial_prior: make the first ``sp_layers`` blocks SP-SA layers on the patch
            tokens; the class (and register) tokens are inserted after them, and the
            position embedding has one entry per patch only.
        sp_layers: number of SP-SA blocks K (default ``depth - 2``, the paper's choice).
        sp_hidden: hidden width of each head's relation MLP (default 32).
        act_layer: the MLP's GELU, ``"gelu"`` / None (exact, default) or ``"gelu_tanh"``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: float | None = None,
        class_token: bool = True,
        pos_embed: str = "learn",
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: bool | None = None,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weight_init: str = "",
        spatial_prior: bool = False,
        sp_layers: int | None = None,
        sp_hidden: int = 32,
        norm_eps: float = 1e-6,
        act_layer: str | None = None,
        **kwargs: Any,
    ) -> None:
        config = {k: v for k, v in locals().items() if k not in ("self", "kwargs", "__class__")}
        super().__init__()
        # The constructor arguments, for checkpoints (vitkern.save_model / load_model).
        self.config: dict[str, Any] = config
        if kwargs:
            raise TypeError(f"vitkern.ViT got unsupported keyword arguments: {sorted(kwargs)}")
        if global_pool not in ("", "avg", "avgmax", "max", "token"):
            raise ValueError(f"global_pool must be one of '', 'avg', 'avgmax', 'max', 'token', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        unsupported = {
            "qk_norm": qk_norm,
            "dynamic_img_pad": dynamic_img_pad,
            "patch_drop_rate": patch_drop_rate,
            "proj_drop_rate": proj_drop_rate,
            "attn_drop_rate": attn_drop_rate,
            "pos_embed": pos_embed != "learn",
            "weight_init": weight_init not in ("", "skip"),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"vitkern.ViT does not support {bad} (the fused ops have no dropout inside attention/MLP)")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        approximate = _gelu_approximate(act_layer)
        if spatial_prior:
            sp_layers = max(depth - 2, 0) if sp_layers is None else sp_layers
            if not 0 <= sp_layers <= depth:
                raise ValueError(f"sp_layers must be in [0, depth={depth}], got {sp_layers}")
        else:
            sp_layers = 0

        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.has_class_token = class_token
        self.dynamic_img_size = dynamic_img_size
        self.spatial_prior, self.sp_layers = spatial_prior, sp_layers
        # SP-ViT inserts the prefix tokens late, so its position embedding has no prefix slots.
        self.no_embed_class = no_embed_class or spatial_prior

        img_size, patch_size = _pair(img_size), _pair(patch_size)
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, bias=not pre_norm, strict_img_size=not dynamic_img_size
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if self.no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    proj_bias,
                    init_values,
                    dpr[i],
                    spatial_prior=i < sp_layers,
                    sp_hidden=sp_hidden,
                    norm_eps=norm_eps,
                    mlp_approximate=approximate,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ init / interop
    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default ('') initialisation: trunc-normal(0.02) linears and pos_embed."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for tok in (self.cls_token, self.reg_token):
            if tok is not None:
                nn.init.normal_(tok, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @classmethod
    def from_timm(cls, model: nn.Module, **overrides: Any) -> ViT:
        """An equivalent vitkern.ViT with ``model``'s weights (a timm VisionTransformer)."""
        from vitkern.zoo import vit_from_timm

        return vit_from_timm(cls, model, **overrides)  # raises TimmConversionError (a ValueError)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token"}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """A checkpoint's position embedding for another image size (another patch grid) is
        resampled to this model's grid on load (bicubic, as timm does); its grid is read from
        the checkpoint's ``pos_embed_grid`` entry if present, else taken as square."""
        key = prefix + "pos_embed"
        grid_key = prefix + "pos_embed_grid"
        old_grid_t = state_dict.pop(grid_key, None)
        pos = state_dict.get(key)
        if isinstance(pos, torch.Tensor) and pos.shape != self.pos_embed.shape:
            n_pre = 0 if self.no_embed_class else self.num_prefix_tokens
            D = self.pos_embed.shape[-1]
            expected = f"(1, {n_pre} + gh*gw, {D})"
            if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[-1] != D or pos.shape[1] <= n_pre:
                raise ValueError(
                    f"checkpoint pos_embed must have shape {expected} to load into this model "
                    f"(grid {self.patch_embed.grid_size}), got {tuple(pos.shape)}"
                )
            n_old = pos.shape[1] - n_pre
            if old_grid_t is not None:
                old_grid = (int(old_grid_t[0]), int(old_grid_t[1]))
            else:
                g = math.isqrt(n_old)
                old_grid = (g, g)
            if old_grid[0] * old_grid[1] != n_old:
                raise ValueError(
                    f"checkpoint pos_embed has {n_old} patch positions, which is not a square grid; "
                    f"store its grid as 'pos_embed_grid' to resample it to {self.patch_embed.grid_size} "
                    f"(expected shape {tuple(self.pos_embed.shape)})"
                )
            state_dict[key] = resample_pos_embed(pos, self.patch_embed.grid_size, old_grid, n_pre)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    # ------------------------------------------------------------------ forward
    def _prefix_tokens(self, batch: int) -> list[torch.Tensor]:
        toks = []
        if self.cls_token is not None:
            toks.append(self.cls_token.expand(batch, -1, -1))
        if self.reg_token is not None:
            toks.append(self.reg_token.expand(batch, -1, -1))
        return toks

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        if self.dynamic_img_size:
            return resample_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size, prefix)
        return self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.patch_embed.grid_for(x)
        B = x.shape[0]
        pos = self._pos_embed_for(grid)
        n_pre = 0 if self.no_embed_class else self.num_prefix_tokens
        # Patch gather, projection, bias and position embedding in one fused op.
        x = self.patch_embed(x, pos[:, n_pre:])
        prefix = self._prefix_tokens(B)
        if n_pre:
            prefix = [t + pos[:, i : i + t.shape[1]] for t, i in zip(prefix, _offsets(prefix), strict=True)]
        late = self.spatial_prior
        if prefix and not late:
            x = torch.cat([*prefix, x], dim=1)
        x = self.norm_pre(self.pos_drop(x))
        num_prefix = 0 if late else self.num_prefix_tokens
        for i, blk in enumerate(self.blocks):
            if late and i == self.sp_layers:
                x = torch.cat([*prefix, x], dim=1) if prefix else x
                num_prefix = self.num_prefix_tokens
            x = blk(x, grid, num_prefix)
        if late and self.sp_layers == len(self.blocks) and prefix:
            x = torch.cat([*prefix, x], dim=1)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool:
            x = x[:, self.num_prefix_tokens :]
            if self.global_pool == "avg":
                x = x.mean(dim=1)
            elif self.global_pool == "max":
                x = x.amax(dim=1)
            else:  # avgmax
                x = 0.5 * (x.amax(dim=1) + x.mean(dim=1))
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Attention probabilities (B, H, N, N) of block ``layer`` (Omega applied).

        The fused kernels never materialise them; this reruns the model up to that
        block and computes the probabilities on the reference path.
        """
        from vitkern.ops import sp_attention_probs

        if not -len(self.blocks) <= layer < len(self.blocks):
            raise ValueError(f"layer must be in [-{len(self.blocks)}, {len(self.blocks)}), got {layer}")
        layer %= len(self.blocks)
        captured: dict[str, torch.Tensor] = {}
        blk = self.blocks[layer]

        def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
            xin, grid, num_prefix = args
            q, k, _ = blk.attn.split_qkv(xin)
            omega = blk.attn.omega(grid)
            captured["p"] = sp_attention_probs(q, k, omega, grid, num_prefix, blk.attn.scale)

        handle = blk.attn.register_forward_hook(hook)
        try:
            self.forward_features(x)
        finally:
            handle.remove()
        return captured["p"]


def _gelu_approximate(act_layer: str | None) -> str:
    """The MLP activation (timm's ``act_layer`` names): exact or tanh GELU."""
    names = {None: "none", "gelu": "none", "gelu_tanh": "tanh"}
    if act_layer not in names:
        raise ValueError(f"act_layer must be one of {sorted(n for n in names if n)} or None, got {act_layer!r}")
    return names[act_layer]


def _offsets(tokens: list[torch.Tensor]) -> list[int]:
    out, acc = [], 0
    for t in tokens:
        out.append(acc)
        acc += t.shape[1]
    return out
