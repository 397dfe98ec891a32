"""vitkern.ViT against the real timm VisionTransformer, and the SP-ViT mode."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel

import vitkern
from vitkern import ViT

timm = pytest.importorskip("timm")

SMALL = dict(embed_dim=64, depth=2, num_heads=4, num_classes=10)

PARITY_CASES = {
    "cls_token": dict(img_size=64, patch_size=16, **SMALL),
    "avg_pool_no_cls": dict(img_size=64, patch_size=16, class_token=False, global_pool="avg", **SMALL),
    "reg_tokens": dict(img_size=48, patch_size=16, reg_tokens=4, **SMALL),
    "reg_no_embed_class": dict(img_size=48, patch_size=16, reg_tokens=2, no_embed_class=True, **SMALL),
    "layerscale": dict(img_size=64, patch_size=16, init_values=1e-1, **SMALL),
    "pre_norm_fc_norm": dict(img_size=32, patch_size=8, pre_norm=True, fc_norm=True, global_pool="avg", **SMALL),
    "patch14_odd_grid": dict(img_size=(70, 42), patch_size=14, **SMALL),  # 5 x 3 grid
    "no_qkv_bias_mlp3": dict(img_size=32, patch_size=8, qkv_bias=False, mlp_ratio=3.0, **SMALL),
}


def _timm_and_ours(kwargs, seed=0):
    torch.manual_seed(seed)
    ref = timm.models.vision_transformer.VisionTransformer(**kwargs)
    with torch.no_grad():  # make every parameter matter (timm inits biases, tokens to ~0)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = ViT(**kwargs)
    missing = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return ref, ours


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_and_grads_match_timm(case):
    kwargs = PARITY_CASES[case]
    ref, ours = _timm_and_ours(kwargs)
    size = kwargs["img_size"] if isinstance(kwargs["img_size"], tuple) else (kwargs["img_size"],) * 2
    x = torch.randn(3, 3, *size)
    ref.eval(), ours.eval()
    a, b = ref(x), ours(x)
    assert_close_rel(b, a, 1e-5, f"{case} logits")
    # Gradients of every parameter and of the input.
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(a)
    (ref(xa) * g).sum().backward()
    (ours(xb) * g).sum().backward()
    assert_close_rel(xb.grad, xa.grad, 1e-5, f"{case} d images")
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert_close_rel(p.grad, ref_params[name].grad, 1e-5, f"{case} d {name}")


def test_dynamic_img_size_at_other_resolution():
    kwargs = dict(img_size=64, patch_size=16, dynamic_img_size=True, **SMALL)
    ref, ours = _timm_and_ours(kwargs)
    ref.eval(), ours.eval()
    for size in [(64, 64), (80, 48), (112, 96)]:
        x = torch.randn(2, 3, *size)
        assert_close_rel(ours(x), ref(x), 1e-5, f"dynamic {size}")


def test_from_timm_vit_small_patch16_224():
    """The user-facing claim: from_timm of the real vit_small gives timm's logits."""
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    ours = ViT.from_timm(ref).eval()
    assert not ours.training
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_close_rel(ours(x), ref(x), 1e-5, "vit_small_patch16_224")


def test_from_timm_rejects_unsupported_features():
    ref = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, attn_layer="diff", **SMALL)
    with pytest.raises(ValueError, match="differential attention"):
        ViT.from_timm(ref)


def test_fixed_size_model_rejects_other_sizes():
    m = ViT(img_size=32, patch_size=8, **SMALL)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        m(torch.randn(1, 3, 40, 32))


def test_unknown_kwargs_and_pool_raise():
    with pytest.raises(TypeError, match="unsupported keyword"):
        ViT(bogus=1)
    with pytest.raises(ValueError, match="global_pool"):
        ViT(global_pool="map")


@pytest.mark.parametrize("name", vitkern.list_models())
def test_create_model_configs(name):
    m = vitkern.create_model(name, num_classes=7)
    cfg = vitkern.models.model_config(name)
    assert len(m.blocks) == cfg["depth"] and m.embed_dim == cfg["embed_dim"]
    assert m.blocks[0].attn.num_heads == cfg["num_heads"]
    if name.startswith("vit_"):
        t = timm.create_model(name, pretrained=False, num_classes=7)
        assert set(m.state_dict()) == set(t.state_dict())
        assert all(m.state_dict()[k].shape == v.shape for k, v in t.state_dict().items())
    else:
        sp = [b.attn.spatial_relation is not None for b in m.blocks]
        assert sp == [i < cfg["sp_layers"] for i in range(cfg["depth"])]
        assert m.blocks[0].mlp.fc1.out_features == 3 * cfg["embed_dim"]
        assert m.pos_embed.shape[1] == 196  # no class slot: late insertion


# ----------------------------------------------------------------------------- SP-ViT
SP = dict(img_size=(48, 80), patch_size=16, embed_dim=48, depth=4, num_heads=3, num_classes=5)  # 3 x 5 grid


def test_spvit_with_zero_sp_layers_equals_plain_vit():
    sp = ViT(spatial_prior=True, sp_layers=0, **SP).eval()
    plain = ViT(no_embed_class=True, **SP).eval()
    plain.load_state_dict(sp.state_dict(), strict=True)
    x = torch.randn(2, 3, 48, 80)
    torch.testing.assert_close(sp(x), plain(x), rtol=0, atol=0)


def _manual_plain_forward(model: ViT, x: torch.Tensor, k: int) -> torch.Tensor:
    """Same weights, plain attention (omega=None) in the first k blocks, class token
    inserted after them: written out with the reference ops only."""
    from vitkern.ops import layernorm_mlp_reference, patch_embed_reference, sp_attention_reference

    grid = model.patch_embed.grid_for(x)
    h = patch_embed_reference(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.pos_embed)
    for i, blk in enumerate(model.blocks):
        if i == k:
            h = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), h], dim=1)
        B, N, C = h.shape
        q, kk, v = blk.attn.split_qkv(blk.norm1(h))
        a = sp_attention_reference(q, kk, v).transpose(1, 2).reshape(B, N, C)
        h = h + blk.attn.proj(a)
        n2 = blk.norm2
        h = layernorm_mlp_reference(
            h, n2.weight, n2.bias, blk.mlp.fc1.weight, blk.mlp.fc1.bias, blk.mlp.fc2.weight, blk.mlp.fc2.bias
        )
        assert grid == (3, 5)
    if k == len(model.blocks):
        h = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), h], dim=1)
    return model.head(model.norm(h)[:, 0])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_fresh_spvit_is_plain_attention_with_late_class_token(k):
    torch.manual_seed(1)
    m = ViT(spatial_prior=True, sp_layers=k, **SP).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "spatial_relation" not in name:  # keep omega == 1 (w2 = 0, b2 = 1)
                p.add_(torch.randn_like(p) * 0.05)
    for blk in m.blocks[:k]:
        torch.testing.assert_close(blk.attn.omega((3, 5)), torch.ones(3, 5, 9))
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        assert_close_rel(m(x), _manual_plain_forward(m, x, k), 1e-6, f"fresh SP-ViT K={k}")


def test_spvit_prior_changes_output_and_trains():
    torch.manual_seed(2)
    m = ViT(spatial_prior=True, sp_layers=2, **SP)
    with torch.no_grad():
        m.blocks[0].attn.qkv.weight.mul_(20.0)  # logits large enough for the prior to matter
    x = torch.randn(2, 3, 48, 80)
    base = m(x).detach()
    with torch.no_grad():
        m.blocks[0].attn.spatial_relation.w2.normal_()
    assert (m(x) - base).abs().max() > 1e-4  # omega is really applied
    loss = m(x).logsumexp(-1).sum()
    loss.backward()
    rel = m.blocks[0].attn.spatial_relation
    for p in (rel.w1, rel.b1, rel.w2, rel.b2):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert m.blocks[2].attn.spatial_relation is None


def test_spvit_any_image_size_without_interpolation_of_omega():
    m = ViT(spatial_prior=True, sp_layers=2, dynamic_img_size=True, **SP).eval()
    for size in [(48, 80), (64, 64), (32, 112)]:
        assert m(torch.randn(1, 3, *size)).shape == (1, 5)


def test_relation_mlp_offsets_are_dx_dy():
    from vitkern.models.layers import SpatialRelation

    rel = SpatialRelation(num_heads=2, hidden=4)
    with torch.no_grad():
        rel.w1.zero_()
        rel.w1[:, 0, 0] = 1.0  # hidden unit 0 = relu(dx)
        rel.w1[:, 1, 1] = 1.0  # hidden unit 1 = relu(dy)
        rel.b1.zero_()
        rel.w2.zero_()
        rel.w2[0, 0] = 1.0
        rel.w2[1, 1] = 1.0
        rel.b2.zero_()
    tab = rel((2, 3))  # (2, 3, 5): [h, dy + 1, dx + 2]
    assert tab.shape == (2, 3, 5)
    assert tab[0, 1, 4] == 2.0 and tab[0, 0, 4] == 2.0 and tab[0, 1, 0] == 0.0  # head 0: relu(dx)
    assert tab[1, 2, 2] == 1.0 and tab[1, 0, 2] == 0.0  # head 1: relu(dy)


def test_attention_maps_apply_omega():
    torch.manual_seed(3)
    m = ViT(spatial_prior=True, sp_layers=2, **SP).eval()
    with torch.no_grad():
        m.blocks[0].attn.spatial_relation.w2.normal_()
    x = torch.randn(1, 3, 48, 80)
    p = m.attention_maps(x, 0)
    assert p.shape == (1, 3, 15, 15)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 3, 15))
    p_late = m.attention_maps(x, 3)
    assert p_late.shape == (1, 3, 16, 16)  # class token present after block K
