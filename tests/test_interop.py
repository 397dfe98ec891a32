"""Interop with the tools ViT users run: timm (in-place patching), Hugging Face
transformers ViT (weights both ways, against the real transformers model),
safetensors checkpoints, position-embedding resampling on load."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from conftest import assert_close_rel, randn

import vitkern

timm = pytest.importorskip("timm")


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize(
    "kw", [dict(), dict(init_values=1e-2, reg_tokens=2), dict(global_pool="avg", class_token=False)]
)
def test_patch_timm_keeps_logits_and_gradients(kw, gen):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    ref = _perturbed(
        VisionTransformer(img_size=48, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=5, **kw)
    )
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    assert vitkern.patch_timm(model) is model and model.vitkern_patched
    assert list(model.state_dict()) == keys and type(model) is type(ref)
    x = randn(2, 3, 48, 48, gen=gen)
    with torch.no_grad():
        out = model(x)
        assert {vitkern.backend_report()[op].backend for op in ("patch_embed", "sp_attention", "layernorm_mlp")}
        assert_close_rel(out, ref(x), 1e-5, "patched logits")
    model(x).logsumexp(-1).sum().backward()
    ref(x).logsumexp(-1).sum().backward()
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert_close_rel(p.grad, ref_params[n].grad, 1e-5, f"grad {n}")


def _small_timm(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    base = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return VisionTransformer(**{**base, **kw})


def test_patch_timm_rejects_unsupported_models_unchanged():
    from vitkern.interop import TimmConversionError

    m = _small_timm(attn_layer="diff")
    forwards = [vars(mod).get("forward") for mod in m.modules()]
    with pytest.raises(ValueError, match=r"VisionTransformer.*differential attention \(DiffAttention\)") as info:
        vitkern.patch_timm(m)
    assert isinstance(info.value, TimmConversionError)
    assert [vars(mod).get("forward") for mod in m.modules()] == forwards and not hasattr(m, "vitkern_patched")
    with pytest.raises(TimmConversionError, match="differential attention"):
        vitkern.ViT.from_timm(m)


def test_timm_validation_covers_every_block_before_any_change():
    """A refused feature in the last block only: nothing of the earlier blocks is patched."""
    from timm.models.vision_transformer import ParallelScalingBlock

    m = _small_timm(depth=3)
    m.blocks[2] = ParallelScalingBlock(32, 2, qkv_bias=True)
    with pytest.raises(ValueError, match=r"block 2 \(ParallelScalingBlock\)"):
        vitkern.patch_timm(m)
    assert not any("forward" in vars(mod) for mod in m.modules())


def test_timm_subclass_with_own_forward_is_refused():
    from timm.models.deit import VisionTransformerDistilled

    m = VisionTransformerDistilled(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="VisionTransformerDistilled"):
        vitkern.ViT.from_timm(m)


def _timm_variants():
    from timm.layers import HybridEmbed, RmsNorm, SwiGLU
    from timm.models.vision_transformer import ParallelThingsBlock, ResPostBlock

    return {
        "qk_norm": dict(qk_norm=True),
        "scale_norms": dict(scale_attn_norm=True, scale_mlp_norm=True),
        "eps_1e-5_tanh_gelu": dict(norm_layer=partial(torch.nn.LayerNorm, eps=1e-5), act_layer="gelu_tanh"),
        "quick_gelu_pre_norm": dict(act_layer="quick_gelu", pre_norm=True),
        "swiglu_rmsnorm": dict(mlp_layer=SwiGLU, norm_layer=RmsNorm, act_layer="silu", global_pool="avg"),
        "silu_rmsnorm": dict(norm_layer=partial(RmsNorm, eps=1e-5), act_layer="silu", init_values=0.1),
        "no_pos_embed_registers": dict(pos_embed="none", reg_tokens=2, no_embed_class=True, init_values=0.1),
        "map_head": dict(global_pool="map", class_token=False),
        "map_head_with_prefix": dict(global_pool="map", pool_include_prefix=True, reg_tokens=1),
        "avg_pool_include_prefix": dict(global_pool="avg", pool_include_prefix=True),
        "post_norm": dict(block_fn=ResPostBlock, init_values=0.5),
        "parallel_things": dict(block_fn=ParallelThingsBlock, init_values=0.1),
        "dynamic_img_size": dict(dynamic_img_size=True),
        "hybrid_stem": dict(
            embed_layer=partial(
                HybridEmbed,
                backbone=torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 4, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()),
            ),
            patch_size=1,
        ),
    }


@pytest.mark.parametrize(
    "variant",
    [
        "qk_norm",
        "scale_norms",
        "eps_1e-5_tanh_gelu",
        "quick_gelu_pre_norm",
        "swiglu_rmsnorm",
        "silu_rmsnorm",
        "no_pos_embed_registers",
        "map_head",
        "map_head_with_prefix",
        "avg_pool_include_prefix",
        "post_norm",
        "parallel_things",
        "dynamic_img_size",
        "hybrid_stem",
    ],
)
def test_timm_feature_converts_exactly(variant):
    """from_timm and patch_timm of each timm feature: logits and every gradient within 1e-5."""
    from vitkern.interop import zoo

    model = _perturbed(_small_timm(**_timm_variants()[variant])).eval()
    rec = zoo.check_zoo_model(variant, model=model)
    assert rec["outcome"] == "exact", rec.get("detail") or rec.get("reason")


def test_timm_gated_attention_converts_exactly():
    from vitkern.interop import zoo

    model = _small_timm()
    for blk in model.blocks:  # timm's gated attention (an elementwise sigmoid output gate)
        blk.attn.gate = torch.nn.Linear(32, 32)
    rec = zoo.check_zoo_model("gated", model=_perturbed(model).eval())
    assert rec["outcome"] == "exact", rec.get("detail") or rec.get("reason")


def _gated_variants():
    from timm.layers import GluMlp, RmsNorm, SwiGLU, SwiGLUPacked
    from timm.models.vision_transformer import ParallelThingsBlock

    return {
        "glumlp_gate_last_gelu": dict(mlp_layer=GluMlp, act_layer="gelu"),
        "swiglu_packed_silu_dinov2": dict(mlp_layer=SwiGLUPacked, act_layer="silu", init_values=1e-5, reg_tokens=4),
        "swiglu_rmsnorm_aimv2": dict(mlp_layer=SwiGLU, norm_layer=RmsNorm, act_layer="silu", proj_bias=False),
        "swiglu_packed_gate_first_tanh": dict(mlp_layer=SwiGLUPacked, act_layer="gelu_tanh", init_values=0.1),
        "swiglu_split_gelu_no_bias": dict(mlp_layer=SwiGLU, act_layer="gelu", proj_bias=False, global_pool="avg"),
        "glumlp_parallel_things": dict(mlp_layer=GluMlp, act_layer="gelu", block_fn=ParallelThingsBlock),
    }


@pytest.mark.parametrize(
    "variant",
    [
        "glumlp_gate_last_gelu",
        "swiglu_packed_silu_dinov2",
        "swiglu_rmsnorm_aimv2",
        "swiglu_packed_gate_first_tanh",
        "swiglu_split_gelu_no_bias",
        "glumlp_parallel_things",
    ],
)
def test_timm_gated_mlps_convert_exactly_and_fused(variant):
    """timm's gated MLPs (GluMlp packed, gate first or last; SwiGLU split) run on the fused
    layernorm_mlp(gated=...) in both conversions: logits and every gradient within 1e-5 of
    timm, nothing left unfused, the converted blocks hold vitkern's gated modules."""
    from vitkern.interop import zoo
    from vitkern.models.layers import GluMlp, SwiGLU, fusable_mlp

    model = _perturbed(_small_timm(**_gated_variants()[variant])).eval()
    rec = zoo.check_zoo_model(variant, model=model)
    assert rec["outcome"] == "exact", rec.get("detail") or rec.get("reason")
    assert rec["unfused"] == []
    ours = vitkern.ViT.from_timm(model)
    assert list(ours.state_dict()) == list(model.state_dict())
    ffns = [(f.norm, f.mlp) for b in ours.blocks for f in getattr(b, "ffns", [])] or [
        (b.norm2, b.mlp) for b in ours.blocks
    ]
    assert all(isinstance(m, (GluMlp, SwiGLU)) and fusable_mlp(n, m) for n, m in ffns)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours(x)
    assert vitkern.last_backend("layernorm_mlp_gated") in ("cpu", "reference")


transformers = pytest.importorskip("transformers")


def _hf_config(**kw):
    return transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_channels=3,
        num_labels=7,
        **kw,
    )


def test_from_hugging_face_vit_for_image_classification(gen):
    torch.manual_seed(0)
    hf = _perturbed(transformers.ViTForImageClassification(_hf_config())).eval()
    ours = vitkern.from_hf_vit(hf).eval()
    x = randn(2, 3, 32, 32, gen=gen)
    with torch.no_grad():
        assert_close_rel(ours(x), hf(pixel_values=x).logits, 1e-5, "logits vs transformers")


def test_from_hugging_face_vit_model_features(gen):
    torch.manual_seed(1)
    hf = _perturbed(transformers.ViTModel(_hf_config(), add_pooling_layer=False)).eval()
    ours = vitkern.from_hf_vit(hf).eval()
    x = randn(2, 3, 32, 32, gen=gen)
    with torch.no_grad():
        assert_close_rel(ours.forward_features(x), hf(pixel_values=x).last_hidden_state, 1e-5, "last_hidden_state")


def test_to_hugging_face_and_back(gen):
    torch.manual_seed(2)
    ours = _perturbed(vitkern.ViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=7)).eval()
    hf = vitkern.to_hf_vit(ours).eval()
    assert type(hf).__name__ == "ViTForImageClassification"
    x = randn(2, 3, 32, 32, gen=gen)
    with torch.no_grad():
        assert_close_rel(hf(pixel_values=x).logits, ours(x), 1e-5, "transformers logits of the converted model")
        back = vitkern.from_hf_vit(hf)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    with pytest.raises(ValueError, match="spatial prior"):
        vitkern.to_hf_vit(
            vitkern.ViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, spatial_prior=True, sp_layers=1)
        )


def test_safetensors_round_trip_and_resampled_load(tmp_path, gen):
    pytest.importorskip("safetensors")
    torch.manual_seed(3)
    model = _perturbed(
        vitkern.ViT(
            img_size=(32, 48),
            patch_size=16,
            embed_dim=32,
            depth=3,
            num_heads=2,
            num_classes=4,
            spatial_prior=True,
            sp_layers=2,
        )
    ).eval()
    path = str(tmp_path / "spvit.safetensors")
    vitkern.save_model(model, path)
    loaded = vitkern.load_model(path).eval()
    x = randn(2, 3, 32, 48, gen=gen)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    big = vitkern.load_model(path, img_size=(64, 80))  # 2x3 grid -> 4x5 grid
    from timm.layers import resample_abs_pos_embed

    expected = resample_abs_pos_embed(model.pos_embed, new_size=(4, 5), old_size=(2, 3), num_prefix_tokens=0)
    assert_close_rel(big.pos_embed, expected, 1e-6, "resampled pos_embed")
    with torch.no_grad():
        assert big(randn(1, 3, 64, 80, gen=gen)).shape == (1, 4)
    with pytest.raises(ValueError, match="not a vitkern checkpoint"):
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        vitkern.load_model(str(tmp_path / "other.safetensors"))


def test_timm_checkpoint_loads_at_another_image_size():
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(4)
    src = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3
    )
    ours = vitkern.ViT(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    ours.load_state_dict(src.state_dict())
    expected = resample_abs_pos_embed(src.pos_embed, new_size=(4, 4), old_size=(2, 2), num_prefix_tokens=1)
    assert_close_rel(ours.pos_embed, expected, 1e-6, "pos_embed resampled from a 2x2 to a 4x4 grid")


def test_from_hugging_face_transformers4_key_layout(gen):
    """Checkpoints saved by transformers < 5 name the layers encoder.layer.i.attention.attention.query
    etc.; from_hf_vit reads that layout too (a stand-in module carries the renamed state_dict)."""
    import re

    torch.manual_seed(5)
    hf = _perturbed(transformers.ViTForImageClassification(_hf_config())).eval()
    rename = [
        (r"vit\.layers\.(\d+)\.attention\.q_proj", r"vit.encoder.layer.\1.attention.attention.query"),
        (r"vit\.layers\.(\d+)\.attention\.k_proj", r"vit.encoder.layer.\1.attention.attention.key"),
        (r"vit\.layers\.(\d+)\.attention\.v_proj", r"vit.encoder.layer.\1.attention.attention.value"),
        (r"vit\.layers\.(\d+)\.attention\.o_proj", r"vit.encoder.layer.\1.attention.output.dense"),
        (r"vit\.layers\.(\d+)\.mlp\.fc1", r"vit.encoder.layer.\1.intermediate.dense"),
        (r"vit\.layers\.(\d+)\.mlp\.fc2", r"vit.encoder.layer.\1.output.dense"),
        (r"vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
    ]
    v4 = {}
    for k, v in hf.state_dict().items():
        for pat, rep in rename:
            k = re.sub(pat, rep, k)
        v4[k] = v
    assert any("attention.attention.query" in k for k in v4) and not any(".layers." in k for k in v4)

    class ViTForImageClassification(torch.nn.Module):  # noqa: N801 - the name from_hf_vit dispatches on
        def __init__(self):
            super().__init__()
            self.config = hf.config
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def state_dict(self, *args, **kwargs):
            return v4

    ours = vitkern.from_hf_vit(ViTForImageClassification().eval()).eval()
    x = randn(2, 3, 32, 32, gen=gen)
    with torch.no_grad():
        assert_close_rel(ours(x), hf(pixel_values=x).logits, 1e-5, "logits from a transformers-4 layout")


def test_from_timm_eps_and_tanh_gelu_are_constructor_options(tmp_path, gen):
    """LayerNorm eps 1e-5 and tanh GELU (CLIP/SigLIP-style) need no copied timm module: the
    converted model is rebuilt from its constructor arguments (save_model / load_model)."""
    ref = _perturbed(_small_timm(norm_layer=partial(torch.nn.LayerNorm, eps=1e-5), act_layer="gelu_tanh")).eval()
    ours = vitkern.ViT.from_timm(ref)
    assert "timm_modules" not in ours.config and ours.config["act_layer"] == "gelu_tanh"
    assert ours.config["norm_eps"] == 1e-5
    vitkern.save_model(ours, str(tmp_path / "m.safetensors"))
    loaded = vitkern.load_model(str(tmp_path / "m.safetensors")).eval()
    x = randn(2, 3, 32, 32, gen=gen)
    with torch.no_grad():
        assert_close_rel(loaded(x), ref(x), 1e-5, "reloaded tanh-GELU model")
    with pytest.raises(ValueError, match="act_layer"):
        vitkern.ViT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, act_layer="relu")


@pytest.mark.parametrize("act_layer", ["quick_gelu", "silu"])
def test_quick_gelu_and_silu_models_are_fully_fused_and_rebuildable(act_layer, tmp_path, gen):
    """CLIP's QuickGELU and SiLU MLPs run on the fused layernorm_mlp (nothing left unfused), and
    the converted model is rebuilt from its constructor arguments."""
    from vitkern.models.layers import fusable_mlp

    ref = _perturbed(_small_timm(act_layer=act_layer)).eval()
    ours = vitkern.ViT.from_timm(ref)
    assert "timm_modules" not in ours.config and ours.config["act_layer"] == act_layer
    assert all(fusable_mlp(b.norm2, b.mlp) and b.mlp.activation == act_layer for b in ours.blocks)
    vitkern.save_model(ours, str(tmp_path / "m.safetensors"))
    loaded = vitkern.load_model(str(tmp_path / "m.safetensors")).eval()
    patched = vitkern.patch_timm(copy.deepcopy(ref))
    assert patched.vitkern_unfused == []
    x = randn(2, 3, 32, 32, gen=gen)
    with torch.no_grad():
        for name, m in (("from_timm", ours), ("reloaded", loaded), ("patch_timm", patched)):
            assert_close_rel(m(x), ref(x), 1e-5, f"{act_layer} {name}")
        assert vitkern.last_backend("layernorm_mlp") in ("cpu", "triton")


def test_rmsnorm_mlp_blocks_are_fused(gen):
    """Blocks whose MLP norm is timm's RmsNorm convert onto the fused op (norm="rmsnorm")."""
    from timm.layers import RmsNorm

    from vitkern.models.layers import fusable_mlp

    ref = _perturbed(_small_timm(norm_layer=RmsNorm, act_layer="silu")).eval()
    ours = vitkern.ViT.from_timm(ref)
    assert all(type(b.norm2) is torch.nn.RMSNorm and fusable_mlp(b.norm2, b.mlp) for b in ours.blocks)
    assert vitkern.patch_timm(copy.deepcopy(ref)).vitkern_unfused == []


def test_from_timm_with_copied_modules_is_marked(tmp_path):
    ref = _small_timm(global_pool="map")
    ours = vitkern.ViT.from_timm(ref)
    assert any("AttentionPoolLatent" in p for p in ours.config["timm_modules"])
    vitkern.save_model(ours, str(tmp_path / "m.safetensors"))
    with pytest.raises(TypeError, match="timm_modules"):
        vitkern.load_model(str(tmp_path / "m.safetensors"))


def _hf_small(kind: str, **kw):
    torch.manual_seed(0)
    base = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16, num_channels=3
    )
    if kind == "dinov2":
        cfg = transformers.Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **base, **kw)
        return _perturbed(transformers.Dinov2Model(cfg)).eval()
    Config = transformers.DeiTConfig if kind.startswith("deit") else transformers.ViTConfig
    cfg = Config(intermediate_size=64, num_labels=kw.pop("num_labels", 3), **base, **kw)
    cls = {
        "deit": transformers.DeiTForImageClassification,
        "deit_model": transformers.DeiTModel,
        "vit": transformers.ViTForImageClassification,
    }[kind]
    return _perturbed(cls(cfg)).eval()


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("deit", {}),
        ("deit_model", {}),
        ("dinov2", {}),
        ("vit", dict(hidden_act="gelu_pytorch_tanh")),
        ("vit", dict(hidden_act="gelu_new")),
        ("vit", dict(hidden_act="gelu_python")),
        ("vit", dict(num_labels=0)),
    ],
)
def test_from_hugging_face_families_and_round_trip(kind, kw, gen):
    """DeiT, DINOv2 and ViT's GELU variants / num_labels=0 convert exactly (logits or
    last_hidden_state within 1e-5) and to_hf_vit gives back the same class and weights."""
    hf = _hf_small(kind, **kw)
    ours = vitkern.from_hf_vit(hf).eval()
    x = randn(2, 3, 32, 32, gen=gen)
    with torch.no_grad():
        out = hf(pixel_values=x)
        if hasattr(out, "logits"):  # num_labels=0: the class token's features, as ours(x)
            assert_close_rel(ours(x), out.logits, 1e-5, f"{kind} logits")
        else:
            assert_close_rel(ours.forward_features(x), out.last_hidden_state, 1e-5, f"{kind} last_hidden_state")
        back = vitkern.to_hf_vit(ours).eval()
        assert type(back).__name__ in (type(hf).__name__, "ViTModel"), type(back).__name__
        again = vitkern.from_hf_vit(back)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


def _hf_tower(kind: str, **kw):
    torch.manual_seed(0)
    base = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16
    )
    if kind == "clip":
        return _perturbed(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**base, **kw))).eval()
    return _perturbed(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**base, **kw))).eval()


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("clip", {}),  # OpenAI CLIP: QuickGELU
        ("clip", dict(hidden_act="gelu")),
        ("siglip", {}),  # tanh GELU, attention-pooling head
        ("siglip", dict(vision_use_head=False)),
    ],
)
def test_clip_and_siglip_vision_towers_convert_and_round_trip(kind, kw, gen):
    """CLIP / SigLIP vision towers: last_hidden_state = forward_features, pooler_output = the
    model's output (fp32, 1e-5) on the fused ops, every parameter gradient of the pooled output
    too; to_hf_vit gives back the same class and weights."""
    hf = _hf_tower(kind, **kw)
    ours = vitkern.from_hf_vit(hf).eval()
    x = randn(2, 3, 32, 32, gen=gen)
    with torch.no_grad():
        out = hf(pixel_values=x)
        assert_close_rel(ours.forward_features(x), out.last_hidden_state, 1e-5, f"{kind} last_hidden_state")
        if out.pooler_output is not None:
            assert_close_rel(ours(x), out.pooler_output, 1e-5, f"{kind} pooler_output")
        assert vitkern.last_backend("layernorm_mlp") in ("cpu", "triton")
        back = vitkern.to_hf_vit(ours).eval()
        assert type(back) is type(hf)
        assert_close_rel(back(pixel_values=x).last_hidden_state, out.last_hidden_state, 1e-6, "round trip")
        again = vitkern.from_hf_vit(back)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    # Gradients: HF's pooled (or mean) output against ours, every parameter.
    hf.zero_grad()
    ref_out = hf(pixel_values=x)
    (ref_out.pooler_output if ref_out.pooler_output is not None else ref_out.last_hidden_state.mean(1)).sum().backward()
    (ours(x) if ref_out.pooler_output is not None else ours.forward_features(x).mean(1)).sum().backward()
    grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    ours_grads = dict(ours.named_parameters())
    assert_close_rel(ours_grads["blocks.0.mlp.fc1.weight"].grad, grads[_fc1_key(grads)], 1e-5, "fc1 grad")
    assert_close_rel(ours_grads["patch_embed.proj.weight"].grad, grads[_pe_key(grads)], 1e-5, "patch grad")


def _fc1_key(grads):
    return next(k for k in grads if k.endswith("encoder.layers.0.mlp.fc1.weight"))


def _pe_key(grads):
    return next(k for k in grads if k.endswith("embeddings.patch_embedding.weight"))


def test_hugging_face_unsupported_models_are_refused_clearly():
    cfg = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16)
    teacher = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(intermediate_size=64, **cfg))
    with pytest.raises(ValueError, match="DeiTForImageClassificationWithTeacher"):
        vitkern.from_hf_vit(teacher)
    beit = transformers.BeitModel(transformers.BeitConfig(intermediate_size=64, **cfg))
    with pytest.raises(TypeError, match="BeitModel"):
        vitkern.from_hf_vit(beit)
    clip_relu = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(intermediate_size=64, hidden_act="relu", **cfg)
    )
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        vitkern.from_hf_vit(clip_relu)
    relu = transformers.ViTModel(transformers.ViTConfig(intermediate_size=64, hidden_act="relu", **cfg))
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        vitkern.from_hf_vit(relu)
    with pytest.raises(ValueError, match="timm modules"):
        vitkern.to_hf_vit(vitkern.ViT.from_timm(_small_timm(qk_norm=True)))


def test_patch_timm_lists_what_stays_unfused():
    from timm.layers import SwiGLU

    plain = vitkern.patch_timm(_small_timm())
    assert plain.vitkern_unfused == []
    glu = vitkern.patch_timm(_small_timm(mlp_layer=SwiGLU, act_layer="silu", global_pool="map", class_token=False))
    assert glu.vitkern_unfused == ["attn_pool"]  # the SwiGLU MLPs run on layernorm_mlp(gated="split")
    # An inner norm inside the gated MLP (scale_mlp_norm) keeps it timm's.
    scaled = vitkern.patch_timm(_small_timm(mlp_layer=SwiGLU, act_layer="silu", scale_mlp_norm=True))
    assert scaled.vitkern_unfused == ["blocks.0.mlp", "blocks.1.mlp"]
    assert all("forward" in vars(b.attn) for b in glu.blocks)  # the attention is fused all the same
