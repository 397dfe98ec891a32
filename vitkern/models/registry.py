"""Named configurations: timm's ViT sizes and the SP-ViT sizes of docs/DESIGN.md §2.2."""

from __future__ import annotations

from typing import Any

from vitkern.models.vit import ViT

_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    # SP-ViT (simplified: no LV-ViT conv stem, no token labelling); MLP ratio 3, K = depth - 2.
    "sp_vit_small_patch16_224": dict(
        patch_size=16, embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, spatial_prior=True, sp_layers=14
    ),
    "sp_vit_medium_patch16_224": dict(
        patch_size=16, embed_dim=512, depth=20, num_heads=8, mlp_ratio=3.0, spatial_prior=True, sp_layers=18
    ),
    "sp_vit_large_patch16_224": dict(
        patch_size=16, embed_dim=768, depth=24, num_heads=12, mlp_ratio=3.0, spatial_prior=True, sp_layers=22
    ),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_CONFIGS)


def model_config(name: str) -> dict[str, Any]:
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    return dict(_CONFIGS[name])


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> ViT:
    """Build a named configuration; keyword arguments override it (as in timm).

    ``pretrained=True`` is not supported (no weights are downloaded): load a
    timm checkpoint with ``ViT.from_timm`` or ``load_state_dict`` instead.
    """
    if pretrained:
        raise ValueError(
            "vitkern downloads no weights; use vitkern.ViT.from_timm(timm.create_model(..., pretrained=True))"
        )
    model = ViT(**model_kwargs(name, **kwargs))
    model.pretrained_cfg["architecture"] = name
    return model


def model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The constructor arguments of a named configuration with ``overrides`` applied; an
    SP-ViT whose ``depth`` is overridden keeps the rule K = depth - 2 unless ``sp_layers``
    is given too."""
    cfg = model_config(name)
    if cfg.get("spatial_prior") and "depth" in overrides and "sp_layers" not in overrides:
        cfg["sp_layers"] = max(int(overrides["depth"]) - 2, 0)
    return {**cfg, **overrides}
