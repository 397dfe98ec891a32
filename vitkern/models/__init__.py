from vitkern.models.registry import create_model, list_models, model_config
from vitkern.models.vit import ViT, resample_pos_embed

__all__ = ["ViT", "create_model", "list_models", "model_config", "resample_pos_embed"]
