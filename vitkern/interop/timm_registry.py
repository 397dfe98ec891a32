"""vitkern's models in timm's model registry.

After :func:`register_timm_models` (or ``import vitkern.interop.timm_registry``, which
calls it; ``vitkern.models.timm_registry`` is kept as an alias of this module), every name
of :func:`vitkern.list_models` is also a timm model name with a ``vitkern_`` prefix::

    import timm, vitkern
    vitkern.register_timm_models()
    model = timm.create_model("vitkern_vit_small_patch16_224", num_classes=10)

The models are built by timm's ``build_model_with_cfg``, so everything timm's factory
offers works: ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)`` (a timm or
vitkern checkpoint; the head is dropped and re-initialised when ``num_classes`` differs from
the checkpoint's), ``features_only=True`` (a backbone returning block outputs as feature
maps), ``checkpoint_path=...``, and the model's ``pretrained_cfg`` (ViT preprocessing: mean
and std 0.5, crop 0.9, bicubic) that timm's data pipeline reads.

Registration is explicit because importing timm takes seconds; ``import vitkern`` alone
does not import timm. ``python -m vitkern.timm_run script.py ...`` registers and then runs
one of timm's scripts (train.py, validate.py, benchmark.py).
"""

from __future__ import annotations

from typing import Any

from vitkern.models.registry import list_models, model_config, model_kwargs
from vitkern.models.vit import ViT, vit_pretrained_cfg

__all__ = ["TIMM_PREFIX", "register_timm_models", "timm_name"]

TIMM_PREFIX = "vitkern_"

# Read by timm's register_model (the entry point's module must define it).
default_cfgs: dict[str, Any] = {}
_registered: list[str] = []


def timm_name(name: str) -> str:
    """The timm registry name of a vitkern model name."""
    return TIMM_PREFIX + name


def _entrypoint(name: str):
    variant = timm_name(name)

    def create(pretrained: bool = False, **kwargs: Any) -> ViT:
        from timm.models import build_model_with_cfg

        out_indices = kwargs.pop("out_indices", 3)
        # timm's factory passes the placement through (DistillationTeacher does); the model
        # is built on the CPU in float32 and moved, after any pretrained weights are loaded.
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        model = build_model_with_cfg(
            ViT,
            variant,
            pretrained,
            feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
            **model_kwargs(name, **kwargs),
        )
        return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model

    create.__name__ = create.__qualname__ = variant
    create.__module__ = __name__
    create.__doc__ = f"vitkern's {name} ({model_config(name)}) built by timm's factory."
    return create


def register_timm_models() -> list[str]:
    """Register ``vitkern_<name>`` in timm's registry for every vitkern model name
    (idempotent); returns the registered timm names. Needs timm installed."""
    if _registered:
        return list(_registered)
    try:
        from timm.models import generate_default_cfgs, register_model
    except ImportError as e:
        raise ImportError("register_timm_models needs timm: pip install 'vitkern[timm]'") from e
    for name in list_models():
        variant = timm_name(name)
        cfg = vit_pretrained_cfg(num_classes=1000, input_size=(3, 224, 224))
        for key in ("architecture", "tag"):
            cfg.pop(key)
        default_cfgs.update(generate_default_cfgs({variant: cfg}))
        fn = _entrypoint(name)
        globals()[variant] = fn
        register_model(fn)
        _registered.append(variant)
    return list(_registered)


register_timm_models()
