"""vitkern and other libraries' models: everything that knows timm's or Hugging Face's classes.

* :mod:`.timm`: what timm's VisionTransformer classes mean (the class table, the checks,
  :class:`TimmConversionError`, timm's pooling head);
* :mod:`.from_timm`: :func:`vit_from_timm`, the conversion behind ``vitkern.ViT.from_timm``;
* :mod:`.patch`: :func:`patch_timm` (a timm model switched in place onto the fused ops);
* :mod:`.hf`: Hugging Face ViT / DeiT / DINOv2 and CLIP / SigLIP vision towers, both ways;
* :mod:`.checkpoint`: :func:`save_model` / :func:`load_model` (safetensors);
* :mod:`.timm_registry`: vitkern's models in timm's registry (``vitkern.register_timm_models``);
* :mod:`.zoo`: the timm zoo coverage harness (``vitkern info --timm-zoo``, tests/test_zoo.py).

The dependency runs one way: this package imports ``vitkern.models``, never the reverse.
``ViT.from_timm`` finds its conversion through ``vitkern.models.vit.set_timm_converter``, called
below when this package is imported (``import vitkern`` imports it). timm, transformers and
safetensors are imported only by the functions that need them.
"""

from vitkern.interop.checkpoint import load_model, save_model
from vitkern.interop.from_timm import vit_from_timm
from vitkern.interop.hf import from_hf_vit, to_hf_vit
from vitkern.interop.patch import patch_timm
from vitkern.interop.timm import TimmConversionError, check_timm_model, timm_conversion_problems
from vitkern.models.vit import set_timm_converter

set_timm_converter(vit_from_timm)

__all__ = [
    "TimmConversionError",
    "check_timm_model",
    "from_hf_vit",
    "load_model",
    "patch_timm",
    "save_model",
    "timm_conversion_problems",
    "to_hf_vit",
    "vit_from_timm",
]
