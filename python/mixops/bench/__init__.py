"""Benchmarks: `python -m mixops.bench [grouped_mm] [--quick] [--device cpu|cuda]`."""
