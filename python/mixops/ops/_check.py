"""TORCH_CHECK for the fakes: each op's Python validator (beside its fake in ops/<family>.py, or
in ops/<family>_checks.py) is a line-by-line copy of its C++ validation (csrc/<family>/check.cpp),
and ``check`` formats the message pieces as c10 prints them, so a meta or FakeTensor call raises
the CPU op's message to the letter (tests/test_fake_parity.py holds them equal).

The C++ checks cannot be called from the fakes instead: under torch.compile with dynamic shapes
the sizes are SymInts, which at::Tensor::sizes() refuses, and a check on a symbolic size has to
become a guard (torch._check), not a branch on one value.
"""

import torch

__all__ = ["check", "FLOATS", "INT32_MAX"]

INT32_MAX = 2**31 - 1
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# c10::ScalarType names: how `<< scalar_type` prints a dtype.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
    torch.complex32: "ComplexHalf",
}


def _c10_str(v):
    """A message piece as `std::ostream << v` prints it in c10 (sizes, dtype, device, double)."""
    if isinstance(v, torch.dtype):
        return _SCALAR_TYPE_NAMES.get(v, str(v))
    if isinstance(v, (torch.Size, list, tuple)):  # IntArrayRef: [2, 3]
        return "[" + ", ".join(str(s) for s in v) + "]"
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):  # default ostream precision: %g
        return f"{v:g}"
    return str(v)


def check(cond, *pieces):
    """TORCH_CHECK(cond, pieces...): raises RuntimeError with the pieces formatted as c10 does;
    a symbolic cond becomes a guard or runtime assertion (torch._check)."""
    torch._check(cond, lambda: "".join(_c10_str(p) for p in pieces))
