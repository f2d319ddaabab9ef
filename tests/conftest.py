import pytest
import torch

import mixops  # noqa: F401  (registers torch.ops.mixops.*)

HAS_CUDA = torch.cuda.is_available() and mixops.build_info()["with_cuda"]

# Every op test is parametrised over these; CUDA cases run by themselves where a GPU is present
# and are reported as skipped elsewhere.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device/kernels")),
]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device/kernels")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
