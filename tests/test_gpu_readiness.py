"""Defects only a GPU would show, caught on the CPU (GitHub issue #13).

Nothing here launches a kernel: the Triton launchers run on CPU tensors with their
launches recorded (vitkern.triton_kernels.launches.capture), and each recorded launch is
compiled ahead of time for a CUDA architecture with the specialisation Triton's runtime
would derive from the same arguments; CUDA device state is mocked where it matters.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")

from vitkern.triton_kernels import gemm  # noqa: E402
from vitkern.triton_kernels import launches as L  # noqa: E402
from vitkern.triton_kernels import layernorm_mlp as lnk  # noqa: E402
from vitkern.triton_kernels import patch_embed as pek  # noqa: E402
from vitkern.triton_kernels import sp_attention as spk  # noqa: E402


def _attn_inputs(B=2, H=2, grid=(14, 14), prefix=1, Dh=64, dtype=torch.float16, prior=True):
    N = prefix + grid[0] * grid[1]
    qkv = torch.empty(B, N, 3, H, Dh, dtype=dtype)  # q, k, v as the model passes them: views of qkv
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    om = torch.empty(H, 2 * grid[0] - 1, 2 * grid[1] - 1, dtype=dtype) if prior else None
    return q, k, v, om, (grid if prior else None), (prefix if prior else 0)


def attention_launches(smem_limit=None, arch=None, **kw):
    q, k, v, om, grid, prefix = _attn_inputs(**kw)
    fwd = L.capture(spk.sp_attention_fwd, q, k, v, om, grid, prefix, 0.125, smem_limit=smem_limit, arch=arch)
    lse = torch.empty(q.shape[:3])
    bwd = L.capture(spk.sp_attention_bwd, q, q, k, v, om, q, lse, grid, prefix, 0.125, smem_limit=smem_limit, arch=arch)
    return fwd + bwd


def mlp_patch_launches(dtype=torch.float16):
    M, D, Hd = 394, 64, 256
    x = torch.empty(M, D, dtype=dtype)
    lw, lb, w1, b1, w2, b2 = (torch.empty(s, dtype=dtype) for s in ((D,), (D,), (Hd, D), (Hd,), (D, Hd), (D,)))
    out = L.capture(lnk.layernorm_mlp_fwd, x, lw, lb, w1, b1, None, None, w2, b2, 1e-6, 1, False, 0, True, True)
    mean, rstd, pre = torch.empty(M), torch.empty(M), torch.empty(M, Hd, dtype=dtype)
    out += L.capture(lnk.layernorm_mlp_bwd, x, x, lw, lb, w1, None, w2, mean, rstd, pre, 1, False, 0, True)
    # The gated MLP (A_GATED / B_GATED prologues, EPI_DGLU epilogue): packed fc1 (gate last), split fc1.
    H = Hd // 2
    w1g, w1v, w2g = (torch.empty(s, dtype=dtype) for s in ((H, D), (H, D), (D, H)))
    out += L.capture(lnk.layernorm_mlp_fwd, x, lw, lb, w1, b1, None, None, w2g, b2, 1e-6, 1, False, 2, True, True)
    out += L.capture(lnk.layernorm_mlp_fwd, x, lw, lb, w1g, None, w1v, None, w2g, b2, 1e-6, 1, False, 1, True, True)
    pre2 = torch.empty(M, Hd, dtype=dtype)
    out += L.capture(lnk.layernorm_mlp_bwd, x, x, lw, lb, w1, None, w2g, mean, rstd, pre2, 1, False, 2, True)
    out += L.capture(lnk.layernorm_mlp_bwd, x, x, lw, lb, w1g, w1v, w2g, mean, rstd, pre2, 1, False, 1, True)
    img, w, bias, pos = (torch.empty(s, dtype=dtype) for s in ((2, 3, 32, 32), (D, 3, 16, 16), (D,), (1, 4, D)))
    out += L.capture(pek.patch_embed_fwd, img, w, bias, pos)
    out += L.capture(pek.patch_embed_bwd, torch.empty(2, 4, D, dtype=dtype), img, w, True, True)
    return out


# ---------------------------------------------------------------- 1. 64-bit offsets
_LINE = re.compile(r"^\s*(%[\w]+)(?::\d+)? = ([\w.]+) (.*)$")


def narrow_index_products(ttir: str, loop_sources: bool) -> list[str]:
    """i32 multiplies of a program-id-derived index (and, with ``loop_sources``, a loop
    index) by a kernel argument (a stride or size), in Triton IR: such a product is a
    memory offset that wraps at 2**31 (Triton types integer arguments below 2**31 as i32)."""
    tainted, constant, args = set(), set(), set()
    bad = []
    for line in ttir.splitlines():
        if "tt.func" in line:
            args |= set(re.findall(r"(%arg\d+)", line))
        if loop_sources and (m := re.search(r"scf\.for (%\w+) =", line)):
            tainted.add(m.group(1))
        m = _LINE.match(line)
        if not m:
            continue
        res, op, rest = m.groups()
        rest = rest.split(" loc(")[0]
        operands = re.findall(r"%[\w]+", rest.split(" : ")[0])
        if op == "arith.constant":
            constant.add(res)
            continue
        if op == "tt.get_program_id" or any(o in tainted for o in operands):
            tainted.add(res)
        if op in ("tt.splat", "tt.broadcast", "tt.expand_dims") and operands and operands[0] in args:
            args.add(res)  # a kernel argument, spread over a tile
        if op == "arith.muli" and re.search(r"\bi32>?$", rest.strip()) and len(operands) == 2:
            a, b = operands
            for x, y in ((a, b), (b, a)):
                if x in tainted and y in args and y not in constant:
                    bad.append(line.strip())
    return bad


def test_offsets_are_64_bit_for_every_kernel():
    launches = attention_launches() + mlp_patch_launches()
    seen = set()
    checked = []
    for launch in launches:
        key = (launch.name, repr(L.specialise(launch, 80)[1:3]))
        if launch.name in {n for n, _ in seen} and launch.name != "fused_gemm_kernel":
            continue  # one configuration per kernel is enough: the tile does not change the index types
        if key in seen:
            continue
        seen.add(key)
        ttir = L.compile_launch(launch, 80).asm["ttir"]
        loops = not launch.name.startswith("_sp_attn")  # attention loops stay inside one (batch, head)
        bad = narrow_index_products(ttir, loops)
        assert not bad, f"{launch.name} {launch.config()}: 32-bit index x stride products:\n" + "\n".join(bad[:5])
        checked.append(launch.name)
    assert {"_sp_attn_fwd_kernel", "_sp_attn_bwd_dkdv_kernel", "_sp_attn_bwd_dq_kernel"} <= set(checked)
    assert {"_sp_attn_bwd_domega_kernel", "fused_gemm_kernel", "_ln_stats_kernel", "_ln_bwd_kernel"} <= set(checked)


def test_narrow_index_check_flags_a_32_bit_batch_offset():
    """The checker itself: the pre-fix forward's pattern (batch index from the program id
    times a stride argument, in i32) is reported; the same product after a cast is not."""
    ttir = """
  tt.func public @k(%arg0: !tt.ptr<f16>, %arg1: i32, %arg2: i32) {
    %0 = tt.get_program_id y : i32 loc(#loc1)
    %1 = arith.divsi %0, %arg2 : i32 loc(#loc2)
    %2 = arith.muli %1, %arg1 : i32 loc(#loc3)
    %3 = arith.extsi %1 : i32 to i64 loc(#loc4)
    %4 = arith.extsi %arg1 : i32 to i64 loc(#loc5)
    %5 = arith.muli %3, %4 : i64 loc(#loc6)
"""
    assert narrow_index_products(ttir, False) == ["%2 = arith.muli %1, %arg1 : i32 loc(#loc3)"]


# ---------------------------------------------------------------- 2. shared memory
def _family(arch: int) -> int:
    """Architectures whose Triton code generation is the same (8.x: mma.sync, cp.async)."""
    return 80 if arch in (80, 86, 89) else arch


@pytest.mark.parametrize("arch", sorted(L.SMEM_LIMIT))
def test_selected_attention_configs_fit_shared_memory(arch):
    """For each architecture's shared-memory limit, the largest configuration the runtime
    prune lets the autotuner try (it tries the others, smaller, too) compiles within the
    limit, in fp32 (the worst case: 4-byte tiles, IEEE dots) at head dim 128, with and
    without a prior; and every prune leaves at least one configuration."""
    limit = L.SMEM_LIMIT[arch]
    for prior in (True, False):
        launches = attention_launches(smem_limit=limit, Dh=128, dtype=torch.float32, prior=prior, B=1, H=1)
        by_kernel = {}
        for launch in launches:
            by_kernel.setdefault(launch.name, launch)  # the first kept is the largest
        assert {"_sp_attn_fwd_kernel", "_sp_attn_bwd_dkdv_kernel", "_sp_attn_bwd_dq_kernel"} <= set(by_kernel)
        for launch in by_kernel.values():
            shared = L.compile_launch(launch, _family(arch)).metadata.shared
            assert shared <= limit, f"sm_{arch} {launch.name} {launch.config()} prior={prior}: {shared} B > {limit} B"


def test_smem_bound_covers_compiled_kernels():
    """smem_bound (what the prune compares with the device's limit) is an upper bound of
    what Triton allocates, for the register-sweep tiles in fp16 (3 stages) and the fp32 tile
    set (2 stages), on sm_80 and sm_90."""
    for arch in (80, 90):
        for dtype in (torch.float16, torch.float32):
            deepest = 2 if dtype == torch.float32 else 3
            for launch in attention_launches(smem_limit=10**9, Dh=64, dtype=dtype, B=1, H=1):
                if launch.name == "_sp_attn_bwd_domega_kernel" or launch.kwargs["num_stages"] != deepest:
                    continue
                kind = {"_sp_attn_fwd_kernel": "fwd", "_sp_attn_bwd_dkdv_kernel": "dkdv"}.get(launch.name, "dq")
                kw = launch.kwargs
                stages = kw["num_stages"]
                bound = spk.smem_bound(kind, kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_D"], stages, dtype.itemsize)
                shared = L.compile_launch(launch, arch).metadata.shared
                assert shared <= bound, f"sm_{arch} {launch.name} {launch.config()} {dtype}: {shared} > {bound}"


def test_prune_reads_the_tensors_device(monkeypatch):
    """smem_limit asks for the properties of the tensor's device, not the current one."""
    asked = []

    class Props:
        shared_memory_per_block_optin = 101376

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: asked.append(d) or Props())
    assert gemm.smem_limit(torch.device("cuda", 1)) == 101376
    assert asked == [1]
    assert gemm.smem_limit(torch.device("cpu")) == gemm._SMEM_DEFAULT


# ---------------------------------------------------------------- 3. TF32 in fp32 attention
def test_fp32_attention_dots_are_ieee_unless_torch_allows_tf32():
    """With torch's default (no TF32 for fp32 matmuls) every fp32 attention kernel is built
    without TF32 tensor-core instructions; with TF32 allowed the launches ask for it. And
    none of the four kernels (d-omega's included) issues an atomic."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        seen = set()
        for launch in attention_launches(Dh=64, dtype=torch.float32, B=1, H=1):
            assert launch.kwargs["IEEE"] is True
            if launch.name in seen:
                continue
            seen.add(launch.name)
            ptx = L.compile_launch(launch, 80).asm["ptx"]
            assert "tf32" not in ptx, f"{launch.name}: TF32 instruction in an fp32 kernel with TF32 off"
            # d-omega without atomics (issue #13): no kernel of the attention backward has one.
            assert not re.search(r"^\s*(@%p\d+\s+)?(atom|red)\.", ptx, re.M), f"{launch.name}: atomic in the PTX"
        assert len(seen) == 4
        matmul.fp32_precision = "tf32"
        assert all(launch.kwargs["IEEE"] is False for launch in attention_launches(Dh=64, dtype=torch.float32))
        # fp16 never asks for IEEE dots (the flag is about fp32 products only).
        assert all(launch.kwargs["IEEE"] is False for launch in attention_launches(Dh=64, dtype=torch.float16))
    finally:
        matmul.fp32_precision = before


# ---------------------------------------------------------------- 4. TF32 read through the new API
@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_gemm_reads_tf32_through_the_new_api(setting):
    """After ``torch.backends.cuda.matmul.fp32_precision = ...`` (where the legacy
    ``allow_tf32`` raises) the fp32 GEMM launch neither raises nor ignores the setting."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = setting
        a, b, out = torch.empty(64, 32), torch.empty(32, 48), torch.empty(64, 48)
        (launch, *_) = L.capture(gemm.fused_gemm, a, b, out, 64, 48, 32, a_strides=(32, 1), b_strides=(48, 1))
        assert launch.kwargs["ALLOW_TF32"] is (setting == "tf32")
        assert gemm.tf32_allowed() is (setting == "tf32")
    finally:
        matmul.fp32_precision = before


# ---------------------------------------------------------------- 5. device guard
def test_launches_run_under_the_tensors_device(monkeypatch):
    """Every launcher enters the device guard of its tensors before launching, and the guard
    of a cuda:1 tensor selects device 1 while the current device is 0."""
    events = []

    class Guard:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            events.append(("enter", self.index))

        def __exit__(self, *exc):
            events.append(("exit", self.index))

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with gemm.cuda_device_guard(torch.device("cuda", 1)):
        pass
    assert events == [("enter", 1), ("exit", 1)]

    # The launchers: every launch happens inside exactly one guard, entered for a tensor.
    events.clear()
    guarded = []

    def guard(t):
        guarded.append(isinstance(t, torch.Tensor))
        return Guard(torch.device("cuda", 1))

    # (the gated MLP's own launches are the fused GEMM's and layernorm_mlp's norm kernels)
    for mod in (gemm, lnk, spk):
        monkeypatch.setattr(mod, "device_guard", guard)
    init = L.Launch.__init__

    def record(self, *a, **kw):
        init(self, *a, **kw)
        events.append(("launch", sum({"enter": 1, "exit": -1}.get(e[0], 0) for e in events)))

    monkeypatch.setattr(L.Launch, "__init__", record)
    n = len(attention_launches(B=1, H=1)) + len(mlp_patch_launches())
    launched = [depth for kind, depth in events if kind == "launch"]
    assert len(launched) == n and n > 0
    assert all(depth == 1 for depth in launched), "a launch outside the device guard"
    assert guarded and all(guarded)


# ---------------------------------------------------------------- 6. grid limits
def test_attention_grid_within_cuda_limits_for_large_batch_times_heads():
    """B*H = 70,000 (ViT-B inference at batch 5,834): the launch grid the launchers compute
    (through attention_grid) stays within CUDA's limits on every axis."""
    B, H, N = 5834, 12, 197
    assert B * H > 65535
    for block in (16, 32, 64):
        grid = spk.attention_grid(B, H, N, block)
        assert all(g <= lim for g, lim in zip(grid, L.CUDA_GRID_LIMITS, strict=False)), grid
        assert grid[0] == -(-N // block) * B * H
    # The captured launches use that function: their grid for a small case matches it.
    for launch in attention_launches(B=3, H=2):
        if launch.name != "_sp_attn_bwd_domega_kernel":
            block = launch.kwargs["BLOCK_N" if "dkdv" in launch.name else "BLOCK_M"]
            assert launch.grid == spk.attention_grid(3, 2, 197, block)
            assert len(launch.grid) == 1


def test_attention_prune_drops_per_architecture_spills(monkeypatch):
    """The attention prune reads the compute capability of the tensor's device and drops the
    fp16/bf16 tiles that spill only there: the 3-stage forward at Dh 32 with a prior on
    sm_100, the 2-stage dK/dV at Dh 64 without a prior on sm_120; sm_80 keeps both."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (12, 0) if d == 1 else (8, 0))
    assert gemm.capability(torch.device("cuda", 1)) == 120
    assert gemm.capability(torch.device("cuda", 0)) == 80
    assert gemm.capability(torch.device("cpu")) == 80
    limit = 101376
    assert (64, 32, 4, 3) in spk.select_configs("fwd", 32, True, 2, limit, 80)
    assert (64, 32, 4, 3) not in spk.select_configs("fwd", 32, True, 2, limit, 100)
    assert (32, 64, 8, 2) in spk.select_configs("dkdv", 64, False, 2, limit, 80)
    assert spk.select_configs("dkdv", 64, False, 2, limit, 120) == [(32, 64, 8, 3)]
    fwd = [x for x in attention_launches(Dh=32, arch=100) if x.name == "_sp_attn_fwd_kernel"]
    assert fwd and all(x.kwargs["num_stages"] != 3 for x in fwd)


def test_gemm_prune_drops_sm120_spills(monkeypatch):
    """The fused GEMM's prune drops, on sm_120 only, the tiles that spill there (image-gather
    B prologue at 64 x 128, image scatter at 128 x 128)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = torch.empty(0, dtype=torch.float16)

    def tiles(**modes):
        kept = gemm._prune(gemm._AUTOTUNE_CONFIGS, {"M": 4096, "N": 4096, "A": a}, **modes)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept}

    assert (64, 128) in tiles(B_MODE=3, C_MODE=0) and (128, 128) in tiles(B_MODE=0, C_MODE=1)
    monkeypatch.setattr(gemm, "capability", lambda device=None: 120)
    assert (64, 128) not in tiles(B_MODE=3, C_MODE=0) and (128, 128) not in tiles(B_MODE=0, C_MODE=1)
    assert (64, 128) in tiles(B_MODE=0, C_MODE=0)


def test_gemm_prune_fp32_tiles_per_architecture(monkeypatch):
    """fp32 keeps only 32 x 64 (64/128-row tiles spill in dW1/dW2), except on sm_120 where
    32 x 64 spills with the LayerNorm prologue + GELU/STORE_PRE epilogue and with a plain A
    + residual: those take 64 x 64 / 4 stages there (32 x 64 for a problem under 64 rows)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = torch.empty(0, dtype=torch.float32)

    def tiles(M=4096, **modes):
        kept = gemm._prune(gemm._AUTOTUNE_CONFIGS, {"M": M, "N": 4096, "A": a}, **modes)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in kept]

    fc1 = dict(A_MODE=1, B_MODE=0, C_MODE=0, EPI_GELU=True, STORE_PRE=True)
    fc2 = dict(A_MODE=0, B_MODE=0, C_MODE=0, HAS_RES=True)
    dw2 = dict(A_MODE=0, B_MODE=3, C_MODE=0)
    for arch in (80, 90, 100):
        monkeypatch.setattr(gemm, "capability", lambda device=None, arch=arch: arch)
        assert tiles(**fc1) == tiles(**fc2) == tiles(**dw2) == [(32, 64, 4)]
    monkeypatch.setattr(gemm, "capability", lambda device=None: 120)
    assert tiles(**fc1) == tiles(**fc2) == [(64, 64, 4)]
    assert tiles(**dw2) == tiles(A_MODE=2, B_MODE=0, C_MODE=0, HAS_RES=True) == [(32, 64, 4)]
    assert tiles(M=20, **fc1) == [(32, 64, 4)]
    # Inference fc1 (no STORE_PRE) spills 32 B at 32 x 64 on sm_120 too (six-architecture report).
    assert tiles(A_MODE=1, B_MODE=0, C_MODE=0, EPI_GELU=True) == [(64, 64, 4)]
    # The gated fc2 prologue (A_GATED + residual): 16 B at 32 x 64 in fp32 on sm_100.
    gated_fc2 = dict(A_MODE=gemm.A_GATED, B_MODE=0, C_MODE=0, HAS_RES=True)
    monkeypatch.setattr(gemm, "capability", lambda device=None: 100)
    assert tiles(**gated_fc2) == [(64, 64, 4)]
    monkeypatch.setattr(gemm, "capability", lambda device=None: 90)
    assert tiles(**gated_fc2) == [(32, 64, 4)]


def test_gemm_prune_drops_gated_prologue_spills(monkeypatch):
    """The gated fc2 prologue spills 256-280 B at 128 x 64 / 4 warps / 4 stages on sm_86, 89 and
    120 (fp16/bf16) and 8 B at 64 x 128 on sm_100 (bf16): the prune drops those tiles."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = torch.empty(0, dtype=torch.float16)
    gated_fc2 = dict(A_MODE=gemm.A_GATED, B_MODE=0, C_MODE=0, HAS_RES=True)

    def tiles(**modes):
        kept = gemm._prune(gemm._AUTOTUNE_CONFIGS, {"M": 4096, "N": 4096, "A": a}, **modes)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}

    for arch in (80, 86, 89, 90, 100, 120):
        monkeypatch.setattr(gemm, "capability", lambda device=None, arch=arch: arch)
        kept = tiles(**gated_fc2)
        assert kept and (128, 64, 4, 4) not in kept, (arch, kept)
        if arch == 100:
            assert all(t[:2] != (64, 128) for t in kept), kept
        else:
            assert any(t[:2] == (64, 128) for t in kept), (arch, kept)
    monkeypatch.setattr(gemm, "capability", lambda device=None: 86)
    assert (128, 64, 4, 4) in tiles(A_MODE=0, B_MODE=0, C_MODE=0, HAS_RES=True)  # other modes keep it


def test_attention_fp32_tiles_per_architecture():
    """fp32 dK/dV with a prior at BLOCK_D 64 takes 32 x 16 / 8 warps on sm_90 (16 x 16 / 8
    warps left 8 B of stack at Dh 48 there); every other architecture and kernel keeps the
    fp32 tile set; the autotuner's space holds both; the sm_90 tile compiles without a spill."""
    limit = 232448
    for head_dim in (48, 64):
        assert spk.select_configs("dkdv", head_dim, True, 4, limit, 90) == [(32, 16, 8, 2)]
        assert spk.select_configs("dkdv", head_dim, True, 4, limit, 80) == [(16, 16, 8, 2)]
        assert spk.select_configs("dkdv", head_dim, False, 4, limit, 90) == [(16, 16, 8, 2)]
        assert spk.select_configs("fwd", head_dim, True, 4, limit, 90) == [(16, 16, 8, 2)]
    assert spk.select_configs("dkdv", 128, True, 4, limit, 90) == [(16, 16, 8, 2)]
    configs = spk._sp_attn_bwd_dkdv.configs
    space = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}
    assert {(32, 16, 8, 2), (16, 16, 8, 2)} <= space
    dkdv = [
        x
        for x in attention_launches(arch=90, Dh=48, dtype=torch.float32, B=1, H=1)
        if x.name == "_sp_attn_bwd_dkdv_kernel"
    ]
    assert [x.config() for x in dkdv] == ["32x16x64 w8 s2"]
    assert "STACK:0" in _resource_usage(L.compile_launch(dkdv[0], 90))


def _resource_usage(compiled) -> str:
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
        return res.stdout
    finally:
        os.unlink(f.name)


def test_hopper_prior_tiles_reach_wgmma():
    """On sm_90 the attention autotuner may pick a 64-row tile with the prior at Dh 64
    (wgmma needs 64 rows per warpgroup; the 32-row register-sweep tiles give mma.sync),
    offered before the sweep tile, on sm_90 only; it compiles to wgmma without a spill."""
    limit = L.SMEM_LIMIT[90]
    for kind in ("fwd", "dkdv", "dq"):
        got = spk.select_configs(kind, 64, True, 2, limit, 90)
        assert got[:2] == [(64, 64, 8, 3), (64, 64, 8, 2)], (kind, got)
        assert got[2:] == spk.select_configs(kind, 64, True, 2, limit, 80)
        for arch in (80, 86, 89, 100, 120):
            assert all(c[0] < 64 for c in spk.select_configs(kind, 64, True, 2, L.SMEM_LIMIT[arch], arch))
    fwd = [x for x in attention_launches(arch=90, Dh=64, B=1, H=1) if x.name == "_sp_attn_fwd_kernel"]
    assert fwd[0].config() == "64x64x64 w8 s3"
    compiled = L.compile_launch(fwd[0], 90)
    assert "wgmma" in compiled.asm["ptx"]
    assert "STACK:0" in _resource_usage(compiled)


def test_build_report_dumps_the_ptx_of_every_build(tmp_path):
    """scripts/gpu_build_report.py --dump-ptx DIR writes one PTX file a build (the check
    that a refactoring of a kernel's source leaves the generated code unchanged): as many
    files as the report counts builds, each the named kernel compiled for the asked
    architecture. Three small builds (the d-omega kernel, sm_80, fp32)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import SUBPROCESS_CWD, subprocess_env

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_build_report.py"
    out_dir = tmp_path / "ptx"
    cmd = [sys.executable, str(script), "--arch", "80", "--dtype", "fp32", "--kernel", "domega", "--jobs", "1"]
    res = subprocess.run(
        [*cmd, "--dump-ptx", str(out_dir)], capture_output=True, text=True, env=subprocess_env(), cwd=SUBPROCESS_CWD
    )
    assert res.returncode == 0, res.stderr[-2000:]
    builds = int(re.search(r"; (\d+) kernel builds;", res.stderr).group(1))
    files = sorted(os.listdir(out_dir))
    assert builds >= 1 and len(files) == builds, (builds, files)
    for i, name in enumerate(files):
        assert name.startswith(f"{i:04d}_sm_80_fp32_sp_attn_bwd_domega_kernel_") and name.endswith(".ptx"), name
        ptx = (out_dir / name).read_text()
        assert re.search(r"^\.target sm_80\b", ptx, re.M), name
        assert ".entry _sp_attn_bwd_domega_kernel(" in ptx, name
