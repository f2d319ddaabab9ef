"""Python side of the mixops ops: wrappers with shape docstrings, fakes, autograd.

Each op family has its own module; importing this package registers them all. The C++ schemas
(csrc/ops.cpp) name this module through set_python_module, so torch asks for it when needed.
"""
from .grouped_mm import grouped_mm

__all__ = ["grouped_mm"]
