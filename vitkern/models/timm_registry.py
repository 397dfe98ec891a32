"""Alias of ``vitkern.interop.timm_registry`` (its earlier place; importing it registers
vitkern's models in timm's registry). The one module of models/ that imports interop: nothing
in vitkern imports it (tests/test_layering.py checks both)."""

from vitkern.interop.timm_registry import TIMM_PREFIX, register_timm_models, timm_name  # noqa: F401
