"""The timm zoo coverage harness behind ``vitkern info --timm-zoo`` and tests/test_zoo.py: every
architecture of timm's VisionTransformer modules built at test size (:func:`build_small_timm`),
converted with ``ViT.from_timm`` and ``patch_timm`` and compared with timm, logits and every
gradient (:func:`check_zoo_model`), over the whole zoo (:func:`timm_zoo_report`) and summarised
(:func:`summarize_zoo`)."""

from __future__ import annotations

import copy
import traceback
from collections import Counter
from typing import Any

import torch
import torch.nn as nn

from vitkern.interop.patch import patch_timm
from vitkern.interop.timm import TimmConversionError
from vitkern.models import ViT

__all__ = ["build_small_timm", "check_zoo_model", "summarize_zoo", "timm_zoo_archs", "timm_zoo_report"]

_ZOO_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit")


def timm_zoo_archs() -> list[str]:
    """timm's registered architectures from its VisionTransformer modules (plain, hybrid,
    DeiT), sorted. Most are ``VisionTransformer``; the few subclasses (distilled DeiT) are
    kept so that their refusal is checked too."""
    import timm

    return sorted(n for n in timm.list_models() if _model_module(n) in _ZOO_MODULES)


def _model_module(name: str) -> str:
    from timm.models import _registry

    return _registry._model_to_module.get(name, "")


def build_small_timm(name: str, seed: int = 0, device: str = "cpu") -> nn.Module:
    """``name`` at test size: depth 1, embed_dim 64 (96 or 128 where the MLP needs it) with
    4 heads, 5 classes, a 2x2 patch grid (hybrid CNN stems: 32 px images), every parameter
    perturbed (so LayerScale, zero-initialised biases and norms all matter), in eval mode.
    ``device="meta"``: the structure only (no weights, fast)."""
    import timm

    hybrid = _model_module(name) == "vision_transformer_hybrid"
    tries = [dict(embed_dim=d, num_heads=4) for d in (64, 96, 128)] + [{}]
    err: Exception | None = None
    for extra in tries:
        try:
            torch.manual_seed(seed)
            kw = dict(pretrained=False, depth=1, num_classes=5, **extra)
            if hybrid:
                kw["img_size"] = 32
            else:
                with torch.device("meta"):
                    probe = timm.create_model(name, pretrained=False, depth=1, num_classes=5, **extra)
                kw["img_size"] = 2 * int(probe.patch_embed.patch_size[0])
            with torch.device(device):
                model = timm.create_model(name, **kw)
            break
        except Exception as e:  # noqa: BLE001 - a constructor rejecting the small overrides
            err = e
    else:
        raise RuntimeError(f"timm could not build {name} at test size: {err}")
    if device == "meta":  # structure only
        return model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def _logits_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _compare(ours: nn.Module, ref: tuple, x: torch.Tensor, tol: float) -> str | None:
    """None if logits and every gradient agree with ``ref`` (timm's logits and gradients)
    within ``tol`` (relative), else what differs."""
    out_ref, grads_ref = ref
    out, grads = _logits_and_grads(ours, x)
    if out.shape != out_ref.shape:
        return f"logits shape {tuple(out.shape)} vs timm {tuple(out_ref.shape)}"
    err = _rel(out, out_ref)
    if not err <= tol:
        return f"logits {err:.2e} relative off timm"
    if set(grads) != set(grads_ref):
        return f"parameters differ from timm's: {sorted(set(grads) ^ set(grads_ref))[:4]}"
    # A gradient that is zero in exact arithmetic (e.g. a k_norm bias: adding a constant vector
    # to every key shifts each query's scores by one constant, which the softmax cancels) is
    # rounding noise in both models; relative to itself it is meaningless. Such a gradient
    # (timm's below 1e-4 of the largest gradient) must be equally negligible in ours.
    scale = max((float(r.abs().max()) for r in grads_ref.values() if r is not None and r.numel()), default=0.0)
    for n, g in grads.items():
        r = grads_ref[n]
        if (g is None) != (r is None):
            return f"gradient of {n}: present in one model only"
        if g is None:
            continue
        if r.numel() and float(r.abs().max()) < 1e-4 * scale:
            if not float(g.abs().max()) < 1e-4 * scale:
                return f"gradient of {n} is {float(g.abs().max()):.2e}, timm's is zero up to rounding"
        elif not _rel(g, r) <= tol:
            return f"gradient of {n} {_rel(g, r):.2e} relative off timm"
    return None


def check_zoo_model(name: str, tol: float = 1e-5, model: nn.Module | None = None) -> dict[str, Any]:
    """Build ``name`` small (:func:`build_small_timm`, or take ``model``) and run both
    conversions against timm (fp32 logits and every parameter gradient). ``outcome`` is
    "exact" (both conversions agree within ``tol``), "refused" (both raise
    TimmConversionError and patch_timm changed nothing), "wrong" (converted, but off timm)
    or "unclear" (any other exception, or the two conversions disagree about refusing)."""
    rec: dict[str, Any] = dict(name=name)
    ref = build_small_timm(name) if model is None else model
    rec["class"] = type(ref).__name__
    hw = ref.patch_embed.img_size
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    outcomes = {}
    try:
        expected = _logits_and_grads(ref, x)
        try:
            ours = ViT.from_timm(ref)
            outcomes["from_timm"] = _compare(ours, expected, x, tol) or "exact"
        except TimmConversionError as e:
            outcomes["from_timm"] = "refused"
            rec["reason"] = str(e)
        patched = copy.deepcopy(ref)
        try:
            patch_timm(patched)
            outcomes["patch_timm"] = _compare(patched, expected, x, tol) or "exact"
            rec["unfused"] = patched.vitkern_unfused
        except TimmConversionError as e:
            touched = hasattr(patched, "vitkern_patched") or any("forward" in vars(m) for m in patched.modules())
            outcomes["patch_timm"] = "refused" if not touched else "refused after modifying the model"
            rec.setdefault("reason", str(e))
    except Exception as e:  # noqa: BLE001 - anything else is an unclear outcome
        rec.update(outcome="unclear", detail=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        return rec
    if set(outcomes.values()) == {"exact"}:
        rec["outcome"] = "exact"
    elif set(outcomes.values()) == {"refused"}:
        rec["outcome"] = "refused"
    elif all(v in ("exact", "refused") for v in outcomes.values()):
        rec.update(outcome="unclear", detail=f"conversions disagree: {outcomes}")
    else:
        rec.update(outcome="wrong", detail=str(outcomes))
    return rec


def timm_zoo_report(names: list[str] | None = None, progress: Any = None) -> list[dict[str, Any]]:
    """:func:`check_zoo_model` for every architecture of :func:`timm_zoo_archs`."""
    out = []
    for name in names if names is not None else timm_zoo_archs():
        out.append(check_zoo_model(name))
        if progress is not None:
            progress(out[-1])
    return out


def summarize_zoo(records: list[dict[str, Any]]) -> str:
    """Coverage over the exact ``VisionTransformer`` class (subclasses listed apart)."""
    core = [r for r in records if r.get("class") == "VisionTransformer"]
    other = [r for r in records if r.get("class") != "VisionTransformer"]
    c = Counter(r["outcome"] for r in core)
    n = len(core)
    lines = [
        f"timm VisionTransformer architectures: {n}",
        f"  convert exactly (from_timm and patch_timm, logits and gradients): {c['exact']}"
        f" ({100 * c['exact'] / max(n, 1):.0f}%)",
        f"    of which fully fused: {sum(1 for r in core if r['outcome'] == 'exact' and not r.get('unfused'))}",
        f"  refused clearly: {c['refused']}",
        f"  wrong: {c['wrong']}",
        f"  unclear: {c['unclear']}",
    ]
    if other:
        oc = Counter(r["outcome"] for r in other)
        lines.append(f"VisionTransformer subclasses (e.g. distilled DeiT): {len(other)}, {dict(oc)}")
    reasons = Counter()
    for r in records:
        if r["outcome"] == "refused":
            reasons[r.get("reason", "").split(": ", 1)[-1][:110]] += 1
    if reasons:
        lines.append("refused, by reason:")
        lines += [f"  {k:3d}  {reason}" for reason, k in reasons.most_common()]
    for r in records:
        if r["outcome"] in ("wrong", "unclear"):
            lines.append(f"  {r['outcome'].upper()}: {r['name']}: {r.get('detail')}")
    return "\n".join(lines)
