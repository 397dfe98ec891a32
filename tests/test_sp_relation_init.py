"""SP-ViT's relation MLP starts as the public SP-ViT code initialises it: W1 truncated
normal (std 0.02), b1 = 0, w2 = 0, b2 = 1 (a fresh SP-SA layer is plain attention)."""

from __future__ import annotations

import torch

import vitkern


def test_relation_mlp_initialisation():
    torch.manual_seed(0)
    model = vitkern.ViT(
        img_size=64, patch_size=16, embed_dim=96, depth=3, num_heads=6, spatial_prior=True, sp_layers=2, sp_hidden=64
    )
    for blk in model.blocks[:2]:
        rel = blk.attn.spatial_relation
        w1 = rel.w1.detach()
        assert w1.shape == (6, 64, 2)
        assert 0.017 < w1.std().item() < 0.023 and abs(w1.mean().item()) < 0.003, w1.std()
        assert w1.abs().max().item() < 0.1  # std 0.02: nothing like nn.Linear's uniform(+-0.707)
        assert torch.equal(rel.b1.detach(), torch.zeros(6, 64))
        assert torch.equal(rel.w2.detach(), torch.zeros(6, 64))
        assert torch.equal(rel.b2.detach(), torch.ones(6))
        # so the table is all ones on any grid: the layer starts as plain attention
        assert torch.equal(rel((4, 5)), torch.ones(6, 7, 9))
    assert model.blocks[2].attn.spatial_relation is None
