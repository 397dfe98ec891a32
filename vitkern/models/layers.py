"""Building blocks of vitkern.ViT. Module and parameter names mirror timm's
VisionTransformer so that ``load_state_dict(timm_model.state_dict())`` works key
for key; the forward passes call vitkern's fused ops."""

from __future__ import annotations

import torch
import torch.nn as nn

from vitkern import _backend
from vitkern._ext import load_extension
from vitkern.ops import _validate, layernorm_mlp, sp_attention
from vitkern.ops._autograd import eager_inference, no_autocast
from vitkern.ops._packed import bf16_products, global_hooks, linear, packed_weight, skippable
from vitkern.ops.layernorm_mlp import ACTIVATIONS


class LayerScale(nn.Module):
    """Per-channel scale (timm.layers.LayerScale): key ``gamma``."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class SpatialRelation(nn.Module):
    """SP-ViT's spatial relation function, one small MLP per head (docs/DESIGN.md §1.3):

        omega_h(dx, dy) = w2_h . ReLU(W1_h [dx, dy] + b1_h) + b2_h

    evaluated once per forward on the (2gh-1)(2gw-1) offsets of the current grid.

    Initialised as SP-ViT's public code does: ``W1`` truncated normal (std 0.02, cut at
    ±2), ``b1 = 0``, ``w2 = 0``, ``b2 = 1``, so a fresh layer is exactly plain attention and
    its hidden layer starts small on the raw integer offsets (a uniform ±0.7 ``W1`` would put
    it at up to ±10 on a 14x14 grid).
    """

    def __init__(self, num_heads: int, hidden: int = 32) -> None:
        super().__init__()
        self.num_heads, self.hidden = num_heads, hidden
        self.w1 = nn.Parameter(torch.empty(num_heads, hidden, 2))
        self.b1 = nn.Parameter(torch.zeros(num_heads, hidden))
        self.w2 = nn.Parameter(torch.zeros(num_heads, hidden))
        self.b2 = nn.Parameter(torch.ones(num_heads))
        # (grid, parameter values, table) of the last eager-inference call on the CPU (forward)
        self._cached: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.w2)
        nn.init.ones_(self.b2)

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        """(H, 2*gh-1, 2*gw-1) table: ``[h, dy+gh-1, dx+gw-1]``, in the parameters' dtype
        (also under autocast: the MLP is tiny and sp_attention takes an fp32 table with
        half-precision q/k/v).

        In plain eager inference the table is kept for the next call with the same grid and
        the same parameter values (compared in full: the four parameters are ~800 numbers), so
        a CPU SP-ViT forward does not re-run 14 tiny MLPs (~11 ms of 160 at batch 1 on one core);
        with autograd, torch.compile, a trace or on a GPU it is computed every call."""
        params = (self.w1, self.b1, self.w2, self.b2)
        if self.w1.device.type != "cpu" or not eager_inference(*params):  # (on a GPU the compare would sync)
            # A CPU backward runs on the calling thread with its autocast state: a backward called inside
            # the autocast region would autocast the MLP's gradient products. Its own backward keeps fp32.
            own_backward = (
                self.w1.device.type == "cpu"
                and torch.is_autocast_enabled("cpu")
                and torch.is_grad_enabled()
                and any(p.requires_grad for p in params)
                and not torch.jit.is_tracing()
            )
            with no_autocast(self.w1.device.type):
                return self._table(grid, own_backward)
        snapshot = torch.cat([p.detach().reshape(-1) for p in params])
        hit = self._cached
        if hit is not None and hit[0] == tuple(grid) and hit[1].dtype == snapshot.dtype:
            if torch.equal(hit[1], snapshot):
                return hit[2]
        with no_autocast(self.w1.device.type):
            table = self._table(grid)
        self._cached = (tuple(grid), snapshot, table)
        return table

    def _table(self, grid: tuple[int, int], own_backward: bool = False) -> torch.Tensor:
        gh, gw = grid
        dev, dt = self.w1.device, self.w1.dtype
        dy = torch.arange(-(gh - 1), gh, device=dev, dtype=dt)
        dx = torch.arange(-(gw - 1), gw, device=dev, dtype=dt)
        delta = torch.stack(torch.meshgrid(dx, dy, indexing="xy"), dim=-1)  # (2gh-1, 2gw-1, 2) as (dx, dy)
        if own_backward:
            return _RelationTable.apply(delta, self.w1, self.b1, self.w2, self.b2)
        return _relation_table(delta, self.w1, self.b1, self.w2, self.b2)[0]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, hidden={self.hidden}"


def _relation_table(delta, w1, b1, w2, b2):
    """omega[h, y, x] = w2_h . ReLU(W1_h delta[y, x] + b1_h) + b2_h, and the pre-activation."""
    hidden = torch.einsum("yxc,hkc->hyxk", delta, w1) + b1[:, None, None, :]
    return torch.einsum("hyxk,hk->hyx", hidden.relu(), w2) + b2[:, None, None], hidden


class _RelationTable(torch.autograd.Function):
    """The relation MLP with its backward computed with autocast off (its forward already is)."""

    @staticmethod
    def forward(ctx, delta, w1, b1, w2, b2):
        table, hidden = _relation_table(delta, w1, b1, w2, b2)
        ctx.save_for_backward(delta, w2, hidden)
        return table

    @staticmethod
    def backward(ctx, g):
        delta, w2, hidden = ctx.saved_tensors
        with no_autocast(g.device.type):
            g = g.to(w2.dtype)
            d_hidden = torch.einsum("hyx,hk->hyxk", g, w2) * (hidden > 0)
            d_w1 = torch.einsum("hyxk,yxc->hkc", d_hidden, delta)
            d_w2 = torch.einsum("hyx,hyxk->hk", g, hidden.relu())
            return None, d_w1, d_hidden.sum((1, 2)), d_w2, g.sum((1, 2))


class Attention(nn.Module):
    """Multi-head self-attention (keys ``qkv``, ``proj``) on vitkern's sp_attention.

    With ``spatial_prior=True`` it is an SP-SA layer: ``spatial_relation`` produces
    the Omega table for the current grid, applied to the patch tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        spatial_prior: bool = False,
        sp_hidden: int = 32,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.spatial_relation = SpatialRelation(num_heads, sp_hidden) if spatial_prior else None
        # Optional timm attention features (set by ViT.from_timm; None: absent). q_norm/k_norm
        # normalise each head's q and k before the fused attention (timm's qk_norm), norm
        # normalises the attention output before proj (scale_attn_norm), gate is the sigmoid
        # output gate of timm's gated attention. They run as ordinary modules.
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        self.norm: nn.Module | None = None
        self.gate: nn.Module | None = None

    def omega(self, grid: tuple[int, int]) -> torch.Tensor | None:
        return None if self.spatial_relation is None else self.spatial_relation(grid)

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        qkv = linear(self.qkv, x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # strided (B, H, N, Dh) views, no copy
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.split_qkv(x)
        omega = self.omega(grid)
        out = sp_attention(
            q,
            k,
            v,
            omega,
            grid=grid if omega is not None else None,
            num_prefix_tokens=num_prefix_tokens,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(B, N, C)
        if self.norm is not None:
            out = self.norm(out)
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return linear(self.proj, out)


class Mlp(nn.Module):
    """Keys ``fc1``, ``fc2``; the computation is fused with the preceding norm in Block.

    ``activation``: "gelu" (exact), "gelu_tanh", "quick_gelu" or "silu" (vitkern.ops.layernorm_mlp);
    ``approximate="tanh"`` is the older spelling of "gelu_tanh"."""

    def __init__(
        self, dim: int, hidden: int, bias: bool = True, approximate: str = "none", activation: str = "gelu"
    ) -> None:
        super().__init__()
        from vitkern.ops.layernorm_mlp import _resolve_activation

        self.activation = _resolve_activation(activation, approximate)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class GluMlp(nn.Module):
    """timm's ``GluMlp`` keys: ``fc1`` (dim -> 2 * hidden, gate and value rows; the gate's half
    last or first per ``gate_last``) and ``fc2`` (hidden -> dim). The gated MLP
    ``fc2(act(gate) * value)`` is fused with the preceding norm (``layernorm_mlp(gated=...)``);
    ``activation`` as for :class:`Mlp`."""

    def __init__(
        self, dim: int, hidden2: int, bias: tuple[bool, bool] = (True, True), gate_last: bool = True, activation="silu"
    ) -> None:
        super().__init__()
        from vitkern.ops.layernorm_mlp import _resolve_activation

        if hidden2 % 2:
            raise ValueError(f"hidden2 (fc1's outputs: gate and value) must be even, got {hidden2}")
        self.activation = _resolve_activation(activation, "none")
        self.gate_last = gate_last
        self.fc1 = nn.Linear(dim, hidden2, bias=bias[0])
        self.fc2 = nn.Linear(hidden2 // 2, dim, bias=bias[1])

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, gate_last={self.gate_last}"


class SwiGLU(nn.Module):
    """timm's ``SwiGLU`` keys: ``fc1_g`` (gate) and ``fc1_x`` (value), dim -> hidden each, and
    ``fc2``; fused with the preceding norm like :class:`GluMlp`."""

    def __init__(self, dim: int, hidden: int, bias: tuple[bool, bool] = (True, True), activation="silu") -> None:
        super().__init__()
        from vitkern.ops.layernorm_mlp import _resolve_activation

        self.activation = _resolve_activation(activation, "none")
        self.fc1_g = nn.Linear(dim, hidden, bias=bias[0])
        self.fc1_x = nn.Linear(dim, hidden, bias=bias[0])
        self.fc2 = nn.Linear(hidden, dim, bias=bias[1])

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then the fused
    x + ls2(fc2(GELU(fc1(norm2(x)))))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        spatial_prior: bool = False,
        sp_hidden: int = 32,
        norm_eps: float = 1e-6,
        mlp_approximate: str = "none",
        mlp_activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, spatial_prior, sp_hidden)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(
            dim, int(dim * mlp_ratio), bias=proj_bias, approximate=mlp_approximate, activation=mlp_activation
        )
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
        y = inference_block(self, x, grid, num_prefix_tokens)  # eager CPU inference: one C++ call
        if y is not None:
            return y
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid, num_prefix_tokens)))
        if not fusable_mlp(self.norm2, self.mlp):  # an MLP kept unfused by ViT.from_timm
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return mlp_residual(x, self.ls2, self.drop_path2, lambda r: fused_norm_mlp(self.norm2, self.mlp, x, r))


def _block_args(blk: Block, x: torch.Tensor) -> tuple | None:
    """The modules and parameters ``block_forward`` takes for ``blk(x, ...)`` and the requested
    backend, or None where the block must run module by module. The one-call path needs plain
    eager CPU inference (no gradient wanted, no compile / trace / torch function or dispatch mode)
    in fp32 — or in bf16/fp16 (parameters and input, or an autocast region of that dtype) on a CPU
    without GEMM hardware for it (``_validate.native_half_gemm``), where the block computes in fp32,
    or in bf16 on a CPU with AVX512-BF16 (``_packed.bf16_products``: vitkern's bf16 GEMMs) — the
    "auto" or "cpu" backend, and the block as vitkern builds it for a timm ViT: LayerNorms, the
    Attention without q/k norm, output norm or gate, the plain GELU-family Mlp, no LayerScale,
    drop path inert, plain nn.Linear layers, plain CPU parameters of one dtype, and no forward hook,
    pre-hook or instance-level ``forward`` replacement on any of those modules, nor a global hook
    (a hook or a patched forward must see its module run).
    Everything else takes the module-by-module forward, with the same result.

    Called once per block per forward, so it reads the modules' ``_modules`` / ``_parameters``
    dicts directly (nn.Module attribute lookup costs ~1 us a step)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # first: dynamo folds it, traces none of the rest
        return None
    if x.device.type != "cpu" or x.dim() != 3 or global_hooks():
        return None
    # Half precision (bf16/fp16 parameters and input, or a bf16/fp16 autocast region) runs this
    # fp32 kernel only on CPUs without hardware for that dtype's GEMMs, where torch emulates them
    # (~7x slower than fp32); elsewhere torch's half GEMMs beat it and the block goes module by module.
    # On a CPU with AVX512-BF16 (bf16_route) bf16 runs it too, on vitkern's bf16 GEMM kernel.
    amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    if amp is not None and (amp not in _HALF or (_validate.native_half_gemm(amp) and not bf16_products(amp))):
        return None
    if x.dtype != torch.float32 and (
        x.dtype not in _HALF or (_validate.native_half_gemm(x.dtype) and not bf16_products(x.dtype))
    ):
        return None
    mods = blk._modules
    attn, mlp, n1, n2 = mods["attn"], mods["mlp"], mods["norm1"], mods["norm2"]
    if type(attn) is not Attention or type(mlp) is not Mlp or type(n1) is not _LN or type(n2) is not _LN:
        return None
    am, mm = attn._modules, mlp._modules
    # (None is a plain attribute, found without nn.Module.__getattr__)
    if attn.q_norm is not None or attn.k_norm is not None or attn.norm is not None or attn.gate is not None:
        return None
    qkv, proj, fc1, fc2 = am["qkv"], am["proj"], mm["fc1"], mm["fc2"]
    if type(qkv) is not _LIN or type(proj) is not _LIN or type(fc1) is not _LIN or type(fc2) is not _LIN:
        return None
    residual_path = (mods["ls1"], mods["ls2"], mods["drop_path1"], mods["drop_path2"])
    for m in residual_path:
        if type(m) is not nn.Identity and not (type(m) is DropPath and (not m.training or m.drop_prob == 0.0)):
            return None
    # A hook, or a forward replaced on the instance (``m.forward = ...``: a patched attention such as
    # the public-code SP-ViT baseline), must run: such a block goes module by module.
    if not all(skippable(m) for m in (blk, n1, attn, n2, mlp, qkv, proj, fc1, fc2, *residual_path)):
        return None
    params = []
    for m in (n1, qkv, proj, n2, fc1, fc2):
        p = m._parameters
        params += (p["weight"], p["bias"])
    # Parameter attributes (dtype, device) go through __torch_function__ (~2.5 us each): only the
    # types are checked here; block_forward requires fp32 CPU parameters (as F.linear would
    # refuse an fp32 input with others) and raises if one is not.
    grad = torch.is_grad_enabled()
    for p in params:
        if p is not None and ((type(p) is not _PARAM and type(p) is not torch.Tensor) or (grad and p.requires_grad)):
            return None
    requested = _backend.requested_backend()
    if not eager_inference(x) or requested not in ("auto", "cpu"):
        return None
    return attn, mlp, n1, n2, params, requested


_LN, _LIN, _PARAM = nn.LayerNorm, nn.Linear, nn.Parameter
_HALF = (torch.bfloat16, torch.float16)


def inference_block(blk: Block, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor | None:
    """``blk(x, grid, num_prefix_tokens)`` as one C++ call (csrc/vitkern/block_cpu.cpp), or None
    where it cannot run that way (``_block_args``): the attention half with norm1 as the qkv
    GEMM's prologue and the residual in proj's epilogue, then the fused MLP half, on the cpu
    kernels and their packed weights."""
    args = _block_args(blk, x)
    ext = load_extension() if args is not None else None
    if ext is None:
        return None
    attn, mlp, n1, n2, (n1w, n1b, qw, qb, pw_, pb, n2w, n2b, w1, b1, w2, b2), requested = args
    # Inside a (half-precision: _block_args) autocast region the block computes in fp32 from the
    # parameters as they are; x goes in in their dtype and the output comes back in x's dtype, as
    # the module-by-module block under autocast returns it (its residual adds keep x's dtype).
    # On the bf16 route (bf16 parameters, or a bf16 autocast region over any) the weight GEMMs take
    # the weights packed as bf16: bf16 products summed in fp32, the rest of the block in fp32.
    amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    bf16 = bf16_products(amp if amp is not None else qw.dtype)
    xin = x.to(qw.dtype) if amp is not None else x
    omega = attn.omega(grid)
    gh, gw = grid if omega is not None else (1, 1)

    def pk(w):
        return packed_weight(w, bf16=bf16)

    y = ext.block_forward(
        xin, n1w, n1b, n1.eps, qw, qb, pk(qw), pw_, pb, pk(pw_),
        omega, gh, gw, num_prefix_tokens, attn.num_heads, attn.scale,
        n2w, n2b, n2.eps, w1, b1, pk(w1), w2, b2, pk(w2), ACTIVATIONS[mlp.activation],
    )  # fmt: skip
    _backend.record_choice("sp_attention", "cpu", requested)
    _backend.record_choice("layernorm_mlp", "cpu", requested)
    return y.to(x.dtype)


def mlp_residual(x: torch.Tensor, ls: nn.Module, drop_path: nn.Module, fused_mlp) -> torch.Tensor:
    """``x + drop_path(ls(mlp(norm(x))))`` for a block's fused MLP half, where ``fused_mlp(residual)``
    runs the fused op with or without the residual add. When LayerScale is off and drop path
    cannot drop (eval, or rate 0) the residual add is fused into fc2's epilogue. The one
    decision for vitkern's Block and for timm blocks patched by ``patch_timm`` (vitkern's or
    timm's DropPath: both keep their rate in ``drop_prob``).

    Inside an autocast region whose dtype is narrower than x's (an fp32 residual stream under
    bf16/fp16 autocast) the add stays outside: the fused op returns the autocast dtype, and the
    stream keeps x's dtype, as timm's ``x + mlp(norm(x))`` does under autocast."""
    drops = drop_path.training and float(getattr(drop_path, "drop_prob", 0.0) or 0.0) > 0
    if isinstance(ls, nn.Identity) and not drops and not _narrowed_by_autocast(x):
        return fused_mlp(True)
    return x + drop_path(ls(fused_mlp(False)))


def _narrowed_by_autocast(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device and would cast the (float32) x to a half dtype."""
    dev = x.device.type
    return x.dtype == torch.float32 and dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)


def fusable_mlp(norm: nn.Module, mlp: nn.Module) -> bool:
    """Whether ``norm`` then ``mlp`` run as one fused layernorm_mlp: a vitkern Mlp, GluMlp or
    SwiGLU after an nn.LayerNorm or nn.RMSNorm (any eps, affine or not). Other MLPs (timm's
    modules kept by ViT.from_timm) run as ordinary modules."""
    return isinstance(mlp, (Mlp, GluMlp, SwiGLU)) and type(norm) in (nn.LayerNorm, nn.RMSNorm)


def fused_norm_mlp(norm: nn.Module, mlp: nn.Module, x: torch.Tensor, residual: bool) -> torch.Tensor:
    """``[x +] mlp(norm(x))`` through the fused op (``fusable_mlp(norm, mlp)`` must hold)."""
    rms = type(norm) is nn.RMSNorm
    # nn.RMSNorm's eps=None means the input dtype's machine epsilon.
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    return norm_mlp(x, norm, mlp, mlp.activation, "rmsnorm" if rms else "layernorm", eps, residual)


def norm_mlp(
    x: torch.Tensor, norm: nn.Module, mlp: nn.Module, activation: str, norm_kind: str, eps: float, residual: bool
) -> torch.Tensor:
    """``[x +] mlp(norm(x))`` as one :func:`~vitkern.ops.layernorm_mlp`, for a plain MLP
    (``fc1``, ``fc2``), a packed gated one (``fc1`` with ``gate_last``: timm's GluMlp) or a split
    one (``fc1_g``, ``fc1_x``: timm's SwiGLU), vitkern's modules or timm's (read by attribute);
    ``norm_kind``: "layernorm" or "rmsnorm" (its weight only)."""
    kw = {}
    if hasattr(mlp, "fc1_g"):
        w1, b1 = mlp.fc1_x.weight, mlp.fc1_x.bias
        kw = dict(gated="split", fc1_gate_weight=mlp.fc1_g.weight, fc1_gate_bias=mlp.fc1_g.bias)
    else:
        w1, b1 = mlp.fc1.weight, mlp.fc1.bias
        if hasattr(mlp, "gate_last"):
            kw = dict(gated="gate_last" if mlp.gate_last else "gate_first")
    return layernorm_mlp(
        x,
        norm.weight,
        None if norm_kind == "rmsnorm" else norm.bias,
        w1,
        b1,
        mlp.fc2.weight,
        mlp.fc2.bias,
        eps=eps,
        activation=activation,
        norm=norm_kind,
        residual=residual,
        **kw,
    )


class ParallelThingsBlock(nn.Module):
    """timm's ParallelThingsBlock ("three things", parallel branches): ``x + sum_i
    attns[i](x)``, then ``x + sum_i ffns[i](x)``. Each attention branch is
    norm / fused attention / ls / drop_path, each MLP branch the fused layernorm_mlp
    (without its residual) / ls / drop_path; keys as in timm."""

    def __init__(self, attns: list[nn.Module], ffns: list[nn.Module]) -> None:
        super().__init__()
        self.num_parallel = len(attns)
        self.attns = nn.ModuleList(attns)
        self.ffns = nn.ModuleList(ffns)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
        outs = [a.drop_path(a.ls(a.attn(a.norm(x), grid, num_prefix_tokens))) for a in self.attns]
        x = x + torch.stack(outs).sum(dim=0)
        outs = []
        for f in self.ffns:
            if fusable_mlp(f.norm, f.mlp):
                h = fused_norm_mlp(f.norm, f.mlp, x, residual=False)
            else:
                h = f.mlp(f.norm(x))
            outs.append(f.drop_path(f.ls(h)))
        return x + torch.stack(outs).sum(dim=0)


class ResPostBlock(nn.Module):
    """timm's post-norm block: ``x + drop_path1(norm1(attn(x)))``, then
    ``x + drop_path2(norm2(mlp(x)))``. The attention is fused; the normalisation comes
    after the MLP, so the MLP and norms run as ordinary modules (keys as in timm)."""

    def __init__(self, attn: Attention, norm1: nn.Module, mlp: nn.Module, norm2: nn.Module) -> None:
        super().__init__()
        self.attn, self.norm1, self.drop_path1 = attn, norm1, nn.Identity()
        self.mlp, self.norm2, self.drop_path2 = mlp, norm2, nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
        x = x + self.drop_path1(self.norm1(self.attn(x, grid, num_prefix_tokens)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class _UnfusedEmbedMixin:
    """Turns a copy of a timm patch-embedding module (e.g. a hybrid CNN stem) into the
    patch_embed of vitkern.ViT: ``grid_for(images)`` and ``forward(images, pos_embed)``.
    Its own forward, attributes and state_dict keys are timm's."""

    def grid_for(self, images: torch.Tensor) -> tuple[int, int]:
        if images.dim() != 4:
            raise ValueError(f"images must have shape (batch, channels, height, width), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if getattr(self, "strict_img_size", True) and (H, W) != tuple(self.img_size):
            raise ValueError(
                f"input image size {(H, W)} does not match the model's img_size {tuple(self.img_size)}; "
                "build the model with dynamic_img_size=True for other sizes"
            )
        if (H, W) == tuple(self.img_size):
            return tuple(self.grid_size)
        return tuple(self.dynamic_feat_size((H, W)))

    def forward(self, images: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        x = super().forward(images)
        if x.dim() == 4:  # NHWC (dynamic image size)
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x if pos_embed is None else x + pos_embed


_UNFUSED_EMBED_CLASSES: dict[type, type] = {}


def unfused_patch_embed(embed: nn.Module) -> nn.Module:
    """A copy of ``embed`` (a timm patch embedding, e.g. HybridEmbed) usable as
    vitkern.ViT's patch_embed; it runs unfused, in front of the fused trunk."""
    import copy

    cls = type(embed)
    sub = _UNFUSED_EMBED_CLASSES.get(cls)
    if sub is None:
        sub = type(f"Unfused{cls.__name__}", (_UnfusedEmbedMixin, cls), {"__module__": __name__})
        _UNFUSED_EMBED_CLASSES[cls] = sub
    out = copy.deepcopy(embed)
    out.__class__ = sub
    if not getattr(out, "flatten", True) and getattr(out, "output_fmt", "NHWC") not in ("NHWC", "NLC"):
        raise ValueError(f"patch embedding {cls.__name__} must output tokens (flatten or NHWC)")
    return out
