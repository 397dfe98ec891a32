"""vitkern: fused kernels for Vision Transformers.

* ``vitkern.ops``: ``patch_embed``, ``sp_attention`` (spatial-prior flash attention),
  ``layernorm_mlp``, each with a plain-PyTorch reference and selectable backends.
* ``vitkern.ViT``: a drop-in for timm's VisionTransformer, with an SP-ViT mode.
* Interop (``vitkern.interop``): ``patch_timm`` (timm model in place), ``from_hf_vit`` / ``to_hf_vit``
  (Hugging Face transformers ViT weights), ``save_model`` / ``load_model`` (safetensors),
  ``register_timm_models`` (``timm.create_model("vitkern_<name>")``).
* Backend control: ``use_backend``, ``VITKERN_BACKEND``, ``available_backends``,
  ``last_backend``, ``backend_report``; ``BACKEND_TABLE`` declares each backend once
  (devices, dtypes, limits, availability probe, ``auto`` order) and
  ``not_supported_reason`` says why a backend cannot run an op's inputs.
"""

from vitkern import ops
from vitkern._backend import (
    BACKEND_TABLE,
    BACKENDS,
    Backend,
    BackendError,
    auto_order,
    available_backends,
    backend_report,
    get_backend,
    last_backend,
    not_supported_reason,
    usable_backends,
    use_backend,
)
from vitkern.interop import from_hf_vit, load_model, patch_timm, save_model, to_hf_vit
from vitkern.models import ViT, create_model, list_models

__version__ = "0.1.0"


def register_timm_models() -> list[str]:
    """Register every vitkern model in timm's registry as ``vitkern_<name>`` (idempotent;
    imports timm, which ``import vitkern`` alone does not). Returns the timm names."""
    from vitkern.interop.timm_registry import register_timm_models as _register

    return _register()


__all__ = [
    "BACKENDS",
    "BACKEND_TABLE",
    "Backend",
    "BackendError",
    "ViT",
    "auto_order",
    "available_backends",
    "backend_report",
    "create_model",
    "from_hf_vit",
    "get_backend",
    "load_model",
    "patch_timm",
    "register_timm_models",
    "save_model",
    "to_hf_vit",
    "last_backend",
    "list_models",
    "not_supported_reason",
    "ops",
    "usable_backends",
    "use_backend",
    "__version__",
]
