"""One small case per mixops kernel, forward and backward, for compute-sanitizer (memcheck,
racecheck, synccheck) on a GPU: `compute-sanitizer --tool memcheck python bench/sanitize_cases.py`.

Small shapes, because every instrumented launch is slow; odd sizes, empty experts and -1 ids so
the edge paths run too. Each case checks its result against the CPU op (a sanitizer run that
passes but computes garbage is no pass) and mixops.check_errors() must stay quiet. `--device cpu`
runs the same cases on the CPU (a self-test of this script where no GPU is).
"""

import argparse
import sys
import time

import torch

import mixops
from mixops.ops import (
    gated_activation,
    grouped_mm,
    permute,
    reorder_chunks,
    router_topk,
    rows_to_slots,
    scatter_rows,
    select_topc,
    slots_to_rows,
    unpermute,
)


def _close(a, b, what, tol):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    if not err <= tol * (1 + b.abs().max().item() if b.numel() else 1):
        raise AssertionError(f"{what}: max error {err:.3g} vs the CPU op")


def _grad_case(fn, inputs, device, what, tol):
    """fn(*inputs) and the gradients of its inputs on ``device`` against the CPU op."""
    outs = {}
    for dev in ("cpu", device):
        xs = [t.detach().to(dev).requires_grad_(t.is_floating_point()) for t in inputs]
        y = fn(*xs)
        g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape).to(dev)
        y.backward(g)
        outs[dev] = [y] + [x.grad for x in xs if x.requires_grad]
    for i, (a, b) in enumerate(zip(outs[device], outs["cpu"])):
        _close(a, b, f"{what} output {i}", tol)


def case_grouped_mm(device):
    # E 5 with an empty expert and rows past the end; bf16 (SM90 wgmma / SM80 tensor cores), fp32
    # (CUTLASS 2 SIMT), fp64 and an unaligned k (the fallback kernel); backward makes the transposed
    # layouts and the 2-D x 2-D weight-gradient mode.
    off = torch.tensor([40, 40, 97, 150, 190], dtype=torch.int32)
    for dtype, k, n, tol in (
        (torch.bfloat16, 64, 128, 2e-2),
        (torch.float32, 64, 96, 1e-4),
        (torch.float64, 24, 40, 1e-9),
        (torch.bfloat16, 20, 36, 2e-2),
    ):
        a = torch.randn(200, k, dtype=dtype)
        b = torch.randn(5, k, n, dtype=dtype) / k**0.5
        _grad_case(
            lambda a, b: grouped_mm(a, b, off.to(a.device)),
            [a, b],
            device,
            f"grouped_mm {dtype} k={k} n={n}",
            tol,
        )
        bt = torch.randn(5, n, k, dtype=dtype).transpose(-1, -2)  # HF's layout, used in place
        _grad_case(
            lambda a, b: grouped_mm(a, b, off.to(a.device)),
            [a, bt],
            device,
            f"grouped_mm {dtype} HF layout",
            tol,
        )


def case_router(device):
    logits = torch.randn(77, 64)
    for kw in ({}, {"score_fn": "sigmoid", "num_groups": 8, "groups_kept": 4}):
        ref = router_topk(logits, 6, **kw)
        got = router_topk(logits.to(device), 6, **kw)
        if not torch.equal(ref.ids, got.ids.cpu()):
            raise AssertionError(f"router_topk {kw}: ids differ from the CPU op")

    def weights_and_lse(lg):
        r = router_topk(lg, 4)
        return torch.cat([r.weights.flatten(), r.score_sum, r.lse])

    _grad_case(weights_and_lse, [torch.randn(77, 16)], device, "router_topk backward", 1e-5)


def case_permute(device):
    x = torch.randn(61, 40)
    ids = torch.randint(-1, 9, (61, 3), dtype=torch.int32)
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], -1, ids[:, 1])
    ids[:, 2] = torch.where((ids[:, 2] == ids[:, 0]) | (ids[:, 2] == ids[:, 1]), -1, ids[:, 2])
    w = torch.rand(61, 3)
    for cap, prio in ((None, None), (9, None), (9, torch.rand(61, 3))):
        ref = permute(x, ids, 9, capacity=cap, priority=prio)
        got = permute(
            x.to(device),
            ids.to(device),
            9,
            capacity=cap,
            priority=None if prio is None else prio.to(device),
        )
        for name in ("x_sorted", "offsets", "row_map"):
            if not torch.equal(getattr(ref, name), getattr(got, name).cpu()):
                raise AssertionError(f"permute capacity={cap}: {name} differs from the CPU op")

    def chain(x, w):  # permute -> unpermute, with their backward ops
        p = permute(x, ids.to(x.device), 9)
        return unpermute(p.x_sorted * 1.5, p.row_map, w)

    _grad_case(chain, [x, w], device, "permute/unpermute backward", 1e-5)


def case_activation(device):
    gu = torch.randn(33, 2 * 72, dtype=torch.bfloat16)
    for act in ("silu", "gelu"):
        _grad_case(
            lambda t, act=act: gated_activation(t, act),
            [gu],
            device,
            f"gated_activation {act}",
            2e-2,
        )


def case_select_topc(device):
    scores = torch.randn(5, 300)
    mask = torch.rand(5, 300) > 0.3
    mask[4] = False  # a row with no eligible entry
    ref = select_topc(scores, 17, mask)
    got = select_topc(scores.to(device), 17, mask.to(device))
    if not torch.equal(ref.indices, got.indices.cpu()):
        raise AssertionError("select_topc: indices differ from the CPU op")
    _grad_case(lambda s: select_topc(s, 17).values, [scores], device, "select_topc backward", 0)


def case_slots(device):
    ids = torch.stack([torch.randperm(6)[:3] for _ in range(20)]).to(torch.int32)
    ids[::4, 2] = -1  # some tokens with fewer choices: slots of -1 read zeros
    row_map = permute(torch.randn(20, 8), ids, 6).row_map  # a valid map, as MoA gets it
    rows = torch.randn(60, 2 * 16)

    def roundtrip(r):
        s = rows_to_slots(r, row_map.to(r.device), num_heads=2)
        return slots_to_rows(s * 2, row_map.to(r.device), 60)

    _grad_case(roundtrip, [rows], device, "rows_to_slots/slots_to_rows", 0)


def case_scatter_rows(device):
    base = torch.randn(40, 24)
    rows = torch.randn(7, 24)
    index = torch.tensor([3, 39, -1, 0, 17, 5, 22], dtype=torch.int32)
    _grad_case(
        lambda b, r: scatter_rows(b, r, index.to(b.device)), [base, rows], device, "scatter_rows", 0
    )


def case_reorder_chunks(device):
    counts = torch.tensor([[3, 0, 5], [2, 7, 0], [0, 1, 4]], dtype=torch.int32)
    x = torch.randn(25, 40)  # 22 rows in chunks, 3 past the end
    _grad_case(lambda t: reorder_chunks(t, counts.to(t.device)), [x], device, "reorder_chunks", 0)


CASES = [
    case_grouped_mm,
    case_router,
    case_permute,
    case_activation,
    case_select_topc,
    case_slots,
    case_scatter_rows,
    case_reorder_chunks,
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-k", default="", help="only cases whose name contains this")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    failed = ran = 0
    for case in CASES:
        if args.k not in case.__name__:
            continue
        ran += 1
        t0 = time.perf_counter()
        try:
            case(args.device)
            if args.device == "cuda":
                torch.cuda.synchronize()
            mixops.check_errors()
            status = "ok"
        except Exception as e:  # report every case, then fail
            failed += 1
            status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"{case.__name__:<22} {time.perf_counter() - t0:6.2f} s  {status}", flush=True)
    print(f"sanitize_cases: {ran - failed} ok, {failed} failed on {args.device}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
