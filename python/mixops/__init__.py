"""mixops: Mixture-of-Experts, Mixture of Attention heads and Mixture-of-Depths operators.

Importing mixops loads the compiled extension ``mixops._C`` (which registers ``torch.ops.mixops.*``)
and the Python side of every op (fake implementations and autograd, in ``mixops.ops``).
"""

import torch

from ._loader import build_info, load_extension

_C = load_extension()

from . import ops  # noqa: E402  (registers fakes and autograd for the C++ schemas)
from .ops import grouped_mm  # noqa: E402


def check_errors() -> None:
    """Raise if a CUDA op met invalid input values since the last check, and clear the record.

    CUDA kernels cannot raise without a host sync, so for values in device memory (grouped_mm
    offsets, permute ids, unpermute row_map, router modality) they clamp or ignore the bad entries
    and set bits in a per-device error record instead. This reads every device's record (one
    synchronisation per device), clears it, and raises a ``RuntimeError`` with the CPU path's
    message for each op that saw bad values (sizes are those of the op's latest call). Call it
    where a sync is cheap: after a training step, in tests, when debugging. ``MIXOPS_DEBUG=1``
    instead checks after every call, except calls captured into a CUDA graph (a sync is illegal
    there): call this after replaying the graph. Not allowed during CUDA graph capture. Same op for
    other frameworks: ``torch.ops.mixops.check_errors()``. A no-op for CPU ops (they raise at the
    call).
    """
    torch.ops.mixops.check_errors()


__all__ = ["build_info", "check_errors", "grouped_mm", "ops"]
__version__ = "0.1.0"
