"""vitkern's fused operations. Each takes ``backend=`` ("auto", "reference",
"triton", "cpu"); the ``*_reference`` functions are the plain-PyTorch
truth every kernel is tested against."""

from vitkern.ops._packed import clear_packed_weights
from vitkern.ops.layernorm_mlp import layernorm_mlp, layernorm_mlp_reference
from vitkern.ops.patch_embed import patch_embed, patch_embed_reference
from vitkern.ops.sp_attention import sp_attention, sp_attention_probs, sp_attention_reference
from vitkern.ops.spatial_prior import relative_index, resolve_grid, spatial_prior_matrix, spatial_prior_reference

__all__ = [
    "clear_packed_weights",
    "layernorm_mlp",
    "layernorm_mlp_reference",
    "patch_embed",
    "patch_embed_reference",
    "relative_index",
    "resolve_grid",
    "sp_attention",
    "sp_attention_probs",
    "sp_attention_reference",
    "spatial_prior_matrix",
    "spatial_prior_reference",
]
