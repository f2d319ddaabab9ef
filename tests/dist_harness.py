"""Multi-process tests on one machine: ``run_world(fn, world, *args)`` spawns ``world`` processes,
each joining a gloo (or NCCL) group over loopback (127.0.0.1, a free port) with a bounded collective timeout,
and runs ``fn(rank, world, *args)``. A worker's exception fails the test with its traceback; a
worker still running at the deadline is killed and fails the test: never a hang."""

import gc
import os
import socket
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60  # a collective waiting longer than this raises in the worker
DEADLINE_S = 180  # the whole world


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, errors, backend):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    # torch read the thread count when the spawned process imported it (unpickling the test
    # function), before the variable above: without this every rank runs 2+ threads on the 2
    # cores, and the oversubscribed OpenMP pools stall each other by tens of ms at random.
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        try:
            fn(rank, world, *args)
            # Free what the test left in reference cycles (modules, autograd contexts holding the
            # group or its works) while the interpreter is alive, and have every rank out of its
            # last collective before any rank tears the group down.
            gc.collect()
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    exit_now()


def exit_now():
    """End a worker that succeeded without finalizing the interpreter. torch 2.14's gloo worker
    threads destroy a finished collective's Work after the caller has returned, and that
    decrefs the Python tensors it held, which takes the GIL; a thread that does so while the
    main thread finalizes the interpreter is made to exit (pthread_exit) inside a noexcept
    destructor: "terminate called without an active exception", SIGABRT, in about one
    run in five on 2 cores (gdb: ~AsyncAllgatherWork in ProcessGroupGloo::runLoop)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_world(fn, world, *args, deadline=DEADLINE_S, backend="gloo"):
    """Run ``fn(rank, world, *args)`` in ``world`` processes (gloo; "nccl": one GPU each); raise
    on any failure."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = mp.start_processes(
        _worker,
        args=(world, _free_port(), fn, args, errors, backend),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    end = time.monotonic() + deadline
    try:
        while not procs.join(timeout=max(0.1, min(1.0, end - time.monotonic()))):
            if time.monotonic() > end:
                raise TimeoutError(f"run_world: the {world} workers did not finish in {deadline} s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # raised, or crashed
        reports = []
        while not errors.empty():
            reports.append(errors.get())
        detail = "\n".join(f"rank {r}:\n{tb}" for r, tb in sorted(reports)) or str(e)
        raise AssertionError(f"run_world: a worker failed\n{detail}") from None
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()


def single_process_reference(ref, xs, rank, dropless):
    """What the single-process layer ``ref`` gives rank ``rank``'s tokens ``xs[rank]`` under the
    loss sum(y^2): (output, gradient of those tokens). Dropless: one call over every rank's tokens
    (expert parallelism must not change the result). With a capacity: each rank's tokens alone
    (capacity is per rank). ``ref``'s parameter gradients accumulate the same loss."""
    if dropless:
        xa = torch.cat(xs).requires_grad_(True)
        ya = ref(xa)
        ya.square().sum().backward()
        start, n = sum(t.shape[0] for t in xs[:rank]), xs[rank].shape[0]
        return ya[start : start + n], xa.grad[start : start + n]
    outs = []
    for xr in xs:
        xr = xr.clone().requires_grad_(True)
        yr = ref(xr)
        yr.square().sum().backward()
        outs.append((yr, xr.grad))
    return outs[rank]
