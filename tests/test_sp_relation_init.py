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


def test_eval_table_cache_follows_every_parameter_change_and_grid():
    """The relation MLP's table is reused across eager no-grad calls only while the grid and
    every parameter value are the same (a write through .data included); with autograd it is
    recomputed and differentiable."""
    rel = vitkern.models.layers.SpatialRelation(num_heads=3, hidden=8)
    with torch.no_grad():
        rel.w2.normal_()

    def fresh(grid):
        return rel._table(grid)

    with torch.no_grad():
        first = rel((5, 7))
        assert rel((5, 7)) is first  # cached
        torch.testing.assert_close(first, fresh((5, 7)), rtol=0, atol=0)
        rel.w2.data.mul_(3.0)  # untracked by the version counter: still seen
        second = rel((5, 7))
        assert second is not first
        torch.testing.assert_close(second, fresh((5, 7)), rtol=0, atol=0)
        other = rel((4, 4))
        assert other.shape == (3, 7, 7)
        torch.testing.assert_close(other, fresh((4, 4)), rtol=0, atol=0)
    table = rel((5, 7))  # grad enabled, parameters require grad: computed, differentiable
    assert table.grad_fn is not None
    table.sum().backward()
    assert rel.w2.grad is not None and rel.w2.grad.abs().sum() > 0
