"""Baselines: the formulations vitkern is compared with (the public SP-ViT code, the peers'
engines; torch.compile of the eager code is :func:`vitkern.bench.cases.add_compiled`) and the
GEMM routes that give each op's floor."""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from vitkern.bench.cases import Case


def public_spvit_prior(
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """The public SP-ViT code's formulation: the relation MLP evaluated on all
    N x N (dx, dy) pairs every forward, giving the (H, N, N) prior."""
    gh, gw = grid
    rows = torch.arange(gh, device=w1.device).repeat_interleave(gw)
    cols = torch.arange(gw, device=w1.device).repeat(gh)
    rel = torch.stack([cols[None, :] - cols[:, None], rows[None, :] - rows[:, None]], dim=-1).to(w1.dtype)
    hidden = torch.relu(torch.einsum("ijc,hkc->hijk", rel, w1) + b1[:, None, None, :])
    return torch.einsum("hijk,hk->hij", hidden, w2) + b2[:, None, None]


def public_spvit(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a vitkern SP-ViT whose SP-SA layers follow the public SP-ViT code:
    relation MLP over all N x N pairs, dense prior, eager softmax attention."""
    m = copy.deepcopy(model)

    def forward(self, x, grid, num_prefix_tokens):
        B, N, C = x.shape
        q, k, v = self.split_qkv(x)
        s = q @ k.transpose(-2, -1) * self.scale
        if self.spatial_relation is not None:
            r = self.spatial_relation
            prior = public_spvit_prior(r.w1, r.b1, r.w2, r.b2, grid)
            if num_prefix_tokens:
                prior = F.pad(prior, (num_prefix_tokens, 0, num_prefix_tokens, 0), value=1.0)
            s = s * prior
        out = s.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    for blk in m.blocks:
        blk.attn.forward = types.MethodType(forward, blk.attn)
    return m


def add_peer_providers(case: Case, model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> None:
    """OpenVINO and ONNX Runtime on an fp32 copy of ``model`` (SP-ViT: vitkern's own model on the
    reference backend, plain PyTorch ops, as a CPU user would export it), in the case's dtype
    where the engine supports it; a missing or failing engine is recorded in ``case.failures``."""
    import vitkern
    from vitkern import peers

    threads = case.threads or torch.get_num_threads()
    # ONNX Runtime's workers spin for tens of ms after a run: pause before each timed call so
    # the next provider is not billed for it (timing.time_interleaved).
    case.settle_s = 0.1
    fp32 = copy.deepcopy(model).float().eval()
    xf = x.float()
    for label, runner in (("OpenVINO", peers.openvino_runner), ("ONNX Runtime", peers.onnxruntime_runner)):
        if dtype == torch.bfloat16:
            label += " bf16"
        try:
            with vitkern.use_backend("reference"):
                run, err = runner(fp32, xf, threads, dtype)
            case.providers[label] = run
            case.notes[f"{label} logits rel. err"] = err
        except Exception as exc:  # optional engines: report, never abort the suite
            case.failures[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def gemm_routes_gflops(device: torch.device | str = "cpu", dtype=torch.float32, n: int = 1536) -> dict[str, float]:
    """Measured throughput (GFLOP/s) of an n^3 product through each GEMM route the installed
    torch offers for ``dtype`` on ``device``, timed interleaved.

    CPU routes: ``torch.mm`` (fp32: MKL ``sgemm`` when torch has MKL; bf16/fp16: oneDNN,
    which uses AMX or AVX512-BF16 where the CPU has them) and oneDNN's own fp32 matmul
    through ``mkldnn_linear`` on a prepacked weight; where the cpu kernels' weight GEMMs take
    vitkern's packed route (csrc/vitkern/gemm.h), that kernel on a prepacked weight too (in
    bf16: vitkern's bf16 kernel, where the CPU has AVX512-BF16). GPU: ``torch.mm`` (cuBLAS)."""
    from vitkern.bench.timing import time_interleaved

    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    routes: dict[str, Callable[[], object]] = {}
    if device.type == "cpu":
        blas = "MKL sgemm" if dtype == torch.float32 and torch.backends.mkl.is_available() else "oneDNN"
        routes[f"torch.mm ({blas})"] = lambda: torch.mm(a, b)
        if dtype == torch.float32 and torch.backends.mkldnn.is_available():
            try:
                a_mk, w_mk = a.to_mkldnn(), b.t().contiguous().to_mkldnn()
                torch._C._nn.mkldnn_linear(a_mk, w_mk, None)
                routes["oneDNN (mkldnn_linear, packed)"] = lambda: torch._C._nn.mkldnn_linear(a_mk, w_mk, None)
            except RuntimeError:  # a torch build without the op for this dtype
                pass
        from vitkern.ops._packed import bf16_products, packed_route

        if dtype == torch.float32 and packed_route():  # vitkern's own GEMM, where it is the cpu kernels' route
            from vitkern._ext import load_extension

            ext = load_extension()
            w = b.t().contiguous()
            wp = ext.pack_gemm_weight(w)
            routes["vitkern packed (gemm.h)"] = lambda: ext.linear_forward(a, w, None, wp)
        if bf16_products(dtype):  # vitkern's bf16 kernel (AVX512-BF16), bf16 in and out as torch.mm
            from vitkern._ext import load_extension

            ext = load_extension()
            wb = b.t().contiguous()
            wpb = ext.pack_gemm_weight_bf16(wb)
            routes["vitkern packed bf16 (gemm.h)"] = lambda: ext.linear_forward(a, wb, None, wpb)
    else:
        routes["torch.mm (cuBLAS)"] = lambda: torch.mm(a, b)
    t = time_interleaved(routes, device, warmup=2, repeats=5)
    return {name: 2 * n**3 / (t[name].median * 1e-3) / 1e9 for name in routes}


def gemm_peak_gflops(device: torch.device | str = "cpu", dtype=torch.float32, n: int = 1536) -> float:
    """The device's practical GEMM peak for ``dtype``: the fastest route of :func:`gemm_routes_gflops`."""
    return max(gemm_routes_gflops(device, dtype, n).values())
