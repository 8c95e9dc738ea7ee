"""Benchmark scripts (``python -m benchmarks.<name>``) and slow measurements (``make bench``)."""
