"""Alias of earlier releases' ``vitkern.zoo``: the timm conversion now lives in
``vitkern.interop.timm`` / ``vitkern.interop.from_timm`` and the zoo harness in
``vitkern.interop.zoo``. New code imports from there."""

from vitkern.interop.from_timm import vit_from_timm
from vitkern.interop.timm import TimmConversionError, check_timm_model, timm_conversion_problems
from vitkern.interop.zoo import build_small_timm, check_zoo_model, summarize_zoo, timm_zoo_archs, timm_zoo_report

__all__ = [
    "TimmConversionError",
    "build_small_timm",
    "check_timm_model",
    "check_zoo_model",
    "summarize_zoo",
    "timm_conversion_problems",
    "timm_zoo_archs",
    "timm_zoo_report",
    "vit_from_timm",
]
