"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only`.

Each test times one provider of one case (vitkern backends and the baselines of
vitkern.bench.cases), grouped by case so the providers print side by side.
The default sweep is small; VITKERN_BENCH_FULL=1 runs the issue's full sweep
(N = 196..1024, batch 1 and 8, bf16 too). For interleaved timings with ratios,
spreads, GFLOP/s and plots use `vitkern bench`.
"""

from __future__ import annotations


def pytest_benchmark_update_machine_info(config, machine_info):
    from vitkern.bench import environment
    from vitkern.bench.pytest_glue import bench_device

    machine_info["vitkern"] = environment(bench_device())
