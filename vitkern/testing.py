"""Cases, tolerances and checks shared by the test-suite and ``vitkern selftest``.

Every check runs one op (or a model training step) on a backend, device and dtype, and
compares the output and every gradient with the reference backend in float64 (relative
Frobenius error). Inputs are random and seeded; NaN never passes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

# Relative error against float64, per dtype. fp32 on a CUDA device whose matmuls may use
# TF32 tensor cores (torch's setting) gets TF32_TOL instead.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TF32_TOL = 1e-3
# A whole training step (several layers; under autocast every matmul input is rounded).
MODEL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}

# One entry per numerical case: op, dtype (the dtype the interpreter tests run it in; the
# selftest runs each case in every dtype it is asked for) and the op's shape parameters.
OP_CASES = [
    # patch_embed: B, C, P, grid, D, bias, pos_embed, image layout
    {"op": "patch_embed", "dtype": "float32", "shape": [1, 3, 4, [3, 5], 40, True, True, "contiguous"]},
    {"op": "patch_embed", "dtype": "float16", "shape": [2, 2, 3, [5, 3], 24, False, True, "channels_last"]},
    {"op": "patch_embed", "dtype": "float32", "shape": [2, 3, 16, [2, 3], 72, True, False, "contiguous"]},
    {"op": "patch_embed", "dtype": "float16", "shape": [1, 3, 8, [1, 1], 16, True, True, "contiguous"]},
    # layernorm_mlp: leading dims, D, hidden, norm affine, GELU approximate or activation, residual
    # [, norm]
    {"op": "layernorm_mlp", "dtype": "float32", "shape": [[1, 197], 32, 96, True, "none", True]},
    {"op": "layernorm_mlp", "dtype": "float16", "shape": [[2, 15], 80, 240, True, "none", True]},
    {"op": "layernorm_mlp", "dtype": "float32", "shape": [[3], 48, 200, False, "tanh", False]},
    {"op": "layernorm_mlp", "dtype": "float16", "shape": [[1, 7], 128, 160, True, "tanh", True]},
    {"op": "layernorm_mlp", "dtype": "float32", "shape": [[2, 13], 40, 136, True, "quick_gelu", True]},
    {"op": "layernorm_mlp", "dtype": "float16", "shape": [[1, 9], 64, 176, True, "silu", False, "rmsnorm"]},
    {"op": "layernorm_mlp", "dtype": "float32", "shape": [[5], 24, 96, False, "gelu", True, "rmsnorm"]},
    # layernorm_mlp gated= (GLU): leading dims, D, hidden (of the gated product), fc1 layout, LN affine,
    # activation, residual[, norm]; hidden not a multiple of the tile, ragged token counts
    {"op": "layernorm_mlp_gated", "dtype": "float32", "shape": [[1, 197], 32, 72, "gate_last", True, "silu", True]},
    {
        "op": "layernorm_mlp_gated",
        "dtype": "float16",
        "shape": [[2, 15], 48, 40, "gate_first", True, "gelu_tanh", False],
    },
    {"op": "layernorm_mlp_gated", "dtype": "float32", "shape": [[19], 40, 36, "split", False, "gelu", True]},
    {
        "op": "layernorm_mlp_gated",
        "dtype": "float16",
        "shape": [[1, 7], 64, 100, "split", True, "silu", True, "rmsnorm"],
    },
    # sp_attention: B, H, grid, prefix tokens, head dim, omega (q, k, v are views of a fused qkv)
    {"op": "sp_attention", "dtype": "float32", "shape": [1, 1, [14, 14], 1, 64, True]},  # N 197, class token
    {"op": "sp_attention", "dtype": "float16", "shape": [2, 2, [3, 5], 0, 32, True]},  # non-square, N < 1 block
    {"op": "sp_attention", "dtype": "float32", "shape": [1, 2, [5, 3], 5, 80, True]},  # Dh 80, class + 4 registers
    {"op": "sp_attention", "dtype": "float16", "shape": [1, 1, [4, 5], 1, 96, True]},
    {"op": "sp_attention", "dtype": "float32", "shape": [1, 1, [3, 3], 1, 128, True]},
    {"op": "sp_attention", "dtype": "float32", "shape": [2, 1, [4, 4], 0, 64, False]},  # omega=None
]

# The cases ``vitkern selftest`` runs per (op, backend, dtype): the first two of each op (one
# gated MLP), and attention without a prior.
SELFTEST_CASES = [
    *[c for c in OP_CASES if c["op"] == "patch_embed"][:2],
    *[c for c in OP_CASES if c["op"] == "layernorm_mlp"][:2],
    *[c for c in OP_CASES if c["op"] == "layernorm_mlp_gated"][:1],
    *[c for c in OP_CASES if c["op"] == "sp_attention"][:2],
    OP_CASES[-1],
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN (or a shape mismatch) gives inf."""
    a, b = out.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != b.shape or torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def tolerance(dtype: torch.dtype, device: torch.device | str) -> float:
    device = torch.device(device)
    if dtype == torch.float32 and device.type == "cuda":
        from vitkern.triton_kernels.gemm import tf32_allowed

        if tf32_allowed():
            return TF32_TOL
    return TOL[dtype]


def build_case(case: dict, g: torch.Generator):
    """(fn(*leaves, backend=...), float64 leaves, names of output and gradients)."""
    op, shape = case["op"], case["shape"]
    if op == "patch_embed":
        from vitkern.ops import patch_embed

        B, C, P, (gh, gw), D, bias, pos, layout = shape
        img = torch.randn(B, C, gh * P, gw * P, generator=g, dtype=torch.float64)
        if layout == "channels_last":
            img = img.to(memory_format=torch.channels_last)
        leaves = [img, torch.randn(D, C, P, P, generator=g, dtype=torch.float64) * (C * P * P) ** -0.5]
        if bias:
            leaves.append(torch.randn(D, generator=g, dtype=torch.float64) * 0.1)
        if pos:
            leaves.append(torch.randn(1, gh * gw, D, generator=g, dtype=torch.float64) * 0.1)

        def fn(img, w, *rest, backend):
            return patch_embed(img, w, rest[0] if bias else None, rest[-1] if pos else None, backend=backend)

        names = ["out", "dimages", "dweight"] + (["dbias"] if bias else []) + (["dpos"] if pos else [])
        return fn, leaves, names
    if op == "layernorm_mlp":
        from vitkern.ops import layernorm_mlp

        lead, D, Hd, affine, approx, residual, *rest = shape
        norm = rest[0] if rest else "layernorm"  # an RMSNorm has no bias
        # approx: GELU's "none" / "tanh", or an activation name ("quick_gelu", "silu", ...)
        act = dict(approximate=approx) if approx in ("none", "tanh") else dict(activation=approx)

        def r(*s, scale=1.0, shift=0.0):
            return torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift

        x = r(*lead, D, scale=2.0, shift=0.5)
        lnw, lnb = r(D, scale=0.2, shift=1.0), r(D, scale=0.2)
        w1, b1 = r(Hd, D, scale=D**-0.5), r(Hd, scale=0.2)
        w2, b2 = r(D, Hd, scale=Hd**-0.5), r(D, scale=0.2)
        ln = ([lnw, lnb] if norm == "layernorm" else [lnw]) if affine else []
        leaves = [x, w1, b1, w2, b2] + ln

        def fn(x, w1, b1, w2, b2, *ln, backend):
            lw, lb = (*ln, None, None)[:2]
            return layernorm_mlp(x, lw, lb, w1, b1, w2, b2, norm=norm, residual=residual, backend=backend, **act)

        names = ["out", "dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"]
        return fn, leaves, names + ["dln_weight", "dln_bias"][: len(ln)]
    if op == "layernorm_mlp_gated":
        from vitkern.ops import layernorm_mlp

        lead, D, Hd, gated, affine, activation, residual, *rest = shape
        norm = rest[0] if rest else "layernorm"

        def r(*s, scale=1.0, shift=0.0):
            return torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift

        H1 = Hd if gated == "split" else 2 * Hd
        leaves = [r(*lead, D, scale=2.0, shift=0.5), r(H1, D, scale=D**-0.5), r(H1, scale=0.2)]
        leaves += [r(D, Hd, scale=Hd**-0.5), r(D, scale=0.2)]
        names = ["out", "dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"]
        if gated == "split":
            leaves += [r(Hd, D, scale=D**-0.5), r(Hd, scale=0.2)]
            names += ["dfc1_gate_weight", "dfc1_gate_bias"]
        n_ln = (2 if norm == "layernorm" else 1) if affine else 0
        leaves += [r(D, scale=0.2, shift=1.0), r(D, scale=0.2)][:n_ln]
        names += ["dln_weight", "dln_bias"][:n_ln]

        def fn(x, w1, b1, w2, b2, *rest, backend):
            gw, gb = rest[:2] if gated == "split" else (None, None)
            lw, lb = (*rest[2 if gated == "split" else 0 :], None, None)[:2]
            return layernorm_mlp(
                x,
                lw,
                lb,
                w1,
                b1,
                w2,
                b2,
                activation=activation,
                norm=norm,
                residual=residual,
                backend=backend,
                gated=gated,
                fc1_gate_weight=gw,
                fc1_gate_bias=gb,
            )

        return fn, leaves, names
    if op == "sp_attention":
        from vitkern.ops import sp_attention

        B, H, (gh, gw), P, Dh, use_omega = shape
        N = P + gh * gw
        qkv = torch.randn(B, N, 3, H, Dh, generator=g, dtype=torch.float64)
        leaves = [qkv]
        if use_omega:
            leaves.append(torch.randn(H, 2 * gh - 1, 2 * gw - 1, generator=g, dtype=torch.float64) * 0.5 + 1)

        def fn(qkv, *om, backend):
            # q, k, v as strided views of the fused projection, like the model passes them.
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            if use_omega:
                return sp_attention(q, k, v, om[0], grid=(gh, gw), num_prefix_tokens=P, backend=backend)
            return sp_attention(q, k, v, None, backend=backend)

        return fn, leaves, ["out", "dqkv"] + (["domega"] if use_omega else [])
    raise ValueError(f"unknown op {op!r}")


@dataclass
class Verdict:
    op: str
    backend: str
    dtype: str
    case: str
    worst: float
    tol: float
    worst_name: str = ""
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and self.worst < self.tol


class WrongBackend(RuntimeError):
    """The op ran on another backend than the one asked for."""


def _split_fused(names: list[str], tensors: list) -> tuple[list[str], list]:
    """The gradient of a fused qkv leaf (B, N, 3, H, Dh) as dq, dk, dv, each with its own error."""
    out_names, out = [], []
    for name, t in zip(names, tensors, strict=True):
        if name == "dqkv":
            out_names += ["dq", "dk", "dv"]
            out += list(t.unbind(2))
        else:
            out_names.append(name)
            out.append(t)
    return out_names, out


def case_errors(case: dict, backend: str, dtype: torch.dtype, device, seed: int = 0) -> dict[str, float]:
    """Run one case forward and backward on ``backend`` (inputs in ``dtype`` on ``device``)
    and return the relative error of the output and of every gradient against the
    reference in float64, by name (a fused qkv gradient split into dq, dk, dv). Raises
    WrongBackend when the dispatcher ran another backend, and whatever the op raises."""
    import vitkern

    g = torch.Generator().manual_seed(seed)
    fn, leaves64, names = build_case(case, g)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in leaves64]
    out = fn(*leaves, backend=backend)
    used = vitkern.last_backend(case["op"])
    if used != backend:
        raise WrongBackend(f"ran on {used!r}")
    ref_leaves = [t.detach().clone().to(device).requires_grad_() for t in leaves64]
    ref = fn(*ref_leaves, backend="reference")
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, dout.to(device=device, dtype=dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.to(device))
    split_names, got = _split_fused(names, [out, *grads])
    _, want = _split_fused(names, [ref, *ref_grads])
    return {n: rel_err(a, b) for n, a, b in zip(split_names, got, want, strict=True)}


def check_op_case(case: dict, backend: str, dtype: torch.dtype, device, seed: int = 0) -> Verdict:
    """Run one case forward and backward on ``backend`` and compare with the reference."""
    label = f"{case['op']} {case['shape']}"
    v = Verdict(case["op"], backend, str(dtype).replace("torch.", ""), label, float("inf"), tolerance(dtype, device))
    try:
        errs = case_errors(case, backend, dtype, device, seed)
    except WrongBackend as exc:
        v.error = str(exc)
        return v
    except Exception as exc:  # reported in the verdict table
        v.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        return v
    v.worst_name = max(errs, key=errs.get)
    v.worst = errs[v.worst_name]
    return v


def check_model_step(spatial_prior: bool, backend: str, dtype: torch.dtype, device, seed: int = 0) -> Verdict:
    """One training step (forward, cross-entropy, backward) of a small ViT / SP-ViT on
    ``backend``: fp32 as is, fp16 / bf16 under ``torch.autocast``; logits and every
    parameter gradient against the same model in float64 on the reference backend."""
    import vitkern

    name = "SP-ViT step" if spatial_prior else "ViT step"
    v = Verdict(name, backend, str(dtype).replace("torch.", ""), "", float("inf"), MODEL_TOL[dtype])
    device = torch.device(device)
    before = dict(vitkern.backend_report())
    try:
        torch.manual_seed(seed)
        cfg = dict(img_size=(48, 80), patch_size=16, embed_dim=64, depth=3, num_heads=2, num_classes=5)
        model = vitkern.ViT(spatial_prior=True, sp_layers=2, **cfg) if spatial_prior else vitkern.ViT(**cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        ref_model = copy.deepcopy(model).double().to(device)
        model = model.to(device)
        x = torch.randn(4, 3, 48, 80, generator=g)
        y = torch.randint(0, 5, (4,), generator=g)
        x, y = x.to(device), y.to(device)
        with vitkern.use_backend(backend):
            if dtype == torch.float32:
                out = model(x)
            else:
                with torch.autocast(device.type, dtype=dtype):
                    out = model(x)
            torch.nn.functional.cross_entropy(out.float(), y).backward()
        # The ops this step dispatched (each call records a new DispatchRecord; ops the model
        # does not use, e.g. the gated MLP, keep the record of an earlier check).
        used = {op: r.backend for op, r in vitkern.backend_report().items() if before.get(op) is not r}
        with vitkern.use_backend("reference"):
            ref = ref_model(x.double())
            torch.nn.functional.cross_entropy(ref, y).backward()
    except Exception as exc:
        v.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        return v
    if any(b != backend for b in used.values()):
        v.error = f"ops ran on {used}"
        return v
    ref_params = dict(ref_model.named_parameters())
    errs = {"logits": rel_err(out, ref)}
    errs.update({n: rel_err(p.grad, ref_params[n].grad) for n, p in model.named_parameters() if p.grad is not None})
    v.worst_name = max(errs, key=errs.get)
    v.worst = errs[v.worst_name]
    return v
