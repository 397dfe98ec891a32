"""vitkern.ViT checkpoints: weights and constructor arguments in one safetensors file
(safetensors is imported only when saving or loading)."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from vitkern.models import ViT

__all__ = ["load_model", "save_model"]


def save_model(model: nn.Module, path: str) -> None:
    """Write ``model``'s weights and constructor arguments to a safetensors file."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    sd["pos_embed_grid"] = torch.tensor(model.patch_embed.grid_size, dtype=torch.int64)
    save_file(sd, path, metadata={"vitkern_config": json.dumps(model.config), "format": "pt"})


def load_model(path: str, device: str | None = None, **overrides: Any):
    """Rebuild the vitkern.ViT saved by :func:`save_model`. ``overrides`` change
    constructor arguments; a different ``img_size`` resamples the position embedding."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "vitkern_config" not in meta:
        raise ValueError(f"{path} is not a vitkern checkpoint (no 'vitkern_config' metadata)")
    config = {**json.loads(meta["vitkern_config"]), **overrides}
    for key in ("img_size", "patch_size"):
        if isinstance(config.get(key), list):
            config[key] = tuple(config[key])
    model = ViT(**config)
    model.load_state_dict(load_file(path, device=device or "cpu"), strict=True)
    return model.to(device) if device else model
