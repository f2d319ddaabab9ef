"""mixops.check_errors(): the host side of device error reporting, which runs on CPU machines
(the CUDA side, which reads the per-device record, is exercised in the CUDA tests below)."""

import pytest
import torch

import mixops
from mixops import _C

SLOTS = list(_C._error_slots)


def _bits(**set_bits):
    return [set_bits.get(name, 0) for name in SLOTS]


def test_every_op_with_device_values_has_a_slot():
    assert SLOTS == [
        "grouped_mm",
        "router_topk",
        "router_topk_backward",
        "permute",
        "unpermute",
        "unpermute_backward",
        "unpermute_weights_backward",
        "rows_to_slots",
        "slots_to_rows",
        "scatter_rows",
        "scatter_rows_backward",
        "reorder_chunks",
        "grouped_mm_packed",
    ]


def test_no_bits_no_message():
    assert _C._describe_device_errors(0, _bits()) == ""


def test_messages_are_the_cpu_messages_with_the_latest_context():
    _C._record_error_context(3, "grouped_mm", 4096, 0)
    _C._record_error_context(3, "permute", 64, 8192)
    text = _C._describe_device_errors(3, _bits(grouped_mm=1 | 4, permute=1))
    lines = text.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("cuda:3: grouped_mm: invalid offsets:")
    assert "offsets must be non-negative" in lines[0]
    assert "offsets must be <= a.size(0) = 4096" in lines[0]
    assert "non-decreasing" not in lines[0]
    assert lines[1] == (
        "cuda:3: permute: invalid input values: ids values must be in "
        "[-1, num_experts = 64) (treated as -1);"
    )
    # A later launch replaces the context shown.
    _C._record_error_context(3, "permute", 128, 8192)
    assert "num_experts = 128" in _C._describe_device_errors(3, _bits(permute=1))


@pytest.mark.parametrize(
    "op, bit, needle",
    [
        ("router_topk", 1, "modality values must be in [0, num_modalities = 4)"),
        ("router_topk_backward", 2, "ids must name eligible experts"),
        ("unpermute", 2, "row_map values must be in [-1, num_rows = 77)"),
        ("unpermute_backward", 2, "unpermute_backward: invalid input values"),
        ("unpermute_weights_backward", 2, "unpermute_weights_backward: invalid input values"),
        ("unpermute_backward", 4, "row_map maps two slots to one row"),
        ("rows_to_slots", 2, "rows_to_slots: invalid input values: row_map values must be in"),
        ("slots_to_rows", 2, "row_map values must be in [-1, num_rows = 77)"),
        ("slots_to_rows", 4, "slots_to_rows: invalid input values: row_map maps two slots to"),
        ("scatter_rows", 2, "scatter_rows: invalid input values: index values must be in [-1, "),
        ("scatter_rows", 2, "num_rows = 77) (treated as -1);"),
        ("scatter_rows", 4, "scatter_rows: invalid input values: index holds a row twice"),
        ("scatter_rows_backward", 2, "scatter_rows_backward: invalid input values: index values"),
        ("scatter_rows_backward", 4, "scatter_rows_backward: invalid input values: index holds"),
        ("reorder_chunks", 8, "reorder_chunks: invalid input values: counts values must be >= 0"),
        ("reorder_chunks", 16, "reorder_chunks: invalid input values: counts sum to more rows"),
        ("reorder_chunks", 16, "than x has (num_rows = 77; the chunks were cut at row 77);"),
    ],
)
def test_each_slot_has_its_message(op, bit, needle):
    a, b = (4, 0) if op.startswith("router") else (0, 77)
    _C._record_error_context(5, op, a, b)
    assert needle in _C._describe_device_errors(5, _bits(**{op: bit}))


def test_bad_hook_arguments_are_errors():
    with pytest.raises(ValueError, match="unknown op"):
        _C._record_error_context(0, "no_such_op", 0, 0)
    with pytest.raises(ValueError, match="one entry per error slot"):
        _C._describe_device_errors(0, [1])


def test_check_errors_is_quiet_without_device_errors():
    # CPU ops raise at the call and leave no record; with no CUDA op run, nothing is pending.
    x = torch.randn(4, 8)
    ids = torch.tensor([[0], [1], [0], [1]], dtype=torch.int32)
    mixops.ops.permute(x, ids, 2)
    mixops.check_errors()
    torch.ops.mixops.check_errors()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_bad_values_are_kept_until_checked():
    dev = "cuda"
    mixops.check_errors()  # start clean
    a = torch.randn(8, 16, device=dev)
    b = torch.randn(2, 16, 4, device=dev)
    bad = torch.tensor([5, 3], dtype=torch.int32, device=dev)  # decreasing
    mixops.grouped_mm(a, b, bad)
    ids = torch.tensor([[0], [9]], dtype=torch.int32, device=dev)  # 9 >= num_experts
    mixops.ops.permute(torch.randn(2, 4, device=dev), ids, 2)
    with pytest.raises(RuntimeError) as info:
        mixops.check_errors()
    text = str(info.value)
    assert "offsets must be non-decreasing" in text and "num_experts = 2" in text
    mixops.check_errors()  # cleared: quiet now


@cuda
def test_cuda_duplicate_row_map_is_flagged_in_unpermute_backward():
    mixops.check_errors()
    grad_y = torch.randn(2, 4, device="cuda")
    row_map = torch.tensor([[0], [0]], dtype=torch.int32, device="cuda")  # both slots -> row 0
    with pytest.raises(RuntimeError, match="maps two slots to row 0"):  # the CPU raises at once
        torch.ops.mixops.unpermute_backward(grad_y.cpu(), row_map.cpu(), None, 2)
    out = torch.ops.mixops.unpermute_backward(grad_y, row_map, None, 2)
    assert torch.equal(out[0], grad_y[1]) and torch.all(out[1] == 0)  # the last slot is kept
    with pytest.raises(RuntimeError, match="row_map maps two slots to one row"):
        mixops.check_errors()
