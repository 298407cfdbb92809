"""Benchmarks for lorasc_kernels: ``python -m benchmarks [--quick]``."""
