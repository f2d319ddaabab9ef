"""The fakes say what the C++ checks say: every bad input decidable from metadata (dtype, device,
rank, shape, option values) of every op, fed to the CPU op and to its fake, raises the same
message in both.

Each case is run three ways:
  cpu   the C++ op layer (csrc/*/check.cpp). An argument on another device is a meta tensor; a
        call mixing CPU and meta tensors would dispatch to the Meta kernel (the fake), so those
        cases are redispatched to the CPU kernel, which validates before it reads any data.
  meta  the same call with meta tensors (the mixed-device cases as they are: the Meta kernel).
  fake  the same call under FakeTensorMode (what torch.compile and opcheck run).
Limits such as 2^31 slots use expanded (stride-0) CPU tensors and meta tensors: nothing large is
allocated. Valid calls are checked too, so that every bad case differs from a valid one.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mixops  # noqa: F401  (registers torch.ops.mixops.*)

O = "meta"  # the "other device" of the device-mismatch cases
GMM = torch.ops.mixops.grouped_mm.default
GMP = torch.ops.mixops.grouped_mm_packed.default
ROUTER = torch.ops.mixops.router_topk.default
ROUTER_BW = torch.ops.mixops.router_topk_backward.default
TOPC = torch.ops.mixops.select_topc.default
PERMUTE = torch.ops.mixops.permute.default
UNPERMUTE = torch.ops.mixops.unpermute.default
UNPERMUTE_BW = torch.ops.mixops.unpermute_backward.default
UNPERMUTE_W_BW = torch.ops.mixops.unpermute_weights_backward.default
ROWS_TO_SLOTS = torch.ops.mixops.rows_to_slots.default
SLOTS_TO_ROWS = torch.ops.mixops.slots_to_rows.default
SCATTER_ROWS = torch.ops.mixops.scatter_rows.default
SCATTER_ROWS_BW = torch.ops.mixops.scatter_rows_backward.default
REORDER = torch.ops.mixops.reorder_chunks.default
ACT = torch.ops.mixops.gated_activation.default
ACT_BW = torch.ops.mixops.gated_activation_backward.default
I32, I64, F16, BF16, F64 = torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float64


def big(*shape, dtype=torch.float32):
    """A tensor of any size with one element of storage."""
    return torch.zeros([1] * len(shape), dtype=dtype).expand(*shape)


# ---- valid arguments of each op; every bad case changes one thing ----------------------------


def gmm(a=None, b=None, off=None):
    a = torch.randn(6, 8) if a is None else a
    b = torch.randn(3, 8, 4) if b is None else b
    off = torch.tensor([2, 4, 6], dtype=I32) if off is None else off
    return GMM, (a, b, off), {}


def gmm2(a=None, b=None, off=None):  # 2-D x 2-D mode
    a = torch.randn(3, 5) if a is None else a
    b = torch.randn(5, 2) if b is None else b
    off = torch.tensor([2, 5], dtype=I32) if off is None else off
    return GMM, (a, b, off), {}


# grouped_mm_packed: offsets [2, 4, 6] over the ragged size 6, ends [3, 3, 5] over total = 7,
# width = 4; the fixed dimension is 5.
GMP_SHAPES = {
    "mn": ((6, 5), (5, 7)),
    "mk": ((6, 4), (7, 5)),
    "km": ((4, 6), (6, 5)),
    "kn": ((5, 6), (6, 4)),
}


def gmp(mode="mn", a=None, b=None, off=None, ends=None, width=4, total=7):
    sa, sb = GMP_SHAPES.get(mode, GMP_SHAPES["mn"])
    a = torch.randn(sa) if a is None else a
    b = torch.randn(sb) if b is None else b
    off = torch.tensor([2, 4, 6], dtype=I32) if off is None else off
    ends = torch.tensor([3, 3, 5], dtype=I32) if ends is None else ends
    return GMP, (a, b, off, ends, mode, width, total), {}


def router(logits=None, k=2, **kw):
    logits = torch.randn(4, 8) if logits is None else logits
    return ROUTER, (logits, k), kw


def router_bw(
    gw="default",
    gss=None,
    glse=None,
    logits=None,
    ids=None,
    score_fn="softmax",
    renorm_eps=0.0,
    scaling=1.0,
    modality=None,
    num_modalities=1,
    token_mask=None,
):
    logits = torch.randn(4, 8) if logits is None else logits
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=I32) if ids is None else ids
    gw = torch.ones(4, 2) if isinstance(gw, str) else gw
    return (
        ROUTER_BW,
        (
            gw,
            gss,
            glse,
            logits,
            ids,
            score_fn,
            False,
            True,
            renorm_eps,
            scaling,
            modality,
            num_modalities,
            token_mask,
        ),
        {},
    )


def topc(scores=None, c=3, mask=None):
    scores = torch.randn(4, 8) if scores is None else scores
    return TOPC, (scores, c, mask), {}


IDS = torch.tensor([[i % 8, (i + 3) % 8] for i in range(10)], dtype=I32)
ROW_MAP = torch.arange(20, dtype=I32).view(10, 2)


def permute(x=None, ids=None, num_experts=8, capacity=None, priority=None):
    x = torch.randn(10, 4) if x is None else x
    ids = IDS if ids is None else ids
    return PERMUTE, (x, ids, num_experts, capacity, priority), {}


def unpermute(y=None, rm=None, w="default"):
    y = torch.randn(20, 4) if y is None else y
    rm = ROW_MAP if rm is None else rm
    w = torch.rand(10, 2) if isinstance(w, str) else w
    return UNPERMUTE, (y, rm, w), {}


def unpermute_bw(g=None, rm=None, w="default", num_rows=20):
    g = torch.randn(10, 4) if g is None else g
    rm = ROW_MAP if rm is None else rm
    w = torch.rand(10, 2) if isinstance(w, str) else w
    return UNPERMUTE_BW, (g, rm, w, num_rows), {}


def unpermute_w_bw(g=None, y=None, rm=None, w=None):
    g = torch.randn(10, 4) if g is None else g
    y = torch.randn(20, 4) if y is None else y
    rm = ROW_MAP if rm is None else rm
    w = torch.rand(10, 2) if w is None else w
    return UNPERMUTE_W_BW, (g, y, rm, w), {}


def rows_to_slots(rows=None, rm=None, num_heads=2):
    rows = torch.randn(20, 4) if rows is None else rows
    rm = ROW_MAP if rm is None else rm
    return ROWS_TO_SLOTS, (rows, rm, num_heads), {}


def slots_to_rows(slots=None, rm=None, num_rows=20):
    slots = torch.randn(10, 2, 2, 3) if slots is None else slots
    rm = ROW_MAP if rm is None else rm
    return SLOTS_TO_ROWS, (slots, rm, num_rows), {}


INDEX = torch.tensor([4, -1, 0], dtype=I32)


def scatter_rows(base=None, rows=None, index=None):
    base = torch.randn(6, 4) if base is None else base
    rows = torch.randn(3, 4) if rows is None else rows
    index = INDEX if index is None else index
    return SCATTER_ROWS, (base, rows, index), {}


def scatter_rows_bw(grad=None, index=None):
    grad = torch.randn(6, 4) if grad is None else grad
    index = INDEX if index is None else index
    return SCATTER_ROWS_BW, (grad, index), {}


COUNTS = torch.tensor([[1, 0, 2], [3, 1, 0]], dtype=I32)


def reorder(x=None, counts=None):
    x = torch.randn(9, 4) if x is None else x
    counts = COUNTS if counts is None else counts
    return REORDER, (x, counts), {}


def act(gate_up=None, activation="silu", up=None):
    gate_up = torch.randn(6, 8) if gate_up is None else gate_up
    return ACT, (gate_up, activation) if up is None else (gate_up, activation, up), {}


def act_bw(grad=None, gate_up=None, activation="silu", up=None):
    grad = torch.randn(6, 4) if grad is None else grad
    gate_up = torch.randn(6, 8) if gate_up is None else gate_up
    return ACT_BW, (grad, gate_up, activation) + (() if up is None else (up,)), {}


def act_split(gate=None, up=None, activation="silu"):  # gate_up is the gate [6, 4]
    gate = torch.randn(6, 4) if gate is None else gate
    return act(gate, activation, torch.randn(6, 4) if up is None else up)


def act_bw_split(grad=None, gate=None, up=None, activation="silu"):
    grad = torch.randn(6, 4) if grad is None else grad
    gate = torch.randn(6, 4) if gate is None else gate
    return act_bw(grad, gate, activation, torch.randn(6, 4) if up is None else up)


def act_il(gate_up=None, activation="silu", up=None):  # interleaved=True
    return (*act(gate_up, activation, up)[:2], {"interleaved": True})


def act_bw_il(grad=None, gate_up=None, activation="silu", up=None):  # interleaved=True
    return (*act_bw(grad, gate_up, activation, up)[:2], {"interleaved": True})


VALID = {
    "grouped_mm": gmm,
    "grouped_mm 2-D x 2-D": gmm2,
    "grouped_mm_packed mn": gmp,
    "grouped_mm_packed mk": lambda: gmp("mk"),
    "grouped_mm_packed km, transposed a": lambda: gmp("km", a=torch.randn(6, 4).t()),
    "grouped_mm_packed kn, strided b": lambda: gmp("kn", b=torch.randn(6, 9)[:, 2:6]),
    "grouped_mm_packed no experts": lambda: gmp(
        off=torch.zeros(0, dtype=I32), ends=torch.zeros(0, dtype=I32)
    ),
    "grouped_mm_packed width 0": lambda: gmp(
        "mk", a=torch.randn(6, 0), ends=torch.zeros(3, dtype=I32), width=0
    ),
    "router_topk": router,
    "router_topk groups": lambda: router(
        num_groups=4, groups_kept=2, k=3, bias=torch.zeros(8, dtype=F64)
    ),
    "router_topk modality": lambda: router(
        num_modalities=2,
        modality=torch.zeros(4, dtype=I32),
        token_mask=torch.ones(4, dtype=torch.bool),
        k=4,
    ),
    "router_topk top_p": lambda: router(rule="top_p", threshold=0.5),
    "router_topk cum_threshold, p < 0": lambda: router(
        rule="cum_threshold", threshold=-1.0, renormalize=False
    ),
    "router_topk relu, modality, token_mask": lambda: router(
        score_fn="relu",
        num_modalities=2,
        modality=torch.zeros(4, dtype=I32),
        token_mask=torch.ones(4, dtype=torch.bool),
    ),
    "router_topk_backward relu, -1 ids": lambda: router_bw(
        score_fn="relu", ids=torch.tensor([[0, 1], [2, -1], [-1, -1], [6, 7]], dtype=I32)
    ),
    "router_topk_backward": lambda: router_bw(gss=torch.ones(8), glse=torch.ones(4)),
    "select_topc": topc,
    "select_topc mask, c = n": lambda: topc(c=8, mask=torch.ones(4, 8, dtype=torch.bool)),
    "select_topc c = 0, n = 0": lambda: topc(scores=torch.randn(4, 0), c=0),
    "permute": permute,
    "permute capacity": lambda: permute(capacity=2**63 - 1, priority=torch.rand(10, 2).half()),
    "unpermute": unpermute,
    "unpermute_backward": unpermute_bw,
    "unpermute_weights_backward": unpermute_w_bw,
    "rows_to_slots": rows_to_slots,
    "rows_to_slots one head, strided rows": lambda: rows_to_slots(
        rows=torch.randn(4, 20).t(), num_heads=1
    ),
    "rows_to_slots empty heads": lambda: rows_to_slots(rows=torch.randn(20, 0), num_heads=5),
    "slots_to_rows": slots_to_rows,
    "slots_to_rows strided, extra rows": lambda: slots_to_rows(
        slots=torch.randn(10, 2, 2, 3).transpose(1, 2), num_rows=23
    ),
    "slots_to_rows 2^31 + 5 empty rows": lambda: slots_to_rows(
        slots=torch.randn(10, 2, 2, 0), num_rows=2**31 + 5
    ),
    "scatter_rows": scatter_rows,
    "scatter_rows strided base and rows, n = 0": lambda: scatter_rows(
        base=torch.randn(6, 9)[:, 2:6], rows=torch.randn(0, 9)[:, 1:5], index=INDEX[:0]
    ),
    "scatter_rows T = 0, -1 only": lambda: scatter_rows(
        base=torch.randn(0, 4), index=torch.full((3,), -1, dtype=I32)
    ),
    "scatter_rows 2^31 - 2 empty rows": lambda: scatter_rows(
        base=big(2**31 - 2, 0), rows=torch.randn(3, 0)
    ),
    "scatter_rows_backward": scatter_rows_bw,
    "scatter_rows_backward strided grad, n = 0": lambda: scatter_rows_bw(
        grad=torch.randn(4, 6).t(), index=INDEX[:0]
    ),
    "scatter_rows_backward 2^31 - 2 empty rows": lambda: scatter_rows_bw(grad=big(2**31 - 2, 0)),
    "reorder_chunks": reorder,
    "reorder_chunks strided x, transposed counts": lambda: reorder(
        x=torch.randn(9, 7)[:, 1:5], counts=COUNTS.t()
    ),
    "reorder_chunks N = 0, zero counts, A = 1": lambda: reorder(
        x=torch.randn(0, 4), counts=torch.zeros(1, 3, dtype=I32)
    ),
    "reorder_chunks 2^31 - 1 empty rows": lambda: reorder(x=big(2**31 - 1, 0)),
    "gated_activation": act,
    "gated_activation_backward": act_bw,
    "gated_activation split": act_split,
    "gated_activation split, odd F, transposed up": lambda: act_split(
        gate=torch.randn(6, 3), up=torch.randn(3, 6).t()
    ),
    "gated_activation split, 3-D, F = 0": lambda: act_split(
        gate=torch.randn(2, 3, 0), up=torch.randn(2, 3, 0)
    ),
    "gated_activation_backward split": act_bw_split,
    "gated_activation_backward split, strided gate": lambda: act_bw_split(
        gate=torch.randn(6, 9)[:, 2:6]
    ),
    "gated_activation interleaved": act_il,
    "gated_activation interleaved, odd F, strided rows": lambda: act_il(
        gate_up=torch.randn(6, 9)[:, 1:7]
    ),
    "gated_activation interleaved, 3-D, F = 0": lambda: act_il(gate_up=torch.randn(2, 3, 0)),
    "gated_activation_backward interleaved": act_bw_il,
    "gated_activation_backward interleaved, transposed": lambda: act_bw_il(
        grad=torch.randn(3, 6).t(), gate_up=torch.randn(6, 6).t()
    ),
}

# ---- every metadata check of csrc/*/check.cpp, one bad input each ---------------------------

BAD = {
    # grouped_mm (csrc/grouped_mm/check.cpp)
    "gmm a 1-D": lambda: gmm(a=torch.randn(8)),
    "gmm a 3-D": lambda: gmm(a=torch.randn(1, 6, 8)),
    "gmm b 1-D": lambda: gmm(b=torch.randn(8)),
    "gmm b 4-D": lambda: gmm(b=torch.randn(1, 3, 8, 4)),
    "gmm dtypes differ": lambda: gmm(b=torch.randn(3, 8, 4, dtype=F16)),
    "gmm int": lambda: gmm(a=torch.ones(6, 8, dtype=I32), b=torch.ones(3, 8, 4, dtype=I32)),
    "gmm bool": lambda: gmm(
        a=torch.ones(6, 8, dtype=torch.bool), b=torch.ones(3, 8, 4, dtype=torch.bool)
    ),
    "gmm b device": lambda: gmm(b=torch.randn(3, 8, 4, device=O)),
    "gmm offsets int64": lambda: gmm(off=torch.tensor([2, 4, 6])),
    "gmm offsets float": lambda: gmm(off=torch.tensor([2.0, 4, 6])),
    "gmm offsets 2-D": lambda: gmm(off=torch.tensor([[2, 4, 6]], dtype=I32)),
    "gmm offsets 0-D": lambda: gmm(off=torch.tensor(6, dtype=I32)),
    "gmm offsets device": lambda: gmm(off=torch.tensor([2, 4, 6], dtype=I32, device=O)),
    "gmm K mismatch": lambda: gmm(b=torch.randn(3, 7, 4)),
    "gmm offsets length": lambda: gmm(off=torch.tensor([2, 6], dtype=I32)),
    "gmm 2-D K mismatch": lambda: gmm2(b=torch.randn(4, 2)),
    "gmm 2-D no groups": lambda: gmm2(off=torch.zeros(0, dtype=I32)),
    "gmm 2-D offsets device": lambda: gmm2(off=torch.tensor([2, 5], dtype=I32, device=O)),
    # grouped_mm_packed (csrc/grouped_mm/check.cpp), in its order
    "gmp mode": lambda: gmp("nm"),
    "gmp a 1-D": lambda: gmp(a=torch.randn(5)),
    "gmp a 3-D": lambda: gmp("km", a=torch.randn(1, 4, 6)),
    "gmp b 1-D": lambda: gmp("mk", b=torch.randn(7)),
    "gmp b 3-D": lambda: gmp("kn", b=torch.randn(1, 6, 4)),
    "gmp dtypes differ": lambda: gmp(b=torch.randn(5, 7, dtype=BF16)),
    "gmp int": lambda: gmp(a=torch.ones(6, 5, dtype=I32), b=torch.ones(5, 7, dtype=I32)),
    "gmp b device": lambda: gmp(b=torch.randn(5, 7, device=O)),
    "gmp offsets int64": lambda: gmp(off=torch.tensor([2, 4, 6])),
    "gmp offsets 2-D": lambda: gmp(off=torch.tensor([[2, 4, 6]], dtype=I32)),
    "gmp offsets device": lambda: gmp(off=torch.tensor([2, 4, 6], dtype=I32, device=O)),
    "gmp ends float": lambda: gmp(ends=torch.tensor([3.0, 3, 5])),
    "gmp ends 0-D": lambda: gmp(ends=torch.tensor(5, dtype=I32)),
    "gmp ends device": lambda: gmp(ends=torch.tensor([3, 3, 5], dtype=I32, device=O)),
    "gmp ends length": lambda: gmp(ends=torch.tensor([3, 5], dtype=I32)),
    "gmp width < 0": lambda: gmp(width=-1),
    "gmp total < 0": lambda: gmp(total=-1),
    "gmp mn K mismatch": lambda: gmp(b=torch.randn(4, 7)),
    "gmp mn total": lambda: gmp(total=8),
    "gmp mk width": lambda: gmp("mk", width=5),
    "gmp mk total": lambda: gmp("mk", b=torch.randn(8, 5)),
    "gmp km width": lambda: gmp("km", width=3),
    "gmp km r mismatch": lambda: gmp("km", b=torch.randn(5, 5)),
    "gmp kn r mismatch": lambda: gmp("kn", a=torch.randn(5, 7)),
    "gmp kn width": lambda: gmp("kn", b=torch.randn(6, 3)),
    # router_topk (csrc/routing/check.cpp)
    "router logits 1-D": lambda: router(torch.randn(8)),
    "router logits 3-D": lambda: router(torch.randn(1, 4, 8)),
    "router logits int": lambda: router(torch.ones(4, 8, dtype=I32)),
    "router no experts": lambda: router(torch.randn(4, 0)),
    "router 2^31 experts": lambda: router(big(1, 2**31)),
    "router num_modalities 0": lambda: router(num_modalities=0),
    "router num_modalities divide": lambda: router(
        num_modalities=3, modality=torch.zeros(4, dtype=I32)
    ),
    "router modality missing": lambda: router(num_modalities=2),
    "router modality extra": lambda: router(modality=torch.zeros(4, dtype=I32)),
    "router modality float": lambda: router(num_modalities=2, modality=torch.zeros(4)),
    "router modality shape": lambda: router(num_modalities=2, modality=torch.zeros(5, dtype=I32)),
    "router modality 2-D": lambda: router(num_modalities=2, modality=torch.zeros(4, 1, dtype=I32)),
    "router modality device": lambda: router(
        num_modalities=2, modality=torch.zeros(4, dtype=I32, device=O)
    ),
    "router token_mask float": lambda: router(token_mask=torch.ones(4)),
    "router token_mask shape": lambda: router(token_mask=torch.ones(3, dtype=torch.bool)),
    "router token_mask device": lambda: router(
        token_mask=torch.ones(4, dtype=torch.bool, device=O)
    ),
    "router score_fn": lambda: router(score_fn="tanh"),
    "router renorm_eps < 0": lambda: router(renorm_eps=-1.0),
    "router renorm_eps nan": lambda: router(renorm_eps=float("nan")),
    "router renorm_eps inf": lambda: router(renorm_eps=float("inf")),
    "router renorm_eps tiny": lambda: router(renorm_eps=-1.5e-7),
    "router scaling inf": lambda: router(scaling=float("-inf")),
    "router scaling nan": lambda: router(scaling=float("nan")),
    "router k 0": lambda: router(k=0),
    "router k > E": lambda: router(k=9),
    "router k > experts per modality": lambda: router(
        k=5, num_modalities=2, modality=torch.zeros(4, dtype=I32)
    ),
    "router bias shape": lambda: router(bias=torch.zeros(7)),
    "router bias 2-D": lambda: router(bias=torch.zeros(1, 8)),
    "router bias int": lambda: router(bias=torch.zeros(8, dtype=I32)),
    "router bias device": lambda: router(bias=torch.zeros(8, device=O)),
    "router num_groups 0": lambda: router(num_groups=0),
    "router num_groups divide": lambda: router(num_groups=3),
    "router groups and modalities": lambda: router(
        num_groups=2, num_modalities=2, modality=torch.zeros(4, dtype=I32)
    ),
    "router groups_kept 0": lambda: router(num_groups=2, groups_kept=0),
    "router groups_kept > num_groups": lambda: router(num_groups=2, groups_kept=3),
    "router group_score": lambda: router(num_groups=2, group_score="mean"),
    "router group_score, no groups": lambda: router(group_score="mean"),
    "router k > kept experts": lambda: router(num_groups=4, groups_kept=1, k=3),
    # router_topk rules (check_rule; python/mixops/ops/routing_rule_checks.py)
    "router rule name": lambda: router(rule="top-p"),
    "router relu with a rule": lambda: router(score_fn="relu", rule="top_p", threshold=0.5),
    "router top_p sigmoid": lambda: router(score_fn="sigmoid", rule="top_p", threshold=0.5),
    "router cum_threshold none": lambda: router(score_fn="none", rule="cum_threshold"),
    "router threshold nan": lambda: router(rule="top_p", threshold=float("nan")),
    "router threshold -inf": lambda: router(rule="cum_threshold", threshold=float("-inf")),
    "router threshold with topk": lambda: router(threshold=0.5),
    "router threshold with relu": lambda: router(score_fn="relu", threshold=-0.5),
    "router top_p bias": lambda: router(rule="top_p", bias=torch.zeros(8)),
    "router relu bias": lambda: router(score_fn="relu", bias=torch.zeros(8, dtype=F64)),
    "router top_p groups": lambda: router(rule="top_p", num_groups=2),
    "router relu groups": lambda: router(score_fn="relu", num_groups=4, groups_kept=2),
    "router cum_threshold topk_then_score": lambda: router(
        rule="cum_threshold", topk_then_score=True
    ),
    "router relu topk_then_score": lambda: router(score_fn="relu", topk_then_score=True),
    # router_topk_backward (csrc/routing/check.cpp)
    "router_bw logits 1-D": lambda: router_bw(logits=torch.randn(8)),
    "router_bw logits int": lambda: router_bw(logits=torch.ones(4, 8, dtype=I32)),
    "router_bw 2^31 experts": lambda: router_bw(logits=big(4, 2**31)),
    "router_bw num_modalities 0": lambda: router_bw(num_modalities=0),
    "router_bw modality missing": lambda: router_bw(num_modalities=2),
    "router_bw modality device": lambda: router_bw(
        num_modalities=2, modality=torch.zeros(4, dtype=I32, device=O)
    ),
    "router_bw token_mask shape": lambda: router_bw(token_mask=torch.ones(5, dtype=torch.bool)),
    "router_bw ids int64": lambda: router_bw(ids=torch.zeros(4, 2, dtype=I64)),
    "router_bw ids tokens": lambda: router_bw(ids=torch.zeros(3, 2, dtype=I32)),
    "router_bw ids 1-D": lambda: router_bw(ids=torch.zeros(4, dtype=I32)),
    "router_bw ids device": lambda: router_bw(ids=torch.zeros(4, 2, dtype=I32, device=O)),
    "router_bw k 0": lambda: router_bw(ids=torch.zeros(4, 0, dtype=I32), gw=None),
    "router_bw k > E": lambda: router_bw(ids=torch.zeros(4, 9, dtype=I32), gw=None),
    "router_bw k > experts per modality": lambda: router_bw(
        ids=torch.zeros(4, 5, dtype=I32),
        gw=None,
        num_modalities=2,
        modality=torch.zeros(4, dtype=I32),
    ),
    "router_bw score_fn": lambda: router_bw(score_fn="tanh"),
    "router_bw renorm_eps": lambda: router_bw(renorm_eps=-0.5),
    "router_bw scaling": lambda: router_bw(scaling=float("nan")),
    "router_bw grad_weights shape": lambda: router_bw(gw=torch.ones(4, 3)),
    "router_bw grad_weights dtype": lambda: router_bw(gw=torch.ones(4, 2, dtype=BF16)),
    "router_bw grad_weights f32 for f64": lambda: router_bw(logits=torch.randn(4, 8, dtype=F64)),
    "router_bw grad_weights device": lambda: router_bw(gw=torch.ones(4, 2, device=O)),
    "router_bw grad_score_sum shape": lambda: router_bw(gss=torch.ones(7)),
    "router_bw grad_score_sum dtype": lambda: router_bw(gss=torch.ones(8, dtype=F64)),
    "router_bw grad_score_sum device": lambda: router_bw(gss=torch.ones(8, device=O)),
    "router_bw grad_lse shape": lambda: router_bw(glse=torch.ones(4, 1)),
    "router_bw grad_lse device": lambda: router_bw(glse=torch.ones(4, device=O)),
    # select_topc (csrc/routing/check.cpp)
    "topc scores 1-D": lambda: topc(torch.randn(8)),
    "topc scores 3-D": lambda: topc(torch.randn(1, 4, 8)),
    "topc scores int": lambda: topc(torch.ones(4, 8, dtype=I32)),
    "topc 2^31 columns": lambda: topc(big(1, 2**31), c=1),
    "topc c < 0": lambda: topc(c=-1),
    "topc c > n": lambda: topc(c=9),
    "topc c 2^31": lambda: topc(c=2**31),
    "topc mask float": lambda: topc(mask=torch.ones(4, 8)),
    "topc mask shape": lambda: topc(mask=torch.ones(4, 7, dtype=torch.bool)),
    "topc mask 1-D": lambda: topc(mask=torch.ones(8, dtype=torch.bool)),
    "topc mask device": lambda: topc(mask=torch.ones(4, 8, dtype=torch.bool, device=O)),
    # permute (csrc/permute/check.cpp)
    "permute x 1-D": lambda: permute(x=torch.randn(10)),
    "permute x 3-D": lambda: permute(x=torch.randn(10, 4, 1)),
    "permute x int": lambda: permute(x=torch.ones(10, 4, dtype=I32)),
    "permute x bool": lambda: permute(x=torch.ones(10, 4, dtype=torch.bool)),
    "permute ids float": lambda: permute(ids=IDS.float()),
    "permute ids int16": lambda: permute(ids=IDS.short()),
    "permute ids tokens": lambda: permute(ids=IDS[:5]),
    "permute ids 1-D": lambda: permute(ids=IDS[:, 0]),
    "permute ids 3-D": lambda: permute(ids=IDS[:, :, None]),
    "permute ids k 0": lambda: permute(ids=IDS[:, :0]),
    "permute ids device": lambda: permute(ids=IDS.to(O)),
    "permute num_experts 0": lambda: permute(num_experts=0),
    "permute num_experts -1": lambda: permute(num_experts=-1),
    "permute num_experts 2^31": lambda: permute(num_experts=2**31),
    "permute 2^31 slots": lambda: permute(x=big(2**31, 1), ids=big(2**31, 1, dtype=I32)),
    "permute 2^31 - 1 slots": lambda: permute(
        x=big(2**31 - 1, 1), ids=big(2**31 - 1, 1, dtype=I32)
    ),
    "permute 2^31 slots, k 2": lambda: permute(x=big(2**30, 1), ids=big(2**30, 2, dtype=I64)),
    "permute capacity < 0": lambda: permute(capacity=-1),
    "permute priority, no capacity": lambda: permute(priority=torch.rand(10, 2)),
    "permute priority shape": lambda: permute(capacity=2, priority=torch.rand(10, 3)),
    "permute priority int": lambda: permute(capacity=2, priority=torch.ones(10, 2, dtype=I32)),
    "permute priority bool": lambda: permute(
        capacity=2, priority=torch.ones(10, 2, dtype=torch.bool)
    ),
    "permute priority device": lambda: permute(capacity=2, priority=torch.rand(10, 2, device=O)),
    # unpermute
    "unpermute y 1-D": lambda: unpermute(y=torch.randn(20)),
    "unpermute y int": lambda: unpermute(y=torch.ones(20, 4, dtype=I32)),
    "unpermute row_map 1-D": lambda: unpermute(rm=ROW_MAP.view(-1), w=None),
    "unpermute row_map int64": lambda: unpermute(rm=ROW_MAP.long()),
    "unpermute row_map k 0": lambda: unpermute(rm=ROW_MAP[:, :0], w=None),
    "unpermute row_map 2^31 slots": lambda: unpermute(rm=big(2**31, 1, dtype=I32), w=None),
    "unpermute row_map device": lambda: unpermute(rm=ROW_MAP.to(O)),
    "unpermute weights shape": lambda: unpermute(w=torch.rand(10, 3)),
    "unpermute weights dtype": lambda: unpermute(w=torch.rand(10, 2, dtype=F16)),
    "unpermute weights int": lambda: unpermute(w=torch.ones(10, 2, dtype=I32)),
    "unpermute weights device": lambda: unpermute(w=torch.rand(10, 2, device=O)),
    # unpermute_backward
    "unpermute_bw grad_y 1-D": lambda: unpermute_bw(g=torch.randn(10)),
    "unpermute_bw grad_y int": lambda: unpermute_bw(g=torch.ones(10, 4, dtype=I32)),
    "unpermute_bw row_map tokens": lambda: unpermute_bw(rm=ROW_MAP[:9], w=None),
    "unpermute_bw row_map 1-D": lambda: unpermute_bw(rm=ROW_MAP[:, 0], w=None),
    "unpermute_bw row_map int64": lambda: unpermute_bw(rm=ROW_MAP.long()),
    "unpermute_bw row_map k 0": lambda: unpermute_bw(rm=ROW_MAP[:, :0], w=None),
    "unpermute_bw row_map 2^31 slots": lambda: unpermute_bw(
        g=big(2**30, 4), rm=big(2**30, 2, dtype=I32), w=None
    ),
    "unpermute_bw row_map device": lambda: unpermute_bw(rm=ROW_MAP.to(O)),
    "unpermute_bw weights shape": lambda: unpermute_bw(w=torch.rand(10, 1)),
    "unpermute_bw weights dtype": lambda: unpermute_bw(w=torch.rand(10, 2, dtype=BF16)),
    "unpermute_bw weights device": lambda: unpermute_bw(w=torch.rand(10, 2, device=O)),
    "unpermute_bw num_rows < 0": lambda: unpermute_bw(num_rows=-1),
    # unpermute_weights_backward
    "unpermute_w_bw grad_y 1-D": lambda: unpermute_w_bw(g=torch.randn(10)),
    "unpermute_w_bw y_sorted 3-D": lambda: unpermute_w_bw(y=torch.randn(20, 4, 1)),
    "unpermute_w_bw int": lambda: unpermute_w_bw(
        g=torch.ones(10, 4, dtype=I32), y=torch.ones(20, 4, dtype=I32)
    ),
    "unpermute_w_bw y_sorted dtype": lambda: unpermute_w_bw(y=torch.randn(20, 4, dtype=F64)),
    "unpermute_w_bw y_sorted hidden": lambda: unpermute_w_bw(y=torch.randn(20, 3)),
    "unpermute_w_bw y_sorted device": lambda: unpermute_w_bw(y=torch.randn(20, 4, device=O)),
    "unpermute_w_bw row_map tokens": lambda: unpermute_w_bw(rm=ROW_MAP[:9]),
    "unpermute_w_bw row_map int64": lambda: unpermute_w_bw(rm=ROW_MAP.long()),
    "unpermute_w_bw row_map 2^31 slots": lambda: unpermute_w_bw(
        g=big(2**31, 4), rm=big(2**31, 1, dtype=I32), w=big(2**31, 1)
    ),
    "unpermute_w_bw row_map device": lambda: unpermute_w_bw(rm=ROW_MAP.to(O)),
    "unpermute_w_bw weights shape": lambda: unpermute_w_bw(w=torch.rand(2, 10)),
    "unpermute_w_bw weights dtype": lambda: unpermute_w_bw(w=torch.rand(10, 2, dtype=F16)),
    "unpermute_w_bw weights device": lambda: unpermute_w_bw(w=torch.rand(10, 2, device=O)),
    # rows_to_slots
    "rows_to_slots rows 1-D": lambda: rows_to_slots(rows=torch.randn(20)),
    "rows_to_slots rows 3-D": lambda: rows_to_slots(rows=torch.randn(20, 2, 2)),
    "rows_to_slots rows int": lambda: rows_to_slots(rows=torch.ones(20, 4, dtype=I32)),
    "rows_to_slots rows bool": lambda: rows_to_slots(rows=torch.ones(20, 4, dtype=torch.bool)),
    "rows_to_slots row_map 1-D": lambda: rows_to_slots(rm=ROW_MAP.view(-1)),
    "rows_to_slots row_map 3-D": lambda: rows_to_slots(rm=ROW_MAP[:, :, None]),
    "rows_to_slots row_map int64": lambda: rows_to_slots(rm=ROW_MAP.long()),
    "rows_to_slots row_map float": lambda: rows_to_slots(rm=ROW_MAP.float()),
    "rows_to_slots row_map k 0": lambda: rows_to_slots(rm=ROW_MAP[:, :0]),
    "rows_to_slots row_map 2^31 slots": lambda: rows_to_slots(rm=big(2**31, 1, dtype=I32)),
    "rows_to_slots row_map device": lambda: rows_to_slots(rm=ROW_MAP.to(O)),
    "rows_to_slots num_heads 0": lambda: rows_to_slots(num_heads=0),
    "rows_to_slots num_heads -1": lambda: rows_to_slots(num_heads=-1),
    "rows_to_slots num_heads 3": lambda: rows_to_slots(num_heads=3),
    "rows_to_slots num_heads > hidden": lambda: rows_to_slots(num_heads=8),
    # slots_to_rows
    "slots_to_rows slots 3-D": lambda: slots_to_rows(slots=torch.randn(10, 2, 6)),
    "slots_to_rows slots 5-D": lambda: slots_to_rows(slots=torch.randn(10, 2, 2, 3, 1)),
    "slots_to_rows slots int": lambda: slots_to_rows(slots=torch.ones(10, 2, 2, 3, dtype=I32)),
    "slots_to_rows row_map tokens": lambda: slots_to_rows(rm=ROW_MAP[:9]),
    "slots_to_rows row_map 1-D": lambda: slots_to_rows(rm=ROW_MAP[:, 0]),
    "slots_to_rows row_map int64": lambda: slots_to_rows(rm=ROW_MAP.long()),
    "slots_to_rows row_map k 0": lambda: slots_to_rows(
        slots=torch.randn(10, 2, 0, 3), rm=ROW_MAP[:, :0]
    ),
    "slots_to_rows row_map k mismatch": lambda: slots_to_rows(rm=ROW_MAP[:, :1]),
    "slots_to_rows row_map 2^31 slots": lambda: slots_to_rows(
        slots=big(2**31, 1, 1, 3), rm=big(2**31, 1, dtype=I32)
    ),
    "slots_to_rows row_map device": lambda: slots_to_rows(rm=ROW_MAP.to(O)),
    "slots_to_rows no heads": lambda: slots_to_rows(slots=torch.randn(10, 0, 2, 3)),
    "slots_to_rows num_rows < 0": lambda: slots_to_rows(num_rows=-1),
    # scatter_rows
    "scatter_rows base 1-D": lambda: scatter_rows(base=torch.randn(6)),
    "scatter_rows base 3-D": lambda: scatter_rows(base=torch.randn(6, 4, 1)),
    "scatter_rows base int": lambda: scatter_rows(
        base=torch.ones(6, 4, dtype=I32), rows=torch.ones(3, 4, dtype=I32)
    ),
    "scatter_rows base bool": lambda: scatter_rows(
        base=torch.ones(6, 4, dtype=torch.bool), rows=torch.ones(3, 4, dtype=torch.bool)
    ),
    "scatter_rows base device": lambda: scatter_rows(base=torch.randn(6, 4, device=O)),
    "scatter_rows rows 1-D": lambda: scatter_rows(rows=torch.randn(4)),
    "scatter_rows rows 3-D": lambda: scatter_rows(rows=torch.randn(3, 4, 1)),
    "scatter_rows rows width": lambda: scatter_rows(rows=torch.randn(3, 5)),
    "scatter_rows rows dtype": lambda: scatter_rows(rows=torch.randn(3, 4, dtype=BF16)),
    "scatter_rows rows device": lambda: scatter_rows(rows=torch.randn(3, 4, device=O)),
    "scatter_rows index int64": lambda: scatter_rows(index=INDEX.long()),
    "scatter_rows index float": lambda: scatter_rows(index=INDEX.float()),
    "scatter_rows index length": lambda: scatter_rows(index=INDEX[:2]),
    "scatter_rows index 2-D": lambda: scatter_rows(index=INDEX[None]),
    "scatter_rows index 0-D": lambda: scatter_rows(index=INDEX[0]),
    "scatter_rows index device": lambda: scatter_rows(index=INDEX.to(O)),
    "scatter_rows 2^31 - 1 rows": lambda: scatter_rows(base=big(2**31 - 1, 4)),
    # scatter_rows_backward
    "scatter_rows_bw grad 1-D": lambda: scatter_rows_bw(grad=torch.randn(6)),
    "scatter_rows_bw grad 3-D": lambda: scatter_rows_bw(grad=torch.randn(6, 4, 1)),
    "scatter_rows_bw grad int": lambda: scatter_rows_bw(grad=torch.ones(6, 4, dtype=I32)),
    "scatter_rows_bw index int64": lambda: scatter_rows_bw(index=INDEX.long()),
    "scatter_rows_bw index 2-D": lambda: scatter_rows_bw(index=INDEX[None]),
    "scatter_rows_bw index device": lambda: scatter_rows_bw(index=INDEX.to(O)),
    "scatter_rows_bw 2^31 - 1 rows": lambda: scatter_rows_bw(grad=big(2**31 - 1, 4)),
    # reorder_chunks
    "reorder x 1-D": lambda: reorder(x=torch.randn(9)),
    "reorder x 3-D": lambda: reorder(x=torch.randn(9, 4, 1)),
    "reorder x int": lambda: reorder(x=torch.ones(9, 4, dtype=I32)),
    "reorder x bool": lambda: reorder(x=torch.ones(9, 4, dtype=torch.bool)),
    "reorder counts int64": lambda: reorder(counts=COUNTS.long()),
    "reorder counts float": lambda: reorder(counts=COUNTS.float()),
    "reorder counts 1-D": lambda: reorder(counts=COUNTS[0]),
    "reorder counts 3-D": lambda: reorder(counts=COUNTS[None]),
    "reorder counts 0-D": lambda: reorder(counts=COUNTS[0, 0]),
    "reorder counts A = 0": lambda: reorder(counts=COUNTS[:0]),
    "reorder counts B = 0": lambda: reorder(counts=COUNTS[:, :0]),
    "reorder counts 2^31 chunks": lambda: reorder(counts=big(2**16, 2**15, dtype=I32)),
    "reorder counts device": lambda: reorder(counts=COUNTS.to(O)),
    "reorder x 2^31 rows": lambda: reorder(x=big(2**31, 4)),
    # gated_activation (csrc/activation/check.cpp)
    "act name": lambda: act(activation="swish"),
    "act scalar": lambda: act(gate_up=torch.tensor(1.0)),
    "act odd": lambda: act(gate_up=torch.randn(6, 7)),
    "act 1-D odd": lambda: act(gate_up=torch.randn(7)),
    "act int": lambda: act(gate_up=torch.ones(6, 8, dtype=I32)),
    "act complex": lambda: act(gate_up=torch.ones(6, 8, dtype=torch.complex64)),
    "act_bw name": lambda: act_bw(activation="tanh"),
    "act_bw scalar": lambda: act_bw(gate_up=torch.tensor(1.0)),
    "act_bw odd": lambda: act_bw(gate_up=torch.randn(6, 9)),
    "act_bw int": lambda: act_bw(
        grad=torch.ones(6, 4, dtype=I32), gate_up=torch.ones(6, 8, dtype=I32)
    ),
    "act_bw grad shape": lambda: act_bw(grad=torch.randn(6, 3)),
    "act_bw grad rows": lambda: act_bw(grad=torch.randn(5, 4)),
    "act_bw grad rank": lambda: act_bw(grad=torch.randn(6, 4, 1)),
    "act_bw grad dtype": lambda: act_bw(grad=torch.randn(6, 4, dtype=BF16)),
    "act_bw grad device": lambda: act_bw(grad=torch.randn(6, 4, device=O)),
    # gated_activation with up (the split form)
    "act split name": lambda: act_split(activation="swish"),
    "act split scalar": lambda: act_split(gate=torch.tensor(1.0), up=torch.tensor(1.0)),
    "act split int": lambda: act_split(
        gate=torch.ones(6, 4, dtype=I32), up=torch.ones(6, 4, dtype=I32)
    ),
    "act up shape": lambda: act_split(up=torch.randn(6, 5)),
    "act up fused width": lambda: act_split(up=torch.randn(6, 8)),
    "act up rows": lambda: act_split(up=torch.randn(5, 4)),
    "act up rank": lambda: act_split(up=torch.randn(6, 4, 1)),
    "act up dtype": lambda: act_split(up=torch.randn(6, 4, dtype=BF16)),
    "act up device": lambda: act_split(up=torch.randn(6, 4, device=O)),
    "act_bw up beside a fused gate_up": lambda: act_bw(up=torch.randn(6, 4)),
    "act_bw up shape": lambda: act_bw_split(up=torch.randn(6, 3)),
    "act_bw up dtype": lambda: act_bw_split(up=torch.randn(6, 4, dtype=F64)),
    "act_bw up device": lambda: act_bw_split(up=torch.randn(6, 4, device=O)),
    "act_bw split grad fused shape": lambda: act_bw_split(grad=torch.randn(6, 2)),
    "act_bw split grad rows": lambda: act_bw_split(grad=torch.randn(5, 4)),
    "act_bw split grad dtype": lambda: act_bw_split(grad=torch.randn(6, 4, dtype=F16)),
    "act_bw split grad device": lambda: act_bw_split(grad=torch.randn(6, 4, device=O)),
    # gated_activation interleaved (interleaved=True: gate and up alternate in gate_up)
    "act il up given": lambda: act_il(up=torch.randn(6, 8)),
    "act il up given, split shapes": lambda: act_il(
        gate_up=torch.randn(6, 4), up=torch.randn(6, 4)
    ),
    "act il odd": lambda: act_il(gate_up=torch.randn(6, 7)),
    "act il 1-D odd": lambda: act_il(gate_up=torch.randn(7)),
    "act il name": lambda: act_il(activation="swish"),
    "act il int": lambda: act_il(gate_up=torch.ones(6, 8, dtype=I32)),
    "act_bw il up given": lambda: act_bw_il(up=torch.randn(6, 8)),
    "act_bw il odd": lambda: act_bw_il(gate_up=torch.randn(6, 9)),
    "act_bw il grad shape": lambda: act_bw_il(grad=torch.randn(6, 8)),
    "act_bw il grad dtype": lambda: act_bw_il(grad=torch.randn(6, 4, dtype=F16)),
    "act_bw il grad device": lambda: act_bw_il(grad=torch.randn(6, 4, device=O)),
}


# ---- the three ways of calling an op --------------------------------------------------------


def _map(fn, args, kwargs):
    f = lambda v: fn(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tuple(f(a) for a in args), {k: f(v) for k, v in kwargs.items()}


def _mixed(args, kwargs):
    ts = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    return any(t.device.type == O for t in ts)


def call_cpu(op, args, kwargs):
    if _mixed(args, kwargs):
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        return op.redispatch(keys, *args, **kwargs)
    return op(*args, **kwargs)


def call_meta(op, args, kwargs):
    if not _mixed(args, kwargs):
        args, kwargs = _map(lambda t: t.to(O), args, kwargs)
    return op(*args, **kwargs)


def call_fake(op, args, kwargs):
    with FakeTensorMode() as mode:
        args, kwargs = _map(mode.from_tensor, args, kwargs)
        return op(*args, **kwargs)


def _raised(call, op, args, kwargs):
    try:
        call(op, args, kwargs)
    except Exception as e:  # noqa: BLE001  (the type is part of what must match)
        return type(e), str(e)
    return None


@pytest.mark.parametrize("case", list(BAD))
def test_fake_raises_what_the_cpu_op_raises(case):
    op, args, kwargs = BAD[case]()
    cpu = _raised(call_cpu, op, args, kwargs)
    assert cpu is not None, f"{case}: the CPU op accepted it (not a bad case?)"
    assert cpu[0] is RuntimeError, cpu
    assert cpu[1].startswith(str(op._schema.name).split("::")[1]), cpu[1]  # names the op
    for how, call in (("meta", call_meta), ("fake", call_fake)):
        got = _raised(call, op, args, kwargs)
        assert got == cpu, f"{case}: {how} raised {got}, the CPU op {cpu}"


def _shapes(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [(tuple(t.shape), t.dtype) for t in outs]


@pytest.mark.parametrize("case", list(VALID))
def test_valid_calls_agree(case):
    op, args, kwargs = VALID[case]()
    expect = _shapes(call_cpu(op, args, kwargs))
    assert _shapes(call_meta(op, args, kwargs)) == expect
    assert _shapes(call_fake(op, args, kwargs)) == expect
