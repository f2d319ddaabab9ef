"""Expert parallelism on a GPU (skips without one): with torch.cuda._sleep queued on the
communication stream before each exchange (standing for a slow link), the chunked schedule's
expert GEMMs run on the compute stream meanwhile: the step takes clearly less than compute plus
the link time. World size 1 over NCCL (the exchange itself is local)."""

import pytest
import torch

from dist_harness import run_world

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _step_ms(ep, x, reps=5):
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        ep(x)
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def _overlap_on_streams(rank, world):
    import mixops.parallel.comm as comm
    from mixops.parallel import ExpertParallelMoE

    torch.manual_seed(0)
    n = 4
    ep = ExpertParallelMoE(2048, 4096, 8, 2, num_chunks=n, capacity_factor=1.0,
                           device="cuda", dtype=torch.bfloat16)  # fmt: skip
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        base = _step_ms(ep, x)  # compute (and local exchanges) alone
        # One exchange's sleep: about a quarter of the compute per chunk's exchange pair.
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        torch.cuda._sleep(10**7)
        t1.record()
        torch.cuda.synchronize()
        cycles = int(10**7 * (base / (2 * n)) / t0.elapsed_time(t1))
        comm.CUDA_LINK_SLEEP_CYCLES = cycles
        try:
            linked = _step_ms(ep, x)
        finally:
            comm.CUDA_LINK_SLEEP_CYCLES = 0
    link_ms = base  # 2 * n exchanges of base / (2 n) each
    hidden = (base + link_ms - linked) / link_ms
    print(
        f"ep overlap, {n} chunks: compute {base:.2f} ms, link {link_ms:.2f} ms, step with the "
        f"link {linked:.2f} ms, hidden {hidden:.0%}"
    )  # for bench/gpu_check.sh's report (pytest -s)
    assert hidden > 0.5, f"compute {base:.2f} ms, link {link_ms:.2f} ms, step {linked:.2f} ms"


def test_chunked_exchanges_overlap_compute_on_the_gpu():
    run_world(_overlap_on_streams, 1, backend="nccl")


def _shortcut_on_streams(rank, world):
    from torch import nn

    import mixops.parallel.comm as comm
    from mixops.nn import MLP, ShortcutDecoderLayer
    from mixops.parallel import ExpertParallelMoE
    from mixops.reference.decoder import SelfAttention

    torch.manual_seed(0)
    H, kw = 2048, dict(device="cuda", dtype=torch.bfloat16)
    moe = ExpertParallelMoE(H, 1024, 8, 2, capacity_factor=1.0, **kw)
    layer = ShortcutDecoderLayer(
        moe,
        [SelfAttention(H, 16, **kw), SelfAttention(H, 16, **kw)],
        [MLP(H, 8192, "swiglu", **kw), MLP(H, 8192, "swiglu", **kw)],
        [nn.RMSNorm(H, **kw), nn.RMSNorm(H, **kw)],
        [nn.RMSNorm(H, **kw), nn.RMSNorm(H, **kw)],
    )
    x = torch.randn(4, 2048, H, **kw).requires_grad_(True)

    def step():
        x.grad = None
        layer(x).float().square().mean().backward()

    step()
    base = _step_ms(lambda _: step(), None)
    # 4 exchanges per step (dispatch, combine and their gradients), each about 10% of the step:
    # together shorter than the dense sublayers they hide behind.
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    torch.cuda._sleep(10**7)
    t1.record()
    torch.cuda.synchronize()
    comm.CUDA_LINK_SLEEP_CYCLES = int(10**7 * (0.1 * base) / t0.elapsed_time(t1))
    try:
        linked = _step_ms(lambda _: step(), None)
    finally:
        comm.CUDA_LINK_SLEEP_CYCLES = 0
    link_ms = 0.4 * base
    hidden = (base + link_ms - linked) / link_ms
    assert hidden >= 0.85, f"step {base:.2f} ms, link {link_ms:.2f} ms, with link {linked:.2f} ms"


def test_shortcut_layer_hides_its_exchanges_on_the_gpu():
    run_world(_shortcut_on_streams, 1, backend="nccl")
