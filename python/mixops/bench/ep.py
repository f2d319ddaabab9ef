"""Expert-parallel benchmark (`python -m mixops.bench ep --world 2`): one ExpertParallelMoE layer
per rank (gloo processes on this machine; NCCL on GPUs), forward and forward+backward, with the
plain schedule (n = 1) and the chunked overlap (n = 4, 8), through the delay harness's link
(mixops.parallel.slow_link): each all-to-all completes no earlier than bytes / link speed after the
link is free. By default the link speed makes the forward's communication take as long as its
compute (``--link-mbps`` sets it). Reports per pass and n: the step time without the link, with
it, the communication time, and the fraction of the communication hidden,
(compute + comm - step) / comm.
"""

import argparse
import os
import statistics
import sys
import time

import torch

from .world import spawn_world

CHUNKS = (1, 4, 8)


def _shape(quick):
    # tokens per rank, hidden, ffn, experts, top-k
    return (256, 64, 128, 8, 2) if quick else (2048, 512, 1024, 8, 2)


def _median_ms(fn, reps, *args):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _worker(rank, world, args):
    from mixops.parallel import ExpertParallelMoE, slow_link

    T, H, F, E, k = _shape(args.quick)
    torch.manual_seed(0)
    layers = {n: ExpertParallelMoE(H, F, E, k, num_chunks=n) for n in CHUNKS}
    for m in layers.values():
        m.load_state_dict(layers[1].state_dict())
    x = torch.randn(T, H).requires_grad_(True)
    gy = torch.randn(T, H)

    def step(m, bwd):
        if bwd:
            x.grad = None
            m(x).backward(gy)
        else:
            with torch.no_grad():
                m(x)

    rows = []
    with slow_link(1e15) as trace:  # bytes per pass, measured once
        step(layers[1], False)
        fwd_bytes = sum(t[4] for t in trace if t[0] == "comm")
        trace.clear()
        step(layers[1], True)
        bwd_bytes = sum(t[4] for t in trace if t[0] == "comm")
    base = {(n, b): _median_ms(step, args.reps, layers[n], b) for n in CHUNKS for b in (0, 1)}
    speed = args.link_mbps * 1e6 if args.link_mbps else fwd_bytes / (base[(1, 0)] / 1e3)
    for b, nbytes in ((0, fwd_bytes), (1, bwd_bytes)):
        comm_ms = nbytes / speed * 1e3
        for n in CHUNKS:
            with slow_link(speed):
                ms = _median_ms(step, args.reps, layers[n], b)
            hidden = (base[(n, b)] + comm_ms - ms) / comm_ms
            rows.append(("fwd+bwd" if b else "fwd", n, base[(n, b)], ms, comm_ms, hidden))
    return rows, speed, (T, H, F, E, k)


def run(args):
    world = args.world
    rows, speed, (T, H, F, E, k) = spawn_world(_worker, world, args)
    print(
        f"mixops expert-parallel benchmark: world {world} (gloo, one machine, "
        f"{os.cpu_count()} cores, CPU capability {torch.backends.cpu.get_cpu_capability()}), "
        f"torch {torch.__version__}; per rank {T} tokens, hidden {H}, ffn {F}, E {E}, k {k}, "
        f"fp32; link {speed / 1e6:.1f} MB/s (delay harness); median ms of {args.reps} reps"
    )
    print("hidden = (step without link + comm - step with link) / comm (target >= 70%)")
    head = f"{'pass':<8} {'n':>3} {'no-link ms':>11} {'link ms':>9} {'comm ms':>9} {'hidden':>8}"
    print(head)
    print("-" * len(head))
    for pas, n, base, ms, comm, hid in rows:
        print(f"{pas:<8} {n:>3} {base:>11.2f} {ms:>9.2f} {comm:>9.2f} {100 * hid:>7.1f}%")
    sys.stdout.flush()
    return rows


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--world", type=int, default=2, help="ep: processes (gloo on this machine)")
    p.add_argument(
        "--link-mbps", type=float, default=0.0, help="ep: link speed in MB/s (0: comm = compute)"
    )
