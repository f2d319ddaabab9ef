"""The CPU block cache behind large op outputs (csrc/cpu/cpu_alloc.h): freed blocks are reused,
live tensors never share memory, and results do not depend on it (MIXOPS_CPU_CACHE=0)."""
import subprocess
import sys

import torch

import mixops


def _big_output(x):
    return mixops.ops.gated_activation(x, "relu")  # [rows, 2F] -> [rows, F], one large output


def test_freed_block_is_reused_and_live_blocks_are_distinct():
    x = torch.randn(4096, 1024)  # output 8 MiB: above the 4 MiB threshold
    first = _big_output(x)
    ptr = first.data_ptr()
    expect = torch.relu(x[:, :512]) * x[:, 512:]
    torch.testing.assert_close(first, expect, rtol=0, atol=0)
    del first
    again = _big_output(x)
    assert again.data_ptr() == ptr  # the freed block came back
    other = _big_output(x * 2)
    lo, hi = again.data_ptr(), again.data_ptr() + again.nbytes
    assert not (lo <= other.data_ptr() < hi)  # a live block is never handed out twice
    torch.testing.assert_close(again, expect, rtol=0, atol=0)
    torch.testing.assert_close(other, torch.relu(2 * x[:, :512]) * (2 * x[:, 512:]), rtol=0, atol=0)
    assert again.is_contiguous() and again.data_ptr() % (2 << 20) == 0


def test_cached_outputs_behave_like_tensors():
    x = torch.randn(4096, 1024)
    y = _big_output(x)
    y += 1  # in place
    z = y.clone()
    assert torch.equal(z, y)
    y.resize_(0)  # torch may shrink any tensor
    assert y.numel() == 0


def test_results_do_not_depend_on_the_cache():
    code = ("import torch, mixops; torch.manual_seed(0); x = torch.randn(4096, 1024); "
            "print(mixops.ops.gated_activation(x, 'silu').double().sum().item())")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**__import__("os").environ, "MIXOPS_CPU_CACHE": v}, timeout=300)
            for v in ("0", "1")]
    for p in outs:
        assert p.returncode == 0, p.stderr
    assert outs[0].stdout == outs[1].stdout
