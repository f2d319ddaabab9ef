"""Plain-PyTorch references for every mixops op: slow, obvious, used by tests and benchmarks."""

from .grouped_mm import grouped_mm
from .permute import (
    permute,
    reorder_chunks,
    rows_to_slots,
    scatter_rows,
    slots_to_rows,
    unpermute,
)
from .routing import router_topk

__all__ = [
    "grouped_mm",
    "router_topk",
    "permute",
    "unpermute",
    "rows_to_slots",
    "slots_to_rows",
    "scatter_rows",
    "reorder_chunks",
]
