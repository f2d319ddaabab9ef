"""grouped_mm bad input: a clear RuntimeError naming the argument, never a crash."""

import pytest
import torch

import mixops
from conftest import DEVICES


def _ok(device):
    return (
        torch.randn(6, 8, device=device),
        torch.randn(3, 8, 4, device=device),
        torch.tensor([2, 4, 6], dtype=torch.int32, device=device),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a, b, o: (a, b, o.long()), "offsets must be int32"),
        (lambda a, b, o: (a, b, o[:2]), "offsets must have length num_experts"),
        (lambda a, b, o: (a, b, o.view(3, 1)), "offsets must be 1-D"),
        (lambda a, b, o: (a, b.half(), o), "a and b must have the same dtype"),
        (lambda a, b, o: (a, b[:, :7], o), "K mismatch"),
        (lambda a, b, o: (a[0], b, o), "a must be 2-D"),
        (lambda a, b, o: (a.view(1, 6, 8), b, o), "a must be 2-D"),
        (lambda a, b, o: (a, b[0, 0], o), "b must be 3-D"),
        (lambda a, b, o: (a, b.view(1, 3, 8, 4), o), "b must be 3-D"),
        (lambda a, b, o: (a.int(), b.int(), o), "a must be float32, bfloat16 or float16"),
        (lambda a, b, o: (a, b, o.float()), "offsets must be int32"),
    ],
)
def test_bad_shapes_and_dtypes(device, change, match):
    a, b, o = change(*_ok(device))
    with pytest.raises(RuntimeError, match=match):
        mixops.grouped_mm(a, b, o)


@pytest.mark.parametrize(
    "offsets, match",
    [
        ([2, -1, 6], "offsets must be non-negative"),
        ([4, 2, 6], "offsets must be non-decreasing"),
        ([2, 4, 7], "offsets must be <= a.size\\(0\\) = 6"),
    ],
)
def test_bad_offset_values_cpu(offsets, match):
    a, b, _ = _ok("cpu")
    with pytest.raises(RuntimeError, match=match):
        mixops.grouped_mm(a, b, torch.tensor(offsets, dtype=torch.int32))


def test_bad_offset_values_2d_mode():
    with pytest.raises(RuntimeError, match="offsets must be <= a.size\\(1\\) = 5"):
        mixops.grouped_mm(
            torch.randn(3, 5), torch.randn(5, 2), torch.tensor([2, 6], dtype=torch.int32)
        )
    with pytest.raises(RuntimeError, match="K mismatch"):
        mixops.grouped_mm(
            torch.randn(3, 5), torch.randn(4, 2), torch.tensor([2, 4], dtype=torch.int32)
        )


def test_offsets_on_another_device():
    a, b, o = _ok("cpu")
    target = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(RuntimeError, match="offsets must be on the same device as a"):
        mixops.grouped_mm(a, b, o.to(target))


def test_b_on_another_device():
    a, b, o = _ok("cpu")
    target = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(RuntimeError, match="a and b must be on the same device"):
        mixops.grouped_mm(a, b.to(target), o)
