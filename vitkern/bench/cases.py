"""Cases: one op (or a whole model) at one shape, dtype and pass, with its providers, the
zero-argument callables that run it (vitkern's backends and the baselines).

Every op case builder lives here; the rows ``vitkern bench`` runs are chosen in
:mod:`vitkern.bench.suite`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import vitkern
from vitkern.bench.baselines import add_peer_providers, public_spvit, public_spvit_prior
from vitkern.ops import layernorm_mlp, patch_embed, sp_attention
from vitkern.ops.spatial_prior import relative_index


@dataclass
class Case:
    op: str
    params: dict
    dtype: torch.dtype
    device: torch.device
    backward: bool
    flops: float  # forward FLOPs (x3 with backward)
    providers: dict[str, Callable[[], object]] = field(default_factory=dict)
    floor: str | None = None  # provider that is the physical floor
    baseline: str = "eager"
    failures: dict[str, str] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)  # e.g. the peers' logits errors
    threads: int | None = None  # intra-op threads to time it with (None: the process setting)
    settle_s: float = 0.0  # pause before each timed call (peer engines' spinning threads; timing.py)

    @property
    def name(self) -> str:
        p = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.op}[{p},{str(self.dtype).removeprefix('torch.')},{'fwd+bwd' if self.backward else 'fwd'}]"


def vitkern_backends(op: str, *args) -> list[str]:
    """vitkern's backends other than reference (the eager baseline) that can run ``op`` on
    these inputs here, in table order."""
    return [b for b in vitkern.BACKENDS if b != "reference" and vitkern.not_supported_reason(op, b, *args) is None]


def _runner(fn: Callable[[], torch.Tensor], backward: bool, leaves: list[torch.Tensor]) -> Callable[[], object]:
    if not backward:

        def run() -> object:
            with torch.no_grad():
                return fn()

        return run
    grad: dict[str, torch.Tensor] = {}

    def run_bwd() -> object:
        for t in leaves:
            t.grad = None
        out = fn()
        if "g" not in grad:
            grad["g"] = torch.randn_like(out)
        out.backward(grad["g"])
        return out

    return run_bwd


def add_compiled(case: Case, name: str, fn: Callable, leaves: list[torch.Tensor]) -> None:
    """Add torch.compile(fn) as a provider; compile time is measured apart (first call)."""
    try:
        cfn = torch.compile(fn, dynamic=False)
        run = _runner(cfn, case.backward, leaves)
        t0 = time.perf_counter()
        run()
        case.compile_s[name] = time.perf_counter() - t0
        case.providers[name] = run
    except Exception as exc:  # a compiler failure is a result, reported in the table
        case.failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


# ----------------------------------------------------------------------------- attention
def attention_case(
    N_grid: int,
    batch: int = 8,
    heads: int = 6,
    head_dim: int = 64,
    dtype=torch.float32,
    device="cpu",
    backward: bool = False,
    compile: bool = True,
    sp_hidden: int = 32,
) -> Case:
    device = torch.device(device)
    gh = gw = N_grid
    N = gh * gw
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(backward)

    q, k, v = rnd(batch, heads, N, head_dim), rnd(batch, heads, N, head_dim), rnd(batch, heads, N, head_dim)
    w1, b1 = rnd(heads, sp_hidden, 2, scale=0.3), rnd(heads, sp_hidden, scale=0.3)
    w2, b2 = (
        rnd(heads, sp_hidden, scale=0.05),
        (torch.ones(heads) + 0).to(device=device, dtype=dtype).requires_grad_(backward),
    )
    omega = rnd(heads, 2 * gh - 1, 2 * gw - 1, scale=0.1)
    with torch.no_grad():
        omega += 1
    flops = 4.0 * batch * heads * N * N * head_dim * (3.0 if backward else 1.0)
    case = Case(
        "sp_attention",
        dict(N=N, B=batch, H=heads, Dh=head_dim),
        dtype,
        device,
        backward,
        flops,
        floor="SDPA (no prior)",
    )
    leaves = [q, k, v, omega]
    for b in vitkern_backends("sp_attention", q, k, v, omega, (gh, gw), 0, head_dim**-0.5):
        case.providers[f"vitkern[{b}]"] = _runner(lambda b=b: sp_attention(q, k, v, omega, backend=b), backward, leaves)

    def eager():
        return sp_attention(q, k, v, omega, backend="reference")

    def public():
        prior = public_spvit_prior(w1, b1, w2, b2, (gh, gw))
        attn = (q @ k.transpose(-2, -1) * head_dim**-0.5 * prior).softmax(-1)
        return attn @ v

    case.providers["eager"] = _runner(eager, backward, leaves)
    case.providers["public SP-ViT code"] = _runner(public, backward, [q, k, v, w1, b1, w2, b2])
    case.providers["SDPA (no prior)"] = _runner(lambda: F.scaled_dot_product_attention(q, k, v), backward, leaves)
    if compile:
        from vitkern.ops.sp_attention import sp_attention_reference

        add_compiled(case, "torch.compile(eager)", lambda: sp_attention_reference(q, k, v, omega, (gh, gw), 0), leaves)
        try:
            from torch.nn.attention.flex_attention import flex_attention

            ry, rx = relative_index(gh, gw, device)

            def score_mod(score, b, h, q_idx, kv_idx):
                return score * omega[h, ry[q_idx, kv_idx], rx[q_idx, kv_idx]]

            add_compiled(case, "FlexAttention (compiled)", lambda: flex_attention(q, k, v, score_mod=score_mod), leaves)
        except ImportError as exc:  # pragma: no cover
            case.failures["FlexAttention (compiled)"] = str(exc)
    return case


# ----------------------------------------------------------------------------- layernorm_mlp
def layernorm_mlp_case(
    dim: int,
    tokens: int = 197,
    batch: int = 8,
    mlp_ratio: float = 4.0,
    dtype=torch.float32,
    device="cpu",
    backward: bool = False,
    compile: bool = True,
    activation: str = "gelu",
    norm: str = "layernorm",
    gated: str | None = None,
) -> Case:
    """One LayerNorm(/RMSNorm) + MLP layer; ``activation`` / ``norm`` pick the op variant
    (vitkern.ops.layernorm_mlp), e.g. CLIP's QuickGELU or an RMSNorm + SiLU MLP. ``gated="split"``:
    the SwiGLU-style row instead (two (hidden, dim) fc1 projections, gate and value, with hidden
    2/3 of ``dim * mlp_ratio`` rounded up to 8, as EVA-02 / DINOv2 size it; SiLU gate)."""
    device = torch.device(device)
    hidden = int(dim * mlp_ratio)
    if gated is not None:
        hidden = -(-int(hidden * 2 / 3) // 8) * 8
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(device=device, dtype=dtype).requires_grad_(backward)

    x = rnd(batch, tokens, dim)
    params = [
        rnd(dim, scale=0.1, shift=1.0),
        rnd(dim, scale=0.1) if norm == "layernorm" else None,
        rnd(hidden, dim, scale=0.02),
        rnd(hidden, scale=0.02),
        rnd(dim, hidden, scale=0.02),
        rnd(dim, scale=0.02),
    ]
    M = batch * tokens
    flops = 4.0 * M * dim * hidden * (3.0 if backward else 1.0)
    if gated is not None:
        return _gated_mlp_case(x, params, rnd(hidden, dim, scale=0.02), rnd(hidden, scale=0.02), gated, flops, compile)
    shape = dict(D=dim, M=M)
    if (activation, norm) != ("gelu", "layernorm"):
        shape["variant"] = f"{norm}+{activation}"
    case = Case("layernorm_mlp", shape, dtype, device, backward, flops, floor="GEMMs alone")
    leaves = [x, *(p for p in params if p is not None)]
    variant = dict(activation=activation, norm=norm)
    for b in vitkern_backends("layernorm_mlp", x, *params, 1e-6, activation, True, norm):
        case.providers[f"vitkern[{b}]"] = _runner(
            lambda b=b: layernorm_mlp(x, *params, backend=b, **variant), backward, leaves
        )
    from vitkern.ops.layernorm_mlp import layernorm_mlp_reference

    def eager():
        return layernorm_mlp_reference(x, *params, **variant)

    case.providers["eager"] = _runner(eager, backward, leaves)
    h = torch.randn(M, dim, generator=g).to(device=device, dtype=dtype).requires_grad_(backward)
    a = torch.randn(M, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_(backward)
    w1, w2 = params[2], params[4]

    def gemms():  # the two GEMMs alone on ready inputs (the forward floor)
        return torch.cat([(h @ w1.t()).flatten(), (a @ w2.t()).flatten()])

    case.providers["GEMMs alone"] = _runner(gemms, backward, [h, a, w1, w2])
    if compile:
        add_compiled(case, "torch.compile(eager)", eager, leaves)
    return case


def _gated_mlp_case(x, params, gate_w, gate_b, gated, flops, compile) -> Case:
    """The gated row of :func:`layernorm_mlp_case`: fc1 is three GEMMs' worth of FLOPs (gate,
    value, fc2) instead of two."""
    dtype, device, backward = x.dtype, x.device, x.requires_grad
    M, dim = x.shape[0] * x.shape[1], x.shape[-1]
    hidden = gate_w.shape[0]
    flops = flops * 1.5
    kw = dict(gated=gated, fc1_gate_weight=gate_w, fc1_gate_bias=gate_b, activation="silu")
    case = Case("layernorm_mlp", dict(D=dim, M=M, gated=gated), dtype, device, backward, flops, floor="GEMMs alone")
    leaves = [x, *params, gate_w, gate_b]
    # The internal arguments the backends' support checks take (split: gate first, then value; glu 1).
    internal = (x, *params[:2], gate_w, gate_b, *params[2:], 1e-6, 4, False, 1, True)
    for b in vitkern_backends("layernorm_mlp_gated", *internal):
        case.providers[f"vitkern[{b}]"] = _runner(
            lambda b=b: layernorm_mlp(x, *params, backend=b, **kw), backward, leaves
        )
    from vitkern.ops.layernorm_mlp import layernorm_mlp_reference

    case.providers["eager"] = _runner(lambda: layernorm_mlp_reference(x, *params, **kw), backward, leaves)
    g = torch.Generator(device="cpu").manual_seed(1)
    h = torch.randn(M, dim, generator=g).to(device=device, dtype=dtype).requires_grad_(backward)
    a = torch.randn(M, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_(backward)
    w1, w2 = params[2], params[4]

    def gemms():  # the three GEMMs alone on ready inputs (the forward floor)
        return torch.cat([(h @ gate_w.t()).flatten(), (h @ w1.t()).flatten(), (a @ w2.t()).flatten()])

    case.providers["GEMMs alone"] = _runner(gemms, backward, [h, a, gate_w, w1, w2])
    if compile:
        add_compiled(case, "torch.compile(eager)", lambda: layernorm_mlp_reference(x, *params, **kw), leaves)
    return case


# ----------------------------------------------------------------------------- patch_embed
def patch_embed_case(
    img: int = 224,
    patch: int = 16,
    dim: int = 768,
    batch: int = 8,
    dtype=torch.float32,
    device="cpu",
    backward: bool = False,
    compile: bool = True,
) -> Case:
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(backward)

    N = (img // patch) ** 2
    images, weight, bias, pos = rnd(batch, 3, img, img), rnd(dim, 3, patch, patch, scale=0.02), rnd(dim), rnd(1, N, dim)
    K = 3 * patch * patch
    flops = 2.0 * batch * N * K * dim * (3.0 if backward else 1.0)
    case = Case(
        "patch_embed",
        dict(img=img, P=patch, D=dim, B=batch),
        dtype,
        device,
        backward,
        flops,
        floor="GEMM alone",
        baseline="eager (Conv2d)",
    )
    leaves = [images, weight, bias, pos]
    for b in vitkern_backends("patch_embed", images, weight, bias, pos):
        case.providers[f"vitkern[{b}]"] = _runner(
            lambda b=b: patch_embed(images, weight, bias, pos, backend=b), backward, leaves
        )
    from vitkern.ops.patch_embed import patch_embed_reference

    case.providers["eager (Conv2d)"] = _runner(
        lambda: patch_embed_reference(images, weight, bias, pos), backward, leaves
    )
    patches = torch.randn(batch * N, K, generator=g).to(device=device, dtype=dtype).requires_grad_(backward)
    w2d = weight.detach().reshape(dim, K).clone().requires_grad_(backward)
    case.providers["GEMM alone"] = _runner(lambda: patches @ w2d.t(), backward, [patches, w2d])
    if compile:
        add_compiled(case, "torch.compile(eager)", lambda: patch_embed_reference(images, weight, bias, pos), leaves)
    return case


# ----------------------------------------------------------------------------- models
def model_case(
    name: str,
    batch: int = 8,
    img: int = 224,
    dtype=torch.float32,
    device="cpu",
    backward: bool = False,
    compile: bool = True,
    autocast: torch.dtype | None = None,
    peers: bool = True,
    threads: int | None = None,
) -> Case:
    """Whole-model case: vitkern vs the model's eager baseline, torch.compile of it, and
    (inference on the CPU, ``peers=True``) the same weights exported to OpenVINO and
    ONNX Runtime, each engine's logits checked against PyTorch fp32 first.

    With ``autocast`` (e.g. torch.bfloat16) the models keep ``dtype`` (fp32) parameters and
    every provider runs inside ``torch.autocast(device, autocast)``: the mixed-precision row,
    vitkern vs timm under the same autocast (the engines run in their own bf16 mode)."""
    import vitkern

    device = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img, img, device=device, dtype=dtype)
    params = dict(name=name, B=batch, img=img)
    if autocast is not None:
        params["autocast"] = str(autocast).removeprefix("torch.")
    if threads:
        params["threads"] = threads
    case = Case("model", params, dtype, device, backward, 0.0, baseline="timm eager", threads=threads)
    if name.startswith("sp_vit"):
        ours = vitkern.create_model(name, img_size=img).to(device=device, dtype=dtype)
        with torch.no_grad():
            for blk in ours.blocks:  # a trained-looking prior, not the all-ones init
                if blk.attn.spatial_relation is not None:
                    blk.attn.spatial_relation.w2.normal_(std=0.05)
        ref = public_spvit(ours)
        case.baseline = "eager SP-ViT (public code)"
        base_name = case.baseline
    else:
        import timm

        ref = timm.create_model(name, pretrained=False, img_size=img).to(device=device, dtype=dtype)
        ours = vitkern.ViT.from_timm(ref)
        base_name = "timm eager"
    ours.train(backward)
    ref.train(backward)
    case.providers["vitkern"] = _model_runner(ours, x, backward, autocast)
    case.providers[base_name] = _model_runner(ref, x, backward, autocast)
    if compile and not name.startswith("sp_vit"):
        try:
            cref = torch.compile(ref)
            run = _model_runner(cref, x, backward, autocast)
            t0 = time.perf_counter()
            run()
            case.compile_s["timm compiled"] = time.perf_counter() - t0
            case.providers["timm compiled"] = run
        except Exception as exc:
            case.failures["timm compiled"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    if peers and not backward and device.type == "cpu":
        add_peer_providers(case, ours if name.startswith("sp_vit") else ref, x, autocast or dtype)
    return case


def _model_runner(
    model: torch.nn.Module, x: torch.Tensor, backward: bool, autocast: torch.dtype | None = None
) -> Callable[[], object]:
    def amp():
        return torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None)

    if not backward:

        def run() -> object:
            with torch.inference_mode(), amp():
                return model(x)

        return run
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    # One training step: forward under autocast as timm's --amp runs it, and the backward inside the region
    # too (the README's pattern; timm's train.py calls backward after leaving it), then the optimizer.
    def step() -> object:
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = model(x).float().logsumexp(-1).mean()
            loss.backward()
        opt.step()
        return loss

    return step
