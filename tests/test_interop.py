"""Interop with the tools ViT users run: timm (in-place patching), Hugging Face
transformers ViT (weights both ways, against the real transformers model),
safetensors checkpoints, position-embedding resampling on load."""

from __future__ import annotations

import copy

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


def test_patch_timm_rejects_unsupported_models_unchanged():
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, qk_norm=True)
    forward_before = m.blocks[0].forward
    with pytest.raises(ValueError, match="qk_norm"):
        vitkern.patch_timm(m)
    assert m.blocks[0].forward == forward_before and not hasattr(m, "vitkern_patched")


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
