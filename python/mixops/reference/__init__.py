"""Plain-PyTorch references for every mixops op: slow, obvious, used by tests and benchmarks."""
from .grouped_mm import grouped_mm

__all__ = ["grouped_mm"]
