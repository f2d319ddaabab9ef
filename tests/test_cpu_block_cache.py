"""The CPU block cache behind large op outputs (csrc/core/cpu_alloc.h): a freed output of >= 4 MiB
keeps its pages mapped and is handed to the next output of the same rounded size; a miss keeps the
cache and releases only blocks idle for more than MIXOPS_CPU_CACHE_STALE takes; a steady loop hits
from its second step on, whatever its first step freed and missed; idle blocks past
MIXOPS_CPU_CACHE_MB are released, oldest first; live tensors (and their views) never share a
block; MIXOPS_CPU_CACHE=0 turns it off; results never depend on it, even though a reused block
still holds the previous tensor's values."""

import json
import os
import subprocess
import sys

import pytest
import torch

import mixops
import mixops.reference as ref

# Resident memory (MiB) around large outputs, in a fresh process so no other test's blocks are
# cached. An address alone cannot tell a cache hit from the allocator mapping the same address
# again (it does, with the cache off), so the test watches the pages instead.
_RSS_PROBE = """
import json, os, torch, mixops
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
big = torch.randn(8192, 4096)    # relu-gated output: [8192, 2048] fp32, 64 MiB
small = torch.randn(2048, 2048)  # output 8 MiB: another size
out = {}
a = mixops.ops.gated_activation(big, "relu")
ptr = a.data_ptr()
out["alive"] = rss()
del a
out["freed"] = rss()
a = mixops.ops.gated_activation(big, "relu")
out["same_block"] = a.data_ptr() == ptr
out["hit"] = rss()
assert torch.equal(a, torch.relu(big[:, :2048]) * big[:, 2048:])
del a
out["freed_again"] = rss()
b = mixops.ops.gated_activation(small, "relu")
out["miss"] = rss()
print(json.dumps(out))
"""


def _probe(cache, limit_mb=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXOPS_CPU_CACHE")}
    if cache is not None:
        env["MIXOPS_CPU_CACHE"] = cache
    if limit_mb is not None:
        env["MIXOPS_CPU_CACHE_MB"] = str(limit_mb)
    p = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.parametrize("cache", [None, "1"], ids=["default", "on"])
def test_freed_block_stays_mapped_and_is_reused(cache):
    r = _probe(cache)
    assert r["freed"] > r["alive"] - 16, f"the freed 64 MiB block was unmapped: {r}"
    assert r["same_block"], r
    assert r["hit"] < r["freed"] + 16, f"a hit mapped new memory: {r}"


@pytest.mark.parametrize("cache", [None, "1"], ids=["default", "on"])
def test_a_miss_keeps_the_cache(cache):
    # the 8 MiB request misses: a new block is mapped and the cached 64 MiB block stays (a tensor
    # outliving its step must not empty the cache for the rest of the next one)
    r = _probe(cache)
    assert r["miss"] > r["freed_again"] + 4, r


_STALE_PROBE = """
import json, os, torch, mixops
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
big = torch.randn(8192, 4096)
a = mixops.ops.gated_activation(big, "relu")  # take 1: 64 MiB, freed at take 1
del a
out = {"freed": rss()}
keep = []
for rows in (1024, 1280, 1536):  # takes 2, 3, 4: 8, 10, 12 MiB, three misses
    keep.append(mixops.ops.gated_activation(torch.randn(rows, 4096), "relu"))
    out[f"miss{len(keep)}"] = rss()
print(json.dumps(out))
"""


def _run(code, **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXOPS_CPU_CACHE")}
    env.update(env_extra)
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_a_miss_releases_only_stale_blocks():
    # stale after 2 takes: the 64 MiB block freed at take 1 survives the misses of takes 2 and 3
    # (ages 1, 2) and is released by the miss of take 4 (age 3)
    r = _run(_STALE_PROBE, MIXOPS_CPU_CACHE_STALE="2")
    assert r["miss2"] > r["freed"] + 8, f"the idle block was released before it was stale: {r}"
    assert r["miss3"] < r["miss2"] - 32, f"the stale 64 MiB block survived a miss: {r}"
    r = _run(_STALE_PROBE)  # the default (4096 takes): it stays
    assert r["miss3"] > r["freed"] + 20, r


# A step whose frees interleave with misses (as a layer's backward frees its forward's outputs):
# the old policy (two misses in a row release the cache) released in the cold first step the
# blocks the second needed, and the second step's misses released them again, in every step.
_LOOP_PROBE = """
import json, resource, torch, mixops
xs = {r: torch.randn(r, 4096) for r in (2048, 4096, 1024, 1536)}
def step():
    a = mixops.ops.gated_activation(xs[2048], "relu")  # 16 MiB
    b = mixops.ops.gated_activation(xs[4096], "relu")  # 32 MiB
    del a
    c = mixops.ops.gated_activation(xs[1024], "relu")  # 8 MiB
    d = mixops.ops.gated_activation(xs[1536], "relu")  # 12 MiB
    del b, c, d
faults = []
for _ in range(5):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"faults": faults}))
"""


def test_a_steady_loop_hits_after_its_first_step():
    # a miss maps a new block: at least 34 faults of 2 MiB pages (68 MiB), thousands of 4 KiB
    # pages without huge pages; a step of hits touches mapped memory only
    faults = _run(_LOOP_PROBE)["faults"]
    assert faults[0] >= 30, faults
    assert max(faults[2:]) < 16, f"steps after the first still fault in new memory: {faults}"


def test_idle_blocks_past_the_limit_are_released():
    # a 32 MiB limit: the freed 64 MiB block is over it at once
    r = _probe(None, limit_mb=32)
    assert r["freed"] < r["alive"] - 32, f"the block over the limit stayed mapped: {r}"
    assert r["hit"] > r["freed"] + 32, r  # nothing to hit: the next output maps anew


def test_cache_off():
    r = _probe("0")
    assert r["freed"] < r["alive"] - 32, f"MIXOPS_CPU_CACHE=0 kept the freed block: {r}"


def _dirty_block(rows, cols, dtype=torch.float32):
    """Frees an output of [rows, cols] full of 7s (it goes to the cache); returns its address."""
    gate_up = torch.cat([torch.full((rows, cols), 7.0), torch.ones(rows, cols)], 1).to(dtype)
    dirty = mixops.ops.gated_activation(gate_up, "relu")
    assert dirty.numel() * dirty.element_size() >= 4 << 20 and bool((dirty == 7).all())
    ptr = dirty.data_ptr()
    del dirty
    return ptr


def test_outputs_that_must_be_zero_do_not_keep_stale_values():
    """Each op below gets the block of a freed output full of 7s; the parts it must zero stay 0."""
    h = 1024
    # permute: rows past the last expert's are zero (no-expert slots leave the tail empty)
    x = torch.randn(2048, h)
    ids = torch.randint(0, 8, (2048, 1), dtype=torch.int32)
    ids[::2] = -1
    ptr = _dirty_block(2048, h)
    p = mixops.ops.permute(x, ids, 8)
    assert p.x_sorted.data_ptr() == ptr, "the test needs the dirty block"
    xs, *_ = ref.permute(x, ids, 8)
    assert torch.equal(p.x_sorted, xs) and not p.x_sorted[1024:].any()
    # unpermute: a token whose choices all have no row is zero
    rm = p.row_map.clone()
    ptr = _dirty_block(2048, h)
    y = mixops.ops.unpermute(p.x_sorted, rm)
    assert y.data_ptr() == ptr
    assert torch.equal(y, torch.where(ids >= 0, x, 0)) and not y[::2].any()
    # unpermute_backward: rows no slot maps to are zero (the others: x's rows, as permute put them)
    ptr = _dirty_block(2048, h)
    g = torch.ops.mixops.unpermute_backward(x, rm, None, 2048)
    assert g.data_ptr() == ptr
    assert torch.equal(g, xs) and not g[1024:].any()
    # grouped_mm 2-D x 3-D: rows past offsets[-1] are zero
    a, b = torch.randn(2048, 64), torch.randn(2, 64, h)
    off = torch.tensor([500, 1500], dtype=torch.int32)
    ptr = _dirty_block(2048, h)
    out = mixops.grouped_mm(a, b, off)
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out, ref.grouped_mm(a, b, off))
    assert not out[1500:].any()
    # grouped_mm 2-D x 2-D: an empty group is a zero block
    a, b = torch.randn(1024, 300), torch.randn(300, 1024)
    off = torch.tensor([100, 100, 300, 300], dtype=torch.int32)
    ptr = _dirty_block(4096, 1024)
    out = mixops.grouped_mm(a, b, off)
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out, ref.grouped_mm(a, b, off))
    assert not out[1].any() and not out[3].any()


def test_live_blocks_and_views_are_never_handed_out_twice():
    x = torch.randn(4096, 1024)  # output 8 MiB: above the 4 MiB threshold
    expect = torch.relu(x[:, :512]) * x[:, 512:]
    first = mixops.ops.gated_activation(x, "relu")
    assert first.is_contiguous() and first.data_ptr() % (2 << 20) == 0
    view = first[10:20]
    ptr = first.data_ptr()
    del first  # the view keeps the block alive
    other = mixops.ops.gated_activation(x * 2, "relu")
    assert not (ptr <= other.data_ptr() < ptr + expect.nbytes)
    assert torch.equal(view, expect[10:20]), "a live view was overwritten"
    assert torch.equal(other, torch.relu(2 * x[:, :512]) * (2 * x[:, 512:]))
    del view, other


def test_cached_outputs_behave_like_tensors():
    x = torch.randn(4096, 1024)
    expect = torch.relu(x[:, :512]) * x[:, 512:]
    y = mixops.ops.gated_activation(x, "relu")
    y += 1  # in place
    assert torch.equal(y, expect + 1)
    y.resize_(0)  # torch may shrink any tensor
    assert y.numel() == 0
    del y
    again = mixops.ops.gated_activation(x, "relu")
    assert torch.equal(again, expect)


def test_results_do_not_depend_on_the_cache():
    code = (
        "import torch, mixops; torch.manual_seed(0); x = torch.randn(4096, 1024); "
        "print(mixops.ops.gated_activation(x, 'silu').double().sum().item())"
    )
    outs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "MIXOPS_CPU_CACHE": v},
            timeout=300,
        )
        for v in ("0", "1")
    ]
    for p in outs:
        assert p.returncode == 0, p.stderr
    assert outs[0].stdout == outs[1].stdout
