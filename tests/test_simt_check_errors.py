"""Reading and clearing the device error record (mixops.check_errors(), MIXOPS_DEBUG=1).

The CUDA side of check_errors() used to copy the record to the host and then clear it with a
cudaMemset on the legacy stream: bits that kernels on other streams set between the two were wiped
unreported. It now exchanges every slot with 0 in one kernel (core/errors_kernel.cuh, one
atomicExch per slot) on the current torch stream and reads what the exchange returned. The kernel
runs here on the SIMT harness (tests/simt/drivers/errors.cpp, the real launch code of
core/errors.cu) under the four harness runs: every slot's bits come back, every slot is zeroed,
for record sizes from one slot (MIXOPS_DEBUG's check of one op) past one block and past the grid
cap (the grid-stride loop), and slots outside the range are left alone. The harness does not model
concurrent launches (its atomics are plain read-modify-writes), so that a bit set between a read
and a clear is kept is argued by the kernel's one atomicExch per slot, and exercised on a GPU
below (skipped without CUDA).
"""

import ctypes
import threading

import pytest
import torch

import mixops
from conftest import requires_cuda
from mixops import _C
from simt_driver import RUNS, SimtRun, call, load_driver, requires_cxx, run_all

NUM_SLOTS = len(_C._error_slots)


@pytest.fixture(scope="module")
def lib():
    lib = load_driver("errors")
    lib.simt_exchange_error_bits.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.POINTER(SimtRun),
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    lib.simt_exchange_error_bits_grid.argtypes = [ctypes.c_void_p]
    return lib


def _random_bits(n, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64, generator=g).to(torch.int32)
    bits[torch.rand(n, generator=g) < 0.3] = 0  # many slots stay clean
    return bits


def exchange(lib, record, n=None, offset=0, runs=None):
    """Runs the launch on record[offset : offset + n] under every harness run (fresh copies of
    record each time); returns (out [n], record afterwards)."""
    n = record.numel() - offset if n is None else n
    before = record.clone()

    def launch(outs, run):
        rec, out = outs
        rec_ptr = rec.data_ptr() + 4 * offset
        call(lib.simt_exchange_error_bits, rec_ptr, out.data_ptr(), n, run=run)

    def fresh():
        out = torch.empty(max(n, 1), dtype=torch.int32)
        out.view(torch.uint8).fill_(0xA5)  # a slot the kernel skips shows
        return [before.clone(), out]

    rec, out = run_all(fresh, launch, runs)
    return out[:n], rec


@requires_cxx
@pytest.mark.parametrize("n", [1, NUM_SLOTS, 31, 32, 33, 100, 5000, 40000])
def test_exchange_returns_and_clears_every_slot(lib, n):
    record = _random_bits(n, seed=n)
    out, after = exchange(lib, record)
    assert torch.equal(out, record), "the bits returned are not the record's"
    assert torch.count_nonzero(after) == 0, "the record was not cleared"


@requires_cxx
def test_grid_covers_one_block_and_caps(lib):
    grid = (ctypes.c_int64 * 2)()
    for n, blocks in [(1, 1), (NUM_SLOTS, 1), (33, 2), (40000, 1024)]:
        record = torch.zeros(n, dtype=torch.int32)
        out = torch.empty(n, dtype=torch.int32)
        call(lib.simt_exchange_error_bits, record.data_ptr(), out.data_ptr(), n, run=RUNS[0])
        lib.simt_exchange_error_bits_grid(grid)
        assert (grid[0], grid[1]) == (blocks, 32), n


@requires_cxx
@pytest.mark.parametrize("slot", [0, 3, NUM_SLOTS - 1])
def test_one_slot_leaves_the_others(lib, slot):
    # MIXOPS_DEBUG=1's check of one op takes its own slot only: bits of other ops stay for
    # mixops.check_errors().
    record = _random_bits(NUM_SLOTS, seed=slot) | 1  # every slot has bits
    out, after = exchange(lib, record, n=1, offset=slot)
    assert out.tolist() == [record[slot].item()]
    expect = record.clone()
    expect[slot] = 0
    assert torch.equal(after, expect)


@requires_cxx
def test_nothing_to_take_launches_nothing(lib):
    record = _random_bits(NUM_SLOTS, seed=7)
    out, after = exchange(lib, record, n=0)
    assert torch.equal(after, record)
    grid = (ctypes.c_int64 * 2)()
    lib.simt_exchange_error_bits_grid(grid)
    assert grid[0] == 0


@requires_cxx
def test_every_bit_is_reported_by_exactly_one_check(lib):
    # Kernels OR bits in between checks (here: between launches, host-side); each check reports
    # exactly the bits set since the previous one, and together they report every bit set.
    g = torch.Generator().manual_seed(0)
    record = torch.zeros(NUM_SLOTS, dtype=torch.int32)
    pending = torch.zeros(NUM_SLOTS, dtype=torch.int32)
    for step in range(6):
        for _ in range(3):
            slot = int(torch.randint(NUM_SLOTS, (1,), generator=g))
            bit = 1 << int(torch.randint(0, 31, (1,), generator=g))
            record[slot] |= bit
            pending[slot] |= bit
        out, record = exchange(lib, record, runs=RUNS[:2])
        assert torch.equal(out, pending), f"check {step} reported other bits than were set"
        pending.zero_()


# ---- on a GPU --------------------------------------------------------------------------------


def _bad_permute(stream):
    # Inputs made on the same stream as the op (no cross-stream use).
    with torch.cuda.stream(stream):
        ids = torch.tensor([[0], [9]], dtype=torch.int32, device="cuda")  # 9 >= num_experts = 2
        mixops.ops.permute(torch.randn(2, 4, device="cuda"), ids, 2)


@requires_cuda
def test_cuda_bits_from_a_side_stream_are_read_on_another():
    mixops.check_errors()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(s1):
        torch.cuda._sleep(10_000_000)  # the bad launch runs well after check_errors() starts
        _bad_permute(s1)
    with torch.cuda.stream(s2), pytest.raises(RuntimeError, match="num_experts = 2"):
        mixops.check_errors()
    mixops.check_errors()  # taken once: quiet now


@requires_cuda
def test_cuda_launches_racing_checks_are_each_reported():
    # One thread launches bad ops on its own stream while this one checks; a launch that finished
    # (its stream synchronised) before a check began is reported by that check or an earlier one.
    mixops.check_errors()
    stream = torch.cuda.Stream()
    done = []

    def launcher():
        for _ in range(50):
            _bad_permute(stream)
            stream.synchronize()
            done.append(1)

    t = threading.Thread(target=launcher)
    t.start()
    reported = 0
    while t.is_alive() or reported == 0:
        finished_before = len(done)
        try:
            mixops.check_errors()
            assert finished_before == 0 or reported > 0, (
                f"{finished_before} bad launches finished before this check and none was reported"
            )
        except RuntimeError as e:
            assert "num_experts = 2" in str(e)
            reported += 1
    t.join()
    stream.synchronize()
    try:
        mixops.check_errors()
    except RuntimeError:
        pass
    mixops.check_errors()  # clean once everything is taken
