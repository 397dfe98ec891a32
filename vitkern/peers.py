"""The CPU inference engines a user would otherwise deploy to: OpenVINO and ONNX Runtime.

Each ``*_runner`` exports the given PyTorch model once (the same weights vitkern
runs), checks the engine's logits against the model's own fp32 logits, and returns
a zero-argument callable that runs one inference on the engine, ready to be timed
side by side with vitkern. Both engines are optional dependencies
(``pip install vitkern[peers]``); a missing one raises :class:`PeerUnavailable`
with the install hint, which the benchmark suite prints instead of a timing.

Precision: fp32 is exported as is. OpenVINO's bf16 mode keeps the fp32 model and
sets ``INFERENCE_PRECISION_HINT=bf16`` (its CPU plugin then runs the matmuls on
AVX512-BF16 / AMX), which is how an OpenVINO user asks for bf16. ONNX Runtime's
CPU execution provider has no bf16 kernels for MatMul/Softmax/LayerNorm, so it
is reported as unsupported in bf16 rather than timed in fp32 under a bf16 label.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import torch

__all__ = ["PeerUnavailable", "onnxruntime_runner", "openvino_runner", "export_onnx"]


class PeerUnavailable(RuntimeError):
    """The engine is not installed or cannot run this model/dtype (the message says which)."""


def _logits_check(name: str, got, want: torch.Tensor, tol: float) -> float:
    got = torch.as_tensor(got).float()
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    if not err <= tol:
        raise PeerUnavailable(f"{name}: logits differ from PyTorch's by {err:.2e} (relative, max), over {tol:.0e}")
    return err


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path: str) -> str:
    """Export ``model`` at input ``x`` (fp32, static shape) to ONNX at ``path``."""
    model = model.eval()
    with torch.no_grad():
        # The TorchScript exporter: no onnxscript dependency, and the graph it writes for
        # a ViT (MatMul/Softmax/LayerNormalization/Erf) is what ORT's fusions expect.
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["logits"], opset_version=17, dynamo=False)
    return path


def onnxruntime_runner(
    model: torch.nn.Module, x: torch.Tensor, threads: int, dtype: torch.dtype = torch.float32
) -> tuple[Callable[[], object], float]:
    """ONNX Runtime (CPU execution provider, all graph optimisations) on ``model``.

    Returns ``(run, logits_rel_err)``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise PeerUnavailable("onnxruntime is not installed (pip install onnxruntime)") from exc
    if dtype != torch.float32:
        raise PeerUnavailable(f"ONNX Runtime's CPU provider has no {dtype} MatMul/Softmax kernels")
    x = x.float().contiguous()
    with torch.no_grad():
        want = model.eval()(x).float()
    tmp = tempfile.mkdtemp(prefix="vitkern-ort-")
    path = export_onnx(model, x, os.path.join(tmp, "model.onnx"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    err = _logits_check("ONNX Runtime", sess.run(None, feed)[0], want, 1e-4)

    def run() -> object:
        return sess.run(None, feed)[0]

    return run, err


def openvino_runner(
    model: torch.nn.Module, x: torch.Tensor, threads: int, dtype: torch.dtype = torch.float32
) -> tuple[Callable[[], object], float]:
    """OpenVINO's CPU plugin on ``model`` (converted from PyTorch with ``openvino.convert_model``).

    ``dtype`` float32 or bfloat16 (the inference precision hint). Returns ``(run, logits_rel_err)``."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise PeerUnavailable("openvino is not installed (pip install openvino)") from exc
    if dtype not in (torch.float32, torch.bfloat16):
        raise PeerUnavailable(f"OpenVINO's CPU plugin is benchmarked in float32 and bfloat16, not {dtype}")
    x = x.float().contiguous()
    model = model.eval()
    with torch.no_grad():
        want = model(x).float()
        ov_model = ov.convert_model(model, example_input=(x,))
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32",
    }
    core = ov.Core()
    if dtype == torch.bfloat16 and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise PeerUnavailable("OpenVINO: this CPU has no bf16 support")
    compiled = core.compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()
    feed = x.numpy()
    name = "OpenVINO" + (" bf16" if dtype == torch.bfloat16 else "")
    tol = 1e-4 if dtype == torch.float32 else 0.1
    err = _logits_check(name, request.infer([feed])[0], want, tol)

    def run() -> object:
        return request.infer([feed])[0]

    return run, err
