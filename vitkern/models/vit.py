"""vitkern.ViT: a drop-in for timm's VisionTransformer running on vitkern's
fused ops, with an SP-ViT mode (docs/DESIGN.md §2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vitkern.models.layers import Block
from vitkern.ops import patch_embed

__all__ = ["ViT", "PatchEmbed", "feature_take_indices", "resample_pos_embed", "vit_pretrained_cfg"]

# Inception-style normalisation, as timm's ViT configurations use.
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)


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


def vit_pretrained_cfg(
    num_classes: int = 1000,
    input_size: tuple[int, int, int] = (3, 224, 224),
    fixed_input_size: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """The preprocessing/head description timm keeps on a model as ``pretrained_cfg``,
    with the values of timm's ViT configurations (mean = std = 0.5, crop 0.9, bicubic).

    timm's ``resolve_data_config`` (used by its train/validate/benchmark scripts) reads
    it to build the evaluation transform; ``classifier`` and ``first_conv`` name the
    layers timm drops or adapts when loading weights for another class or channel count.
    """
    return {
        "url": "",
        "hf_hub_id": None,
        "file": None,
        "architecture": None,
        "tag": None,
        "num_classes": num_classes,
        "input_size": tuple(int(v) for v in input_size),
        "pool_size": None,
        "crop_pct": 0.9,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "fixed_input_size": fixed_input_size,
        "mean": VIT_MEAN,
        "std": VIT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **overrides,
    }


def feature_take_indices(num_features: int, indices: int | list[int] | tuple[int, ...] | None = None):
    """Absolute block indices to take (as timm's ``feature_take_indices``): ``None`` all,
    an int ``n`` the last n, a sequence the given indices (negative from the end).
    Returns ``(take_indices, max_index)``."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices: last-n ({indices}) is out of range (1 to {num_features})")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_features + int(i) if int(i) < 0 else int(i)
            if not 0 <= idx < num_features:
                raise ValueError(f"indices: feature index {i} is out of range (0 to {num_features - 1})")
            take.append(idx)
        if not take:
            raise ValueError("indices must name at least one block")
    return take, max(take)


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
        # int(): under torch.jit.trace (ONNX / OpenVINO export) sizes are tensors; the grid
        # is a static shape of the exported graph either way.
        return int(H) // P, int(W) // P

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def set_input_size(
        self, img_size: int | tuple[int, int] | None = None, patch_size: int | tuple[int, int] | None = None
    ) -> None:
        """New image and/or patch size (timm's PatchEmbed.set_input_size): a new patch size
        resamples the projection kernel as timm does (needs timm installed)."""
        new_img = _pair(img_size) if img_size is not None else self.img_size
        new_p = _pair(patch_size) if patch_size is not None else self.patch_size
        if min(new_img) <= 0 or min(new_p) <= 0 or new_img[0] % new_p[0] or new_img[1] % new_p[1]:
            raise ValueError(
                f"img_size {new_img} must be positive and divisible by the patch size {new_p} "
                "(set_input_size(img_size=..., patch_size=...))"
            )
        if patch_size is not None and _pair(patch_size) != self.patch_size:
            new_patch = _pair(patch_size)
            if new_patch[0] != new_patch[1]:
                raise ValueError(f"patch_size must be square, got {new_patch}")
            try:
                from timm.layers import resample_patch_embed
            except ImportError as e:  # pragma: no cover - timm is a test dependency
                raise ImportError("changing the patch size resamples the kernel with timm; pip install timm") from e
            old = self.proj
            with torch.no_grad():
                new = nn.Conv2d(
                    old.in_channels,
                    old.out_channels,
                    kernel_size=new_patch,
                    stride=new_patch,
                    bias=old.bias is not None,
                    device=old.weight.device,
                    dtype=old.weight.dtype,
                )
                new.weight.copy_(resample_patch_embed(old.weight, list(new_patch)))
                new.weight.requires_grad_(old.weight.requires_grad)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
                    new.bias.requires_grad_(old.bias.requires_grad)
            self.proj = new.train(old.training)
            self.patch_size = new_patch
        self.img_size = _pair(img_size) if img_size is not None else self.img_size
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, images: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        return patch_embed(images, self.proj.weight, self.proj.bias, pos_embed)


# The conversion behind ViT.from_timm. It lives in vitkern.interop, which knows timm's classes and
# imports models/, never the other way round; importing vitkern.interop (which `import vitkern`
# does) registers it here.
_timm_converter: Callable[..., ViT] | None = None


def set_timm_converter(convert: Callable[..., ViT]) -> None:
    """Install ``convert(cls, timm_model, **overrides)`` as the conversion behind
    :meth:`ViT.from_timm` (``vitkern.interop`` installs ``vit_from_timm`` when imported)."""
    global _timm_converter
    _timm_converter = convert


class ViT(nn.Module):
    """Vision Transformer with timm's constructor, state_dict and logits.

    Args follow ``timm.models.vision_transformer.VisionTransformer``. SP-ViT mode:

    Args:
        spatial_prior: make the first ``sp_layers`` blocks SP-SA layers on the patch
            tokens; the class (and register) tokens are inserted after them, and the
            position embedding has one entry per patch only.
        sp_layers: number of SP-SA blocks K (default ``depth - 2``, the paper's choice).
        sp_hidden: hidden width of each head's relation MLP (default 32).
        act_layer: the MLP's activation, timm's names: ``"gelu"`` / None (exact, default),
            ``"gelu_tanh"``, ``"quick_gelu"`` or ``"silu"`` (all fused, vitkern.ops.layernorm_mlp).
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
        mlp_activation = _mlp_activation(act_layer)
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
                    mlp_activation=mlp_activation,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.grad_checkpointing = False
        # timm's model metadata (preprocessing, classifier name); timm.create_model replaces it
        # with the registered configuration of the model name.
        self.pretrained_cfg: dict[str, Any] = vit_pretrained_cfg(
            num_classes=num_classes, input_size=(in_chans, *img_size), fixed_input_size=not dynamic_img_size
        )
        self.init_weights()

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of ``pretrained_cfg`` (the same dict)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

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
        """An equivalent ``cls`` (vitkern.ViT or a subclass) with the weights and ``pretrained_cfg``
        of ``model``, a timm VisionTransformer; ``overrides`` change constructor arguments. A feature
        without an exact counterpart raises ``vitkern.interop.TimmConversionError`` (a ValueError)
        before anything is built. The conversion is ``vitkern.interop.from_timm.vit_from_timm``,
        found through :func:`set_timm_converter` (models/ does not import interop)."""
        if _timm_converter is None:
            raise RuntimeError(
                "ViT.from_timm: no timm conversion is registered (`import vitkern.interop` registers it)"
            )
        return _timm_converter(cls, model, **overrides)

    # ------------------------------------------------------------------ timm's model API
    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps out of weight decay: the embeddings and
        tokens (as for timm's ViT) and the relation MLPs' biases ``b1``/``b2`` (biases, though
        stored per head as 2-D/1-D tensors)."""
        names = {"pos_embed", "cls_token", "reg_token", "dist_token"}
        for i, blk in enumerate(self.blocks):
            if blk.attn.spatial_relation is not None:
                names |= {f"blocks.{i}.attn.spatial_relation.b1", f"blocks.{i}.attn.spatial_relation.b2"}
        return names

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise learning-rate decay (``layer_decay``): the
        embeddings, one group per block (an SP block's relation MLP belongs to its block), then
        the final norm and head — the same groups as timm's VisionTransformer."""
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of storing them
        (timm's ``--grad-checkpointing``); gradients are unchanged."""
        self.grad_checkpointing = bool(enable)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new (freshly initialised) head for ``num_classes`` (0: no head, features out);
        optionally a new pooling ('', 'avg', 'avgmax', 'max', 'token')."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if global_pool is not None:
            if global_pool not in ("", "avg", "avgmax", "max", "token"):
                raise ValueError(f"global_pool must be one of '', 'avg', 'avgmax', 'max', 'token', got {global_pool!r}")
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs class_token=True")
            self.global_pool = global_pool
            # The norm placement was chosen from the pooling at construction; keep it.
            self.config.update(global_pool=global_pool, fc_norm=not isinstance(self.fc_norm, nn.Identity))
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        ref = self.cls_token if self.cls_token is not None else self.pos_embed
        if num_classes > 0:
            head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
            self.head = head.train(self.training)
        else:
            self.head = nn.Identity()

    def set_input_size(
        self, img_size: int | tuple[int, int] | None = None, patch_size: int | tuple[int, int] | None = None
    ) -> None:
        """Change the model's image size (and optionally patch size) in place, as timm's
        ``set_input_size``: the position embedding is resampled (bicubic) to the new grid."""
        prev_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        new_grid = self.patch_embed.grid_size
        if new_grid != prev_grid:
            n_pre = 0 if self.no_embed_class else self.num_prefix_tokens
            with torch.no_grad():
                pos = resample_pos_embed(self.pos_embed.data, new_grid, prev_grid, n_pre)
            self.pos_embed = nn.Parameter(pos, requires_grad=self.pos_embed.requires_grad)
        reduction = self.patch_embed.feat_ratio()
        for info in self.feature_info:
            info["reduction"] = reduction
        self.config.update(img_size=self.patch_embed.img_size, patch_size=self.patch_embed.patch_size)
        if hasattr(self, "_traits"):  # timm.create_model's record of the current input size
            self._traits = {**self._traits, "img_size": self.patch_embed.img_size}

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

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int], int]:
        """Patch embedding (+ position embedding, + prefix tokens unless inserted late).

        Returns ``(tokens, late_prefix, grid, num_prefix)``: ``late_prefix`` is the
        (B, num_prefix_tokens, D) class/register tokens an SP-ViT inserts after its SP
        blocks (None otherwise), ``num_prefix`` the prefix tokens ``tokens`` holds now.
        """
        grid = self.patch_embed.grid_for(x)
        B = x.shape[0]
        pos = self._pos_embed_for(grid)
        n_pre = 0 if self.no_embed_class else self.num_prefix_tokens
        # Patch gather, projection, bias and position embedding in one fused op.
        x = self.patch_embed(x, pos[:, n_pre:])
        prefix = self._prefix_tokens(B)
        if n_pre:
            prefix = [t + pos[:, i : i + t.shape[1]] for t, i in zip(prefix, _offsets(prefix), strict=True)]
        late_prefix = torch.cat(prefix, dim=1) if prefix and self.spatial_prior else None
        if prefix and not self.spatial_prior:
            x = torch.cat([*prefix, x], dim=1)
        x = self.norm_pre(self.pos_drop(x))
        return x, late_prefix, grid, 0 if self.spatial_prior else self.num_prefix_tokens

    def _insert_late_prefix(
        self, i: int, x: torch.Tensor, late_prefix: torch.Tensor | None, num_prefix: int
    ) -> tuple[torch.Tensor, int]:
        """SP-ViT: before block ``i == sp_layers`` (or after the last block when every block is
        an SP block) the class/register tokens join the sequence."""
        if late_prefix is not None and num_prefix == 0 and i >= self.sp_layers:
            return torch.cat([late_prefix, x], dim=1), self.num_prefix_tokens
        return x, num_prefix

    def _run_block(self, i: int, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
        blk = self.blocks[i]
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(blk, x, grid, num_prefix, use_reentrant=False)
        return blk(x, grid, num_prefix)

    def _final_features(self, x: torch.Tensor, late_prefix: torch.Tensor | None, num_prefix: int) -> torch.Tensor:
        x, _ = self._insert_late_prefix(len(self.blocks), x, late_prefix, num_prefix)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, late_prefix, grid, num_prefix = self._embed(x)
        for i in range(len(self.blocks)):
            x, num_prefix = self._insert_late_prefix(i, x, late_prefix, num_prefix)
            x = self._run_block(i, x, grid, num_prefix)
        return self._final_features(x, late_prefix, num_prefix)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> Any:
        """Final features and the outputs of selected blocks (timm's dense-prediction API,
        same arguments and results as timm's VisionTransformer).

        ``indices``: None all blocks, an int n the last n, a sequence the given blocks.
        Each intermediate is the block's patch tokens, as (B, D, gh, gw) for
        ``output_fmt='NCHW'`` or (B, gh*gw, D) for 'NLC'; with ``return_prefix_tokens`` each
        is a pair (patch tokens, prefix tokens (B, num_prefix_tokens, D)).

        SP-ViT: an SP block (index < sp_layers) runs on the patch tokens alone, its
        intermediate is those patch tokens; as its prefix tokens this returns the class/register
        tokens that join the sequence after the SP blocks (the learned tokens, not yet
        processed by any block). ``norm=True`` applies the final norm to every token.
        """
        if attn_mask is not None or is_causal:
            raise ValueError("vitkern.ViT supports no attention mask (attn_mask=None, is_causal=False)")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x, late_prefix, grid, num_prefix = self._embed(x)
        last = max_index + 1 if stop_early else len(self.blocks)
        intermediates: list[torch.Tensor] = []
        prefix_tokens: list[torch.Tensor] = []
        for i in range(last):
            x, num_prefix = self._insert_late_prefix(i, x, late_prefix, num_prefix)
            x = self._run_block(i, x, grid, num_prefix)
            if i in take_indices:
                pre, patches = x[:, :num_prefix], x[:, num_prefix:]
                if num_prefix == 0 and late_prefix is not None:
                    pre = late_prefix
                intermediates.append(self.norm(patches) if norm else patches)
                prefix_tokens.append(self.norm(pre) if norm else pre)

        if output_fmt == "NCHW":
            H, W = grid
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        has_prefix = self.num_prefix_tokens > 0
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if has_prefix and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self._final_features(x, late_prefix, num_prefix)
            return result
        if has_prefix and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens, strict=True))
        if intermediates_only:
            return intermediates
        return self._final_features(x, late_prefix, num_prefix), intermediates

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | list[int] | tuple[int, ...] = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> list[Any]:
        """DINO-style access to block outputs (timm's ``get_intermediate_layers``)."""
        return self.forward_intermediates(
            x,
            n,
            return_prefix_tokens=return_prefix_tokens,
            norm=norm,
            output_fmt="NCHW" if reshape else "NLC",
            intermediates_only=True,
            attn_mask=attn_mask,
        )

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last one ``indices`` needs (and optionally the final norm
        and the head), as timm does for backbones; returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        self.sp_layers = min(self.sp_layers, len(self.blocks))
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        norm_kept, fc_kept = not isinstance(self.norm, nn.Identity), not isinstance(self.fc_norm, nn.Identity)
        self.config.update(depth=len(self.blocks), final_norm=norm_kept or fc_kept, fc_norm=fc_kept)
        if self.spatial_prior:
            self.config["sp_layers"] = self.sp_layers
        return take_indices

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, 0]
        if not pool_type:
            return x
        x = x[:, self.num_prefix_tokens :]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
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


def _mlp_activation(act_layer: str | None) -> str:
    """The MLP activation from timm's ``act_layer`` names (those the fused MLP implements)."""
    names = {None: "gelu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "silu": "silu"}
    names["swish"] = "silu"  # timm: swish is SiLU
    if act_layer not in names:
        raise ValueError(f"act_layer must be one of {sorted(n for n in names if n)} or None, got {act_layer!r}")
    return names[act_layer]


def _offsets(tokens: list[torch.Tensor]) -> list[int]:
    out, acc = [], 0
    for t in tokens:
        out.append(acc)
        acc += t.shape[1]
    return out
