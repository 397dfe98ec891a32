"""Triton GPU kernels (imported lazily: triton is optional on the CPU)."""
