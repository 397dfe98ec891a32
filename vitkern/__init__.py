"""vitkern: fused kernels for Vision Transformers.

* ``vitkern.ops``: ``patch_embed``, ``sp_attention`` (spatial-prior flash attention),
  ``layernorm_mlp``, each with a plain-PyTorch reference and selectable backends.
* ``vitkern.ViT``: a drop-in for timm's VisionTransformer, with an SP-ViT mode.
* Backend control: ``use_backend``, ``VITKERN_BACKEND``, ``available_backends``,
  ``last_backend``, ``backend_report``.
"""

from vitkern import ops
from vitkern._backend import (
    BACKENDS,
    BackendError,
    available_backends,
    backend_report,
    last_backend,
    use_backend,
)
from vitkern.models import ViT, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "ViT",
    "available_backends",
    "backend_report",
    "create_model",
    "last_backend",
    "list_models",
    "ops",
    "use_backend",
    "__version__",
]
