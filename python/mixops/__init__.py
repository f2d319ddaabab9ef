"""mixops: Mixture-of-Experts, Mixture of Attention heads and Mixture-of-Depths operators.

Importing mixops loads the compiled extension ``mixops._C`` (which registers ``torch.ops.mixops.*``)
and the Python side of every op (fake implementations and autograd, in ``mixops.ops``).
"""
from ._loader import build_info, load_extension

_C = load_extension()

from . import ops  # noqa: E402  (registers fakes and autograd for the C++ schemas)
from .ops import grouped_mm  # noqa: E402

__all__ = ["build_info", "grouped_mm", "ops"]
__version__ = "0.1.0"
