"""The multi-process benchmarks' launcher (ep, scmoe): ``world`` spawned processes in a gloo group
over loopback, the result of rank 0 handed back."""

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, port, worker, args, out):
    threads = max(1, (os.cpu_count() or 2) // world)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    try:
        result = worker(rank, world, args)
        if rank == 0:
            out.put(result)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done: leave without finalizing the interpreter. torch 2.14's gloo worker threads free a
    # finished collective's tensors after the caller returned, taking the GIL; one doing so while
    # the interpreter finalizes aborts the process ("terminate called without an active
    # exception") in about one run in five on 2 cores.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_world(worker, world, args):
    """Run ``worker(rank, world, args)`` in ``world`` processes (gloo, 127.0.0.1, a free port,
    the cores shared out as threads); returns what rank 0's worker returned."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(
        _entry, args=(world, port, worker, args, out), nprocs=world, start_method="spawn"
    )
    return out.get()
