"""Autograd glue shared by the custom ops."""

from __future__ import annotations


def mark_saved_outputs(ctx, output) -> None:
    """Outputs after the first exist only so that the backward can have them (statistics, saved
    activations, log-sum-exp): mark them non-differentiable and stop autograd materialising zero
    gradients for them. For layernorm_mlp at 8 x 197 tokens, D 384 those zeros were five buffers,
    2 x 9.7 MB, per backward: 12 ms of 53 (benchmarks/NOTES.md, third pass). The backward then gets
    ``None`` for an unused first output as well."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
