"""Prepacked weights for the cpu kernels' packed GEMM route (csrc/vitkern/gemm.h).

Where vitkern's own GEMM is the route (x86 CPUs with AVX2: the AVX-512 or AVX2 micro-kernel;
``VITKERN_GEMM=blas`` turns it off), the cpu kernels take each weight packed into 16-column
panels. On CPUs with AVX512-BF16 the bf16 inference path takes a second packed form, bf16
k-pairs for ``vdpbf16ps`` (``packed_weight(w, bf16=True)``), cached beside the first. Packing a ViT-S fc1 weight costs
about a fifth of one batch-1 GEMM, so it is done once per weight and cached here, keyed by the
weight tensor object (weakly: the entry goes when the weight does) and checked on every call
against the weight's storage pointer, in-place version counter, shape and dtype — an optimizer
step, ``load_state_dict`` or ``.data =`` all repack on the next call. A weight whose version is
not tracked (an inference tensor) is not packed: the kernel calls BLAS on it instead.
"""

from __future__ import annotations

import weakref

import torch

from vitkern import _backend
from vitkern._ext import load_extension
from vitkern.ops import _validate
from vitkern.ops._autograd import CAST_SOURCE, eager_inference


class _WeightCache:
    """Packed forms keyed by the weight tensor object: a dict by ``id`` whose entries hold a weak
    reference to their weight (checked on every hit, so an id reused by a later tensor never
    matches) and go when the weight does. A lookup is one dict access (~0.1 us); a
    ``WeakIdKeyDictionary`` builds a weak reference per lookup (~0.9 us, and the one-call block
    looks up four weights per block: ~45 us of a ViT-S forward)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}

    def get(self, w: torch.Tensor) -> tuple | None:
        """(key, packed) cached for ``w``, or None."""
        e = self._entries.get(id(w))
        return (e[1], e[2]) if e is not None and e[0]() is w else None

    def put(self, w: torch.Tensor, key: tuple, packed: torch.Tensor) -> None:
        i, entries = id(w), self._entries

        def gone(ref, i=i, entries=entries):  # the weight was freed: drop its entry (if still its own)
            e = entries.get(i)
            if e is not None and e[0] is ref:
                del entries[i]

        entries[i] = (weakref.ref(w, gone), key, packed)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_CACHE = _WeightCache()
_CACHE_BF16 = _WeightCache()


def _route_of_this_process() -> bool:
    ext = load_extension()  # (already loaded: vitkern._backend loads it on import)
    return ext is not None and ext.packed_gemm_active()


# Fixed per process (the C++ side reads VITKERN_GEMM and the CPU once), so it is read here once,
# on import: a plain bool that torch.compile traces as a constant (the dispatch's auto rules
# consult it inside compiled code, where calling into the extension would break the graph).
_PACKED_ROUTE = _route_of_this_process()


_BF16_ROUTE = _PACKED_ROUTE and load_extension().bf16_gemm_active()


def packed_route() -> bool:
    """Whether the cpu kernels' weight GEMMs take prepacked weights on this machine."""
    return _PACKED_ROUTE


def bf16_route() -> bool:
    """Whether this machine runs vitkern's bf16 GEMM kernel (AVX512-BF16; csrc/vitkern/gemm.h):
    then the cpu kernels compute bf16 inference (bf16 input, or a bf16 autocast region) with bf16
    products summed in fp32, on weights packed as bf16."""
    return _BF16_ROUTE


def bf16_products(dtype: torch.dtype | None) -> bool:
    """Whether a cpu kernel computing ``dtype`` (bf16) inference takes vitkern's bf16 GEMM kernel:
    the CPU has bf16 GEMM hardware (``_validate.native_half_gemm``) and the kernel runs here."""
    return dtype == torch.bfloat16 and _BF16_ROUTE and _validate.native_half_gemm(dtype)


def packed_weight(w: torch.Tensor | None, bf16: bool = False) -> torch.Tensor | None:
    """``w`` (out_features, in_features), or (out_features, ...) read as (out_features, rest),
    packed for the packed GEMM route (fp32 panels; with ``bf16``, the bf16 route's panels of w
    rounded to bf16): from the cache when the weight has not changed since it was packed;
    ``None`` where the route is off or the weight cannot be cached."""
    if w is None or not (_BF16_ROUTE if bf16 else _PACKED_ROUTE) or not w.is_cpu:
        return None
    if bf16 and w.dtype == torch.bfloat16:  # an autocast copy (bf16 of an fp32 weight, made for this call)?
        src = CAST_SOURCE.get(w)  # then pack and cache its source
        if src is not None and src.shape == w.shape:
            w = src
    if w.is_inference():
        return None  # no version counter: an in-place change could not be seen
    cache = _CACHE_BF16 if bf16 else _CACHE
    key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype)
    hit = cache.get(w)
    if hit is not None and hit[0] == key:
        return hit[1]
    ext = load_extension()
    with torch.no_grad():
        flat = w.detach().reshape(w.shape[0], -1)
        packed = ext.pack_gemm_weight_bf16(flat) if bf16 else ext.pack_gemm_weight(flat)
        if hit is None:  # a first pack (inference packs once; training repacks after every step: not those)
            packed = _ARENA.place(packed)
    cache.put(w, key, packed)
    return packed


class _HugePageArena:
    """Packed weights side by side in 64 MB anonymous mappings advised for transparent huge pages
    (``madvise(MADV_HUGEPAGE)``; Linux with THP in "madvise" or "always" mode, else plain pages).

    A forward streams every packed weight from beyond the L3 (ViT-S: 85 MB fp32, 43 MB bf16). On
    4 KB pages each new page is a TLB miss and a stop for the hardware prefetcher, and a single
    weight (0.6-2.4 MB for ViT-S) rarely spans a whole aligned 2 MB page of its own; packed next to
    each other they do. The 48 GEMMs of a ViT-S forward in model order ran 2-4% faster (fp32
    198 -> 204, bf16 392 -> 401 GFLOP/s, one core; benchmarks/NOTES.md, "Ninth session").

    Bump allocation only: a mapping is returned to the OS when every weight placed in it is gone
    (each placed tensor is a view that keeps its mapping alive). So only first packs are placed;
    repacks (a weight changed: training) get ordinary allocations."""

    CHUNK = 64 << 20
    HUGE = 2 << 20
    MIN_BYTES = 256 << 10  # smaller weights stay where they are

    def __init__(self) -> None:
        import mmap

        self.enabled = hasattr(mmap, "MADV_HUGEPAGE")
        self._base: torch.Tensor | None = None
        self._off = self._end = 0

    def release(self) -> None:
        """Stop filling the current mapping: it goes when the weights placed in it do."""
        self._base, self._off, self._end = None, 0, 0

    def place(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed`` copied into the arena (a view of a mapping), or ``packed`` itself."""
        nbytes = packed.numel() * packed.element_size()
        if not self.enabled or nbytes < self.MIN_BYTES:
            return packed
        if self._base is None or self._off + nbytes > self._end:
            import mmap

            size = max(self.CHUNK, nbytes + self.HUGE)
            try:
                region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                region.madvise(mmap.MADV_HUGEPAGE)
            except (OSError, ValueError, AttributeError):
                self.enabled = False
                return packed
            base = torch.frombuffer(region, dtype=torch.uint8)
            self._base, self._off, self._end = base, (-base.data_ptr()) % self.HUGE, size
        out = self._base[self._off : self._off + nbytes].view(packed.dtype)
        self._off += (nbytes + 63) // 64 * 64
        out.copy_(packed)
        return out


_ARENA = _HugePageArena()


def clear_packed_weights() -> None:
    """Drop every cached packed weight (they are rebuilt on the next call) and the huge-page arena's
    current mapping (each mapping is unmapped once no packed weight in it is left)."""
    _CACHE.clear()
    _CACHE_BF16.clear()
    _ARENA.release()


def skippable(m: torch.nn.Module) -> bool:
    """Whether a fused path may run ``m``'s computation without calling ``m``: no forward hook or
    pre-hook on it and no ``forward`` replaced on the instance (``m.forward = ...``, as the
    benchmark's public-code SP-ViT patches attention). Global hooks are the caller's check."""
    return not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__


def global_hooks() -> bool:
    """Whether a global module forward hook or pre-hook is registered (every module call must run)."""
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def _plain_linear(m: torch.nn.Module) -> bool:
    """An nn.Linear whose forward is F.linear: the exact class, skippable, no global hooks."""
    return type(m) is torch.nn.Linear and skippable(m) and not global_hooks()


_HALF = (torch.bfloat16, torch.float16)


def linear(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m(x)`` for a model's nn.Linear (attention qkv / proj), with the "auto" or "cpu" backend
    requested, on the CPU:

    * eager inference on the packed GEMM route: vitkern's GEMM on the cached packed weight (the
      same sum in fp32, rounding order aside), for fp32 and for bf16/fp16 weight and input on CPUs
      without GEMM hardware for that dtype (torch would emulate it);
    * on a CPU with AVX512-BF16 (``bf16_route``), for bf16 weight and input or a bf16 autocast
      region over an fp32 weight, in eager inference: vitkern's bf16 kernel on the weight packed
      as bf16 (bf16 products summed in fp32), the output in bf16;
    * inside a bf16/fp16 autocast region on a CPU without half GEMMs, over an fp32 weight: the product in fp32
      (on the packed route in eager inference, else ``F.linear`` with autocast off, also with
      autograd: training under autocast), the output in the autocast dtype as autocast's linear
      gives it; gradients are those of the fp32 product.

    * fp32 training (autograd) on the packed route: the forward on the cached packed weight, the
      backward's two products (dx = dy . W, dW = dy^T . x) on the same micro-kernel
      (``packed_matmul``), where torch would call MKL's sgemm (at ~43% of an AVX-512 core on AMD).

    Everywhere else — the reference or triton backend, native-half training, torch.compile
    and tracing, other devices and dtypes, a CPU with bf16/fp16 GEMMs, a subclass or a hooked
    module (LoRA, feature hooks) — it is ``m(x)`` itself."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # first: dynamo folds it, traces none of the rest
        return m(x)
    if x.device.type != "cpu" or x.dim() < 2 or not _plain_linear(m):
        return m(x)
    if _backend.requested_backend() not in ("auto", "cpu"):
        return m(x)
    w = m.weight
    amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    inference = eager_inference(x, w, m.bias)
    bf16 = False  # the bf16 route: bf16 products on the weight packed as bf16
    if amp is not None:  # autocast: fp32 weights only
        if amp not in _HALF or w.dtype != torch.float32:
            return m(x)
        if _validate.native_half_gemm(amp):  # bf16 hardware: vitkern's bf16 kernel or torch's
            if not inference or not bf16_products(amp):
                return m(x)
            bf16 = True
        elif not inference or not packed_route():  # emulated half GEMMs: computed in fp32
            return _fp32_linear(x, w, m.bias, amp)
        else:
            x = x.to(torch.float32)
    else:
        if not inference and _trainable_fp32(x, w, m.bias):
            return _PackedLinear.apply(x, w, m.bias)  # fp32 training: forward and backward packed
        if not inference or not packed_route() or x.dtype != w.dtype:
            return m(x)
        if x.dtype != torch.float32:
            if x.dtype not in _HALF:
                return m(x)
            if _validate.native_half_gemm(x.dtype):
                if not bf16_products(x.dtype):
                    return m(x)
                bf16 = True
    wp = packed_weight(w, bf16=bf16)
    if wp is None:
        return m(x) if amp is None else _fp32_linear(x, w, m.bias, amp)
    x2 = x.reshape(-1, x.shape[-1])
    out = load_extension().linear_forward(x2.contiguous(), w, m.bias, wp)
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if amp is None else out.to(amp)


def _fp32_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, amp: torch.dtype) -> torch.Tensor:
    """The linear in fp32 with autocast off, forward and backward (a backward run inside the
    autocast region — the README's example, the bench's training step — would otherwise autocast
    its products to ``amp``: CPU backward runs on the calling thread, with its autocast state);
    the output in the autocast dtype ``amp``, the input's gradient in the input's dtype."""
    if not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))):
        with torch.autocast("cpu", enabled=False):
            return torch.nn.functional.linear(x.to(torch.float32), w, b).to(amp)
    return _FP32Linear.apply(x, w, b, amp)


class _FP32Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, amp):
        ctx.save_for_backward(x, w)
        ctx.bias_dtype = None if b is None else b.dtype
        with torch.autocast("cpu", enabled=False):
            return torch.nn.functional.linear(x.to(torch.float32), w, b).to(amp)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        with torch.autocast("cpu", enabled=False):
            g = grad.to(torch.float32).reshape(-1, w.shape[0])
            if ctx.needs_input_grad[0]:
                gx = (g @ w.to(torch.float32)).reshape(x.shape).to(x.dtype)
            if ctx.needs_input_grad[1]:
                gw = (g.t() @ x.reshape(-1, x.shape[-1]).to(torch.float32)).to(w.dtype)
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
                gb = g.sum(0).to(ctx.bias_dtype)
        return gx, gw, gb, None


def _trainable_fp32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether an fp32 linear with autograd can take the packed route (``_PackedLinear``): plain
    eager tensors (no compile / trace / torch function or dispatch mode), fp32 CPU, route on."""
    if not packed_route() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    for t in (x, w, b):
        if t is not None and (
            (type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter) or t.dtype != torch.float32
        ):
            return False
    return x.dim() >= 2 and x.shape[-1] == w.shape[1]


class _PackedLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` in fp32 on the packed route, forward and backward."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        wp = packed_weight(w)
        out = load_extension().linear_forward(x2, w.detach(), None if b is None else b.detach(), wp)
        return out.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        ext = load_extension()
        g = grad.reshape(-1, w.shape[0]).contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = ext.packed_matmul(g, w.detach().contiguous(), False).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gw = ext.packed_matmul(g, x.detach().reshape(-1, x.shape[-1]).contiguous(), True)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb
