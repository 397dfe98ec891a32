"""vitkern's benchmark code: ``vitkern bench`` and the pytest-benchmark suites in benchmarks/.

* :mod:`~vitkern.bench.cases`: one op or model at one shape, dtype and pass, with its providers
  (vitkern's backends and the baselines); :class:`Case` and the case builders.
* :mod:`~vitkern.bench.baselines`: what vitkern is compared with (the public SP-ViT code,
  torch.compile of the eager code, OpenVINO / ONNX Runtime) and the GEMM routes behind each floor.
* :mod:`~vitkern.bench.timing`: interleaved timing, peak memory, one case measured into a record.
* :mod:`~vitkern.bench.report`: console tables, progress, plots.
* :mod:`~vitkern.bench.suite`: ``vitkern bench``'s options, the rows it runs (:func:`suite_cases`,
  the one place to add a row), and the run.
* :mod:`~vitkern.bench.pytest_glue`: the helpers benchmarks/ uses with pytest-benchmark.
"""

from vitkern.bench.baselines import gemm_peak_gflops, gemm_routes_gflops, public_spvit, public_spvit_prior
from vitkern.bench.cases import Case, attention_case, layernorm_mlp_case, model_case, patch_embed_case, vitkern_backends
from vitkern.bench.suite import run, suite_cases
from vitkern.bench.timing import Timing, environment, run_case, time_interleaved

__all__ = [
    "Case",
    "Timing",
    "attention_case",
    "environment",
    "gemm_peak_gflops",
    "gemm_routes_gflops",
    "layernorm_mlp_case",
    "model_case",
    "patch_embed_case",
    "public_spvit",
    "public_spvit_prior",
    "run",
    "run_case",
    "suite_cases",
    "time_interleaved",
    "vitkern_backends",
]
