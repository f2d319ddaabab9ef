"""Expert-parallel benchmark (`python -m mixops.bench ep --world 2`): one ExpertParallelMoE layer
per rank (gloo processes on this machine; NCCL on GPUs), forward and forward+backward, with the
plain schedule (n = 1) and the chunked overlap (n = 4, 8), through the delay harness's link
(mixops.parallel.slow_link): each all-to-all completes no earlier than bytes / link speed after the
link is free. By default the link speed makes the forward's communication take as long as its
compute (``--link-mbps`` sets it). Reports per pass and n, first the traced share: how much of each
exchange's link time the recorded expert compute ("experts", "experts.backward") covers in the
harness's trace (``_overlap.covered_share``, the measure scmoe reports too), which does not
subtract two step times taken apart and so depends far less on how busy the machine is; then the
fraction of the communication hidden by step times,
(step without link + comm - step with link) / comm, the step times and the communication time.
Medians over ``--reps`` repeats, the steps without and with the link interleaved in both orders.

``--fsdp`` (``--world 4 --ep 2``) times the same layer the way a training job holds it: under FSDP2
on a (dp x ep) DeviceMesh of world / ep x ep, by mixops.parallel.fsdp's recipe (the experts sharded
over dp by ``fully_shard_experts``, the rest over the flattened mesh), so each step also carries
FSDP2's parameter all-gathers (and, with the backward, its gradient reduce-scatters). Those run over
gloo at loopback speed, outside the delay harness, which models only the expert-parallel
all-to-alls; they count in both step times alike, so the traced share and the comm ms keep their
meaning, while the step times show what FSDP2 adds. The default link speed is set as without
``--fsdp``, from the plain forward's step time, which here includes FSDP2's all-gathers.
"""

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

from ._overlap import step_ms
from .world import spawn_world

CHUNKS = (1, 4, 8)


def _shape(quick):
    # tokens per rank, hidden, ffn, experts, top-k
    return (256, 64, 128, 8, 2) if quick else (2048, 512, 1024, 8, 2)


def _fsdp_layers(world, ep, shape):
    """{n: Sequential(ExpertParallelMoE) under FSDP2} on a (world / ep) x ep mesh, every n's layer
    holding the same weights (one seeded single-process MoE's state dict, identical on every rank,
    cut to each rank's shards before wrapping) so that the chunk counts differ in schedule only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mixops.nn import MoE
    from mixops.parallel import ExpertParallelMoE, fully_shard_experts, load_full_state_dict

    H, F, E, k = shape
    mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))
    dense = mesh._flatten("dp_ep")  # once: every net shares the flattened mesh
    torch.manual_seed(0)
    full = {f"0.{key}": v for key, v in MoE(H, F, E, k).state_dict().items()}
    nets = {}
    for n in CHUNKS:
        net = torch.nn.Sequential(ExpertParallelMoE(H, F, E, k, group=mesh["ep"], num_chunks=n))
        load_full_state_dict(net, full)
        fully_shard_experts(net, mesh["dp"])
        nets[n] = fully_shard(net, mesh=dense)
    return nets


def _worker(rank, world, args):
    from mixops.parallel import ExpertParallelMoE, slow_link

    T, H, F, E, k = _shape(args.quick)
    torch.manual_seed(0)
    if args.fsdp:
        layers = _fsdp_layers(world, args.ep, (H, F, E, k))
    else:
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

    def once_ms(m, bwd, speed, covered):
        return step_ms(lambda: step(m, bwd), speed, covered)

    def paired(m, bwd, speed):
        """Median ms without and with the link (interleaved, in both orders, so that the
        machine's drift hits both alike) and the median covered share."""
        ts, covered = {None: [], speed: []}, []
        for rep in range(args.reps):
            for sp in (None, speed) if rep % 2 else (speed, None):
                ts[sp].append(once_ms(m, bwd, sp, covered))
        return statistics.median(ts[None]), statistics.median(ts[speed]), statistics.median(covered)

    for m in layers.values():  # warm up
        step(m, False)
        step(m, True)
    with slow_link(1e15) as trace:  # bytes per pass, measured once
        step(layers[1], False)
        fwd_bytes = sum(t[4] for t in trace if t[0] == "comm")
        trace.clear()
        step(layers[1], True)
        bwd_bytes = sum(t[4] for t in trace if t[0] == "comm")
    if args.link_mbps:
        speed = args.link_mbps * 1e6
    else:  # the forward's comm as long as the plain forward's compute (the same on every rank)
        fwd_ms = statistics.median([once_ms(layers[1], 0, None, []) for _ in range(args.reps)])
        fwd_ms = torch.tensor(fwd_ms, dtype=torch.float64)
        dist.all_reduce(fwd_ms, op=dist.ReduceOp.MAX)
        speed = fwd_bytes / (fwd_ms.item() / 1e3)
    rows = []
    for b, nbytes in ((0, fwd_bytes), (1, bwd_bytes)):
        comm_ms = nbytes / speed * 1e3
        for n in CHUNKS:
            base, ms, traced = paired(layers[n], b, speed)
            hidden = (base + comm_ms - ms) / comm_ms
            rows.append(("fwd+bwd" if b else "fwd", n, traced, hidden, base, ms, comm_ms))
    return rows, speed, (T, H, F, E, k)


def run(args):
    world = args.world
    if args.fsdp and (args.ep < 1 or world % args.ep or _shape(args.quick)[3] % args.ep):
        raise SystemExit(
            f"ep --fsdp: --ep ({args.ep}) must divide --world ({world}) and the number of "
            f"experts ({_shape(args.quick)[3]})"
        )
    rows, speed, (T, H, F, E, k) = spawn_world(_worker, world, args)
    mode = f", FSDP2 on a dp {world // args.ep} x ep {args.ep} mesh" if args.fsdp else ""
    print(
        f"mixops expert-parallel benchmark: world {world}{mode} (gloo, one machine, "
        f"{os.cpu_count()} cores, CPU capability {torch.backends.cpu.get_cpu_capability()}), "
        f"torch {torch.__version__}; per rank {T} tokens, hidden {H}, ffn {F}, E {E}, k {k}, "
        f"fp32; link {speed / 1e6:.1f} MB/s (delay harness); median of {args.reps} reps"
    )
    print(
        "traced = the share of the exchanges' link time that the recorded expert compute covers "
        "in rank 0's trace (target >= 70% for n = 8); hidden = (step without link + comm - step "
        "with link) / comm, from step times (secondary: noisy on a shared machine)"
    )
    if args.fsdp:
        print(
            "FSDP2: the link delays only the expert-parallel all-to-alls (comm ms); FSDP2's "
            "all-gathers and reduce-scatters run over gloo at loopback speed in both step times"
        )
    head = (
        f"{'pass':<8} {'n':>3} {'traced':>8} {'hidden':>8} {'no-link ms':>11} {'link ms':>9} "
        f"{'comm ms':>9}"
    )
    print(head)
    print("-" * len(head))
    for pas, n, traced, hid, base, ms, comm in rows:
        print(
            f"{pas:<8} {n:>3} {100 * traced:>7.1f}% {100 * hid:>7.1f}% {base:>11.2f} {ms:>9.2f} "
            f"{comm:>9.2f}"
        )
    sys.stdout.flush()
    return rows


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--world", type=int, default=2, help="processes (gloo on this machine)")
    p.add_argument(
        "--link-mbps", type=float, default=0.0, help="link speed in MB/s (0: comm = compute)"
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="the layer under FSDP2 on a (world/ep x ep) DeviceMesh (mixops.parallel.fsdp)",
    )
    p.add_argument(
        "--ep", type=int, default=2, help="with --fsdp: the expert-parallel size (divides --world)"
    )
