"""`vitkern bench --quick` runs end to end in seconds, so the main job cannot rot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("timm")


def test_vitkern_bench_quick(tmp_path):
    exe = shutil.which("vitkern")
    cmd = [exe] if exe else [sys.executable, "-m", "vitkern.cli"]
    res = subprocess.run(
        [*cmd, "bench", "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GFLOP/s" in res.stdout and "sp_attention" in res.stdout
    assert "speed-up vs each baseline" in res.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    env = data["environment"]
    assert env["threads"] >= 1 and env["torch"]
    routes = env["gemm_routes_gflops"]["float32"]  # every GEMM route measured, the floor is the fastest
    assert routes and all(g > 0 for g in routes.values())
    ops = {r["op"] for r in data["results"]}
    assert ops == {"sp_attention", "layernorm_mlp", "patch_embed", "model"}
    amp = [r for r in data["results"] if r["op"] == "model" and r["params"].get("autocast")]
    assert amp and {"vitkern", "timm eager"} <= set(amp[0]["providers"])  # the mixed-precision row
    att = next(r for r in data["results"] if r["op"] == "sp_attention")
    assert {"eager", "public SP-ViT code", "SDPA (no prior)"} <= set(att["providers"])
    for r in data["results"]:
        for p in r["providers"].values():
            assert p["median_ms"] > 0 and len(p["samples_ms"]) == 3
    assert (tmp_path / "attention_speedup.png").stat().st_size > 0
    # The CPU engines: each either timed after its logits matched PyTorch's, or reported as missing.
    model = next(r for r in data["results"] if r["op"] == "model")
    for peer in ("OpenVINO", "ONNX Runtime"):
        if peer in model["providers"]:
            assert model["notes"][f"{peer} logits rel. err"] <= 1e-4
        else:
            assert peer in model["failures"], model["failures"]


def test_vitkern_info():
    exe = shutil.which("vitkern")
    cmd = [exe] if exe else [sys.executable, "-m", "vitkern.cli"]
    res = subprocess.run([*cmd, "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "reference  available" in res.stdout
    # Derived from vitkern.BACKEND_TABLE: one status line per backend, the auto order per device.
    for b in __import__("vitkern").BACKENDS:
        assert f"\n{b:10s} " in "\n" + res.stdout, (b, res.stdout)
    assert "auto order: cpu tensors: cpu -> reference; cuda tensors: triton -> reference" in res.stdout
    from vitkern._ext import load_extension

    ext = load_extension()
    if ext is not None and f"vitkern._C: {ext.__file__}" in res.stdout:  # the same build as this process
        assert "vitkern._C ABI: LibTorch stable ABI (torch>=" in res.stdout, res.stdout
        assert "abi3" in res.stdout and "torch.ops.vitkern_C" in res.stdout, res.stdout
        from vitkern.ops._validate import native_half_gemm

        bf16 = "yes" if native_half_gemm(__import__("torch").bfloat16) else "no"
        assert f"half-precision GEMMs in this CPU: bfloat16 {bf16}," in res.stdout, res.stdout


def test_interleaved_timing_pauses_between_timed_calls():
    """``settle_s`` (the models suite sets it when a peer engine runs: ONNX Runtime's workers
    keep spinning after a run) separates every timed call from the previous one."""
    import time

    from vitkern.bench.timing import time_interleaved

    stamps: list[tuple[str, float, float]] = []

    def fn(name):
        def run():
            t0 = time.perf_counter()
            time.sleep(0.001)
            stamps.append((name, t0, time.perf_counter()))

        return run

    out = time_interleaved({"a": fn("a"), "b": fn("b")}, "cpu", warmup=0, repeats=3, settle_s=0.05)
    assert [len(t.samples_ms) for t in out.values()] == [3, 3]
    gaps = [nxt[1] - prev[2] for prev, nxt in zip(stamps[:-1], stamps[1:], strict=True)]
    assert len(gaps) == 5 and min(gaps) >= 0.05, gaps
