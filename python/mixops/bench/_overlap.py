"""How much of the link time compute covered, read from the delay harness's trace
(``mixops.parallel.slow_link``; records [kind, name, start, end(, bytes)]): the measure the
multi-process benchmarks (ep, scmoe) put first. Unlike a step-time difference it does not depend on
how fast the machine happened to be between two runs, only on what ran while each exchange was on
the link.
"""

import time

import torch.distributed as dist

from .._trace import slow_link

__all__ = ["union", "covered_share", "step_ms"]


def union(spans):
    """The union of intervals ``(start, end)`` as sorted, disjoint ``[start, end]`` pairs (empty
    and reversed intervals dropped; touching ones merged)."""
    merged = []
    for s, e in sorted(spans):
        if not e > s:
            continue
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def covered_share(trace):
    """The share of the exchanges' link time that compute covers: for each exchange ("comm"
    record, from its start to its end), the length of the union of all compute intervals
    ("compute" records) that lies inside it, summed over the exchanges and divided by the sum of
    their lengths. Compute outside every exchange counts for nothing, and compute intervals that
    overlap each other count once. Records not finished (end None: an exchange never waited, a
    backward never reached) are left out; 0.0 when there is no link time."""
    compute = union(
        (t[2], t[3]) for t in trace if t[0] == "compute" and t[2] is not None and t[3] is not None
    )
    link = covered = 0.0
    for t in trace:
        if t[0] != "comm" or t[2] is None or t[3] is None:
            continue
        a, b = t[2], t[3]
        link += b - a
        for s, e in compute:
            if s >= b:
                break
            covered += max(0.0, min(e, b) - max(s, a))
    return covered / link if link > 0 else 0.0


def step_ms(run, speed, covered):
    """The ms of ``run()``, started together on every rank (a barrier first). With a link
    ``speed`` (bytes/s) it runs in a fresh ``slow_link`` and its trace's covered share is appended
    to ``covered``; with None it runs without the harness."""
    dist.barrier()
    t0 = time.perf_counter()
    if speed is None:
        run()
    else:
        with slow_link(speed) as trace:  # a fresh link and trace per step
            run()
        covered.append(covered_share(trace))
    return (time.perf_counter() - t0) * 1e3
