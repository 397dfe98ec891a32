"""timm's ViT zoo: every architecture of timm's VisionTransformer modules, built at test
size (depth 1, embed_dim 64, 2x2 patch grid, perturbed weights), converted with
ViT.from_timm and patch_timm and compared with timm (fp32 logits and every parameter
gradient within 1e-5 relative). Each architecture must convert exactly or be refused
with TimmConversionError by both conversions (patch_timm leaving the model untouched);
a wrong or unclear outcome fails, and so does a change of the refused set below.

Architectures whose test-size models are structurally identical (same modules, same
settings; e.g. vit_base_patch16_224 and vit_base_patch16_384 both become the same tiny
model) are checked once; every architecture is still listed and recorded."""

from __future__ import annotations

import hashlib

import pytest
import torch

timm = pytest.importorskip("timm")

from vitkern.interop import zoo  # noqa: E402

# Refused on purpose (no exact counterpart on the fused ops); everything else must convert.
REFUSED_BLOCKS = ("ParallelScalingBlock", "DiffParallelScalingBlock", "DiffAttention")
REFUSED_CLASSES = ("VisionTransformerDistilled",)

_SIZES = ("tiny", "small", "medium", "base", "large", "huge", "giant", "gigantic")


def _size_rank(name: str) -> int:
    words = name.split("_")
    return next((i for i, w in enumerate(_SIZES) if w in words), len(_SIZES))


ARCHS = sorted(zoo.timm_zoo_archs(), key=lambda n: (_size_rank(n), n))
_RESULTS: dict[str, dict] = {}
_BY_SIGNATURE: dict[str, dict] = {}


def _signature(model: torch.nn.Module) -> str:
    """What the conversion can depend on: the module tree with every setting (repr), the
    parameter shapes and the model-level options that repr does not show. A hybrid stem is
    an opaque unfused module to the conversion (copied, its own forward): the stem and
    backbone classes stand for it, so each kind of stem is checked once, on the smallest
    model (ARCHS is ordered small to large)."""
    attrs = [
        getattr(model, a, None)
        for a in (
            "global_pool",
            "no_embed_class",
            "num_prefix_tokens",
            "num_reg_tokens",
            "dynamic_img_size",
            "pool_include_prefix",
            "has_class_token",
        )
    ]
    backbone = getattr(model.patch_embed, "backbone", None)
    text = repr(model)
    if backbone is not None:
        parts = [f"{n}: {m!r}" for n, m in model.named_children() if n != "patch_embed"]
        text = "\n".join([f"{type(model.patch_embed).__name__}({type(backbone).__name__})", *parts])
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters() if not n.startswith("patch_embed.")]
    extra = [model.pos_embed is None, type(model).__name__]
    return hashlib.sha1(repr((text, shapes, attrs, extra)).encode()).hexdigest()


def _expect_refused(model: torch.nn.Module) -> bool:
    kinds = {type(m).__name__ for m in model.modules()}
    return type(model).__name__ in REFUSED_CLASSES or bool(kinds & set(REFUSED_BLOCKS))


def test_zoo_list_is_large():
    assert len(ARCHS) >= 190, f"only {len(ARCHS)} architectures found in timm {timm.__version__}"


@pytest.mark.parametrize("name", ARCHS)
def test_timm_zoo_architecture(name):
    model = zoo.build_small_timm(name, device="meta")
    sig = _signature(model)
    rec = _BY_SIGNATURE.get(sig)
    if rec is None:
        rec = zoo.check_zoo_model(name)
        _BY_SIGNATURE[sig] = rec
    _RESULTS[name] = {**rec, "name": name, "class": type(model).__name__, "checked_as": rec["name"]}
    assert rec["outcome"] in ("exact", "refused"), f"{name}: {rec['outcome']}: {rec.get('detail')}"
    if _expect_refused(model):
        assert rec["outcome"] == "refused", f"{name} converted though it uses a refused feature"
        assert type(model).__name__ in rec["reason"] or any(b in rec["reason"] for b in REFUSED_BLOCKS)
    else:
        assert rec["outcome"] == "exact", f"{name} refused: {rec.get('reason')}"


def test_zoo_coverage_summary():
    """The coverage over the architectures checked in this run (all of them in CI)."""
    if len(_RESULTS) < len(ARCHS):
        pytest.skip("coverage is only computed when every architecture ran")
    records = list(_RESULTS.values())
    text = zoo.summarize_zoo(records)
    checked = len({r["checked_as"] for r in records})
    print(f"{text}\n{checked} distinct test-size models checked for {len(records)} architectures")
    core = [r for r in records if r["class"] == "VisionTransformer"]
    exact = sum(r["outcome"] == "exact" for r in core)
    assert exact / len(core) >= 0.9, text
    assert not [r for r in records if r["outcome"] not in ("exact", "refused")], text


def test_cli_info_timm_zoo(monkeypatch, capsys):
    """`vitkern info --timm-zoo` prints the coverage (here over two architectures)."""
    from vitkern.cli import main

    monkeypatch.setattr(zoo, "timm_zoo_archs", lambda: ["vit_tiny_patch16_224", "vit_base_patch16_xp_224"])
    assert main(["info", "--timm-zoo", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "timm VisionTransformer architectures: 2" in out
    assert "logits and gradients): 1 (50%)" in out and "refused clearly: 1" in out
    assert "wrong: 0" in out and "unclear: 0" in out
    assert "refused  vit_base_patch16_xp_224" in out and "ParallelScalingBlock" in out
