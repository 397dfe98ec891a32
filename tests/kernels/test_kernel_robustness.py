"""The numerical-robustness and determinism properties of tests/test_robustness.py on the
Triton backend: large logits with a signed prior, all-equal scores, NaN / Inf propagation,
fp16 products beyond the fp16 range, extreme LayerNorm rows, bitwise-repeatable backwards.

Those tests build CPU tensors; on a GPU the ops they call are wrapped to run on the
device (inputs moved there, the output moved back; autograd flows through the moves)."""

from __future__ import annotations

import pytest
import test_robustness as tr
import torch


@pytest.fixture
def on_device(device, monkeypatch):
    if device == "cpu":
        return

    def moved(fn):
        def run(*args, **kw):
            args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
            return fn(*args, **kw).cpu()

        return run

    for name in ("sp_attention", "layernorm_mlp", "patch_embed"):
        monkeypatch.setattr(tr, name, moved(getattr(tr, name)))


@pytest.mark.parametrize("logit_scale", [1.0, 300.0, 5000.0])
def test_large_logits_and_signed_omega(backend, logit_scale, gen, on_device):
    tr.test_large_logits_and_signed_omega(backend, logit_scale, gen)


def test_all_equal_scores_give_the_mean_of_v(backend, gen, on_device):
    tr.test_all_equal_scores_give_the_mean_of_v(backend, gen)


@pytest.mark.parametrize("where", ["q", "k", "v_inf", "omega"])
def test_nan_and_inf_propagate_like_the_reference(backend, where, gen, on_device):
    tr.test_nan_and_inf_propagate_like_the_reference(backend, where, gen)


def test_fp16_products_beyond_fp16_range_do_not_overflow(backend, gen, on_device):
    tr.test_fp16_products_beyond_fp16_range_do_not_overflow(backend, gen)


def test_layernorm_mlp_extreme_rows(backend, gen, on_device):
    tr.test_layernorm_mlp_extreme_rows(backend, gen)


def test_every_backward_is_bitwise_deterministic(backend, gen, on_device):
    tr.test_every_backward_is_bitwise_deterministic(backend, gen)
