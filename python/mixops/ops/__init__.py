"""Python side of the mixops ops: wrappers with shape docstrings, fakes, autograd.

Each op family has its own module; importing this package registers them all. The C++ schemas
(csrc/ops.cpp) name these modules through set_python_module, so torch asks for them when needed.
"""

from .activation import gated_activation
from .grouped_mm import grouped_mm
from .grouped_mm_packed import grouped_mm_packed
from .permute import PermuteOutput, permute, rows_to_slots, slots_to_rows, unpermute
from .permute_chunks import reorder_chunks
from .permute_rows import scatter_rows
from .routing import RouterOutput, TopcOutput, router_topk, select_topc

__all__ = [
    "gated_activation",
    "grouped_mm",
    "grouped_mm_packed",
    "router_topk",
    "RouterOutput",
    "select_topc",
    "TopcOutput",
    "permute",
    "unpermute",
    "PermuteOutput",
    "rows_to_slots",
    "slots_to_rows",
    "scatter_rows",
    "reorder_chunks",
]
