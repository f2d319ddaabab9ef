"""permute / unpermute against the plain-PyTorch reference, properties, gradients, opcheck, edge
cases and bad input. Integer outputs (offsets, row_map, dropped) and permuted rows are exact;
unpermute's sums follow helpers.assert_close_to_ref."""

import pytest
import torch

import mixops
import mixops.reference as ref
from conftest import DEVICES
from helpers import assert_close_to_ref, opcheck, run_script_ok

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def random_ids(num_tokens, k, num_experts, device="cpu", none_frac=0.0, dtype=torch.int32):
    """Distinct experts per token (as a router gives), optionally some -1."""
    ids = (
        torch.stack([torch.randperm(num_experts)[:k] for _ in range(num_tokens)])
        if num_tokens
        else torch.zeros(0, k, dtype=torch.long)
    )
    if none_frac:
        ids[torch.rand(ids.shape) < none_frac] = -1
    return ids.to(dtype).to(device)


def check_permute(x, ids, num_experts, **kw):
    out = mixops.ops.permute(x, ids, num_experts, **kw)
    cpu_kw = {n: (v.cpu() if torch.is_tensor(v) else v) for n, v in kw.items()}
    xs, off, rm, dr = ref.permute(x.cpu(), ids.cpu(), num_experts, **cpu_kw)
    assert torch.equal(out.offsets.cpu(), off), "offsets"
    assert torch.equal(out.row_map.cpu(), rm), "row_map"
    assert torch.equal(out.dropped.cpu(), dr), "dropped"
    assert torch.equal(out.x_sorted.cpu(), xs), "x_sorted rows (an exact copy, zero tail)"
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(50, 2, 8, 32), (64, 8, 64, 24), (33, 6, 60, 13), (7, 1, 256, 5), (300, 8, 256, 16)],
    ids=str,
)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
def test_permute_dropless(device, dtype, shape, ids_dtype):
    num_tokens, k, num_experts, hidden = shape
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    ids = random_ids(num_tokens, k, num_experts, device, none_frac=0.1, dtype=ids_dtype)
    out = check_permute(x, ids, num_experts)
    assert out.x_sorted.shape == (num_tokens * k, hidden)  # static bound, whatever the routing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity", [0, 1, 3, 10])
@pytest.mark.parametrize("by_priority", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_permute_capacity(device, capacity, by_priority, k):
    num_tokens, num_experts = 40, 8
    x = torch.randn(num_tokens, 12, device=device)
    ids = random_ids(num_tokens, k, num_experts, device, none_frac=0.05)
    ids[:20, 0] = 3  # a hot expert, so capacity bites
    ids[:20, 1:] = torch.where(ids[:20, 1:] == 3, 4, ids[:20, 1:]) if k > 1 else ids[:20, 1:]
    kw = dict(capacity=capacity)
    if by_priority:
        pr = torch.rand(num_tokens, k, device=device)
        pr[5, 0] = pr[6, 0]  # a tie, broken by token order
        pr[7, 0] = float("nan")  # NaN last
        kw["priority"] = pr
    out = check_permute(x, ids, num_experts, **kw)
    assert out.x_sorted.shape[0] == min(num_tokens * k, num_experts * capacity)
    kept = (out.row_map >= 0).sum()
    assert int(kept) + int(out.dropped.sum()) == int((ids >= 0).sum())


@pytest.mark.parametrize("device", DEVICES)
def test_capacity_priority_order(device):
    # expert 0, capacity 2: token 3's first choice beats every second choice; with priorities
    # the highest first-choice priorities win.
    ids = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1], [0, 1]], device=device)
    x = torch.arange(5, device=device, dtype=torch.float32)[:, None].expand(5, 4).contiguous()
    out = mixops.ops.permute(x, ids, 2, capacity=2)
    assert out.row_map[:, 0].tolist()[1] >= 0 and out.row_map[3, 0] >= 0
    assert out.row_map[4, 0] == -1 and out.row_map[0, 1] == -1 and out.row_map[2, 1] == -1
    pr = torch.tensor([[0.9, 0.1], [0.2, 0.1], [0.8, 0.1], [0.5, 0.1], [0.7, 0.1]], device=device)
    out = mixops.ops.permute(x, ids, 2, capacity=2, priority=pr)
    kept0 = [t for t in range(5) if ids[t, 0] == 0 and out.row_map[t, 0] >= 0]
    assert kept0 == [3, 4]
    # rows inside an expert stay in token order even when priority picked them
    assert out.x_sorted[0:2, 0].tolist() == [3.0, 4.0]


@pytest.mark.parametrize("device", DEVICES)
def test_capacity_at_least_tokens_equals_dropless(device):
    x = torch.randn(30, 16, device=device)
    ids = random_ids(30, 4, 8, device)
    a = mixops.ops.permute(x, ids, 8)
    b = mixops.ops.permute(x, ids, 8, capacity=30)
    for name, u, v in zip(a._fields, a, b):
        assert torch.equal(u, v), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permute_unpermute_identity(device, dtype):
    x = torch.randn(45, 19, device=device).to(dtype)
    ids = random_ids(45, 1, 7, device)
    p = mixops.ops.permute(x, ids, 7)
    y = mixops.ops.unpermute(p.x_sorted, p.row_map, torch.ones(45, 1, device=device))
    assert torch.equal(y, x)
    assert torch.equal(mixops.ops.unpermute(p.x_sorted, p.row_map), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weights_dtype", ["fp32", "same", None])
@pytest.mark.parametrize("hidden", [8, 13, 1024])
def test_unpermute(device, dtype, weights_dtype, hidden):
    num_tokens, k, num_experts = 37, 4, 16
    ids = random_ids(num_tokens, k, num_experts, device, none_frac=0.1)
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    p = mixops.ops.permute(x, ids, num_experts, capacity=9)
    y_sorted = torch.randn_like(p.x_sorted)
    w = None
    if weights_dtype:
        w = torch.rand(num_tokens, k, device=device)
        w = w.to(dtype) if weights_dtype == "same" or dtype == torch.float64 else w
    out = mixops.ops.unpermute(y_sorted, p.row_map, w)
    assert out.dtype == dtype
    hi = ref.unpermute(
        y_sorted.cpu().double(), p.row_map.cpu(), None if w is None else w.cpu().double()
    )
    lowp = ref.unpermute(y_sorted.cpu(), p.row_map.cpu(), None if w is None else w.cpu().to(dtype))
    assert_close_to_ref(out, hi, lowp.to(dtype), "unpermute")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_against_reference(device, dtype):
    num_tokens, k, num_experts, hidden = 29, 3, 8, 24
    ids = random_ids(num_tokens, k, num_experts, device, none_frac=0.1)
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    w = torch.rand(num_tokens, k, device=device)
    scale = torch.randn(num_tokens * k, hidden, device=device).to(dtype)  # a row-wise "expert"
    g = torch.randn(num_tokens, hidden, device=device).to(dtype)

    def run(permute, unpermute, x, w, cap):
        x = x.detach().requires_grad_(True)
        w = w.detach().requires_grad_(True)
        xs = permute(x, ids.to(x.device), num_experts, capacity=cap)
        y = unpermute(xs[0] * scale[: xs[0].shape[0]].to(x), xs[2], w)
        y.backward(g.to(y))
        return x.grad, w.grad

    for cap in (None, 6):
        ours = run(mixops.ops.permute, mixops.ops.unpermute, x, w, cap)
        hi = run(ref.permute, ref.unpermute, x.cpu().double(), w.cpu().double(), cap)
        lowp = run(ref.permute, ref.unpermute, x.cpu(), w.cpu(), cap)
        assert_close_to_ref(ours[0], hi[0], lowp[0].to(dtype), f"d x cap={cap}")
        assert_close_to_ref(ours[1], hi[1], lowp[1].float(), f"d weights cap={cap}")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    ids = random_ids(9, 3, 5, device, none_frac=0.15)
    x = torch.randn(9, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(9, 3, dtype=torch.float64, device=device, requires_grad=True)
    scale = torch.randn(27, 6, dtype=torch.float64, device=device)

    def f(x, w):
        p = mixops.ops.permute(x, ids, 5, capacity=4)
        return mixops.ops.unpermute(p.x_sorted * scale[: p.x_sorted.shape[0]], p.row_map, w)

    torch.autograd.gradcheck(f, (x, w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    ids = random_ids(10, 2, 4, device, none_frac=0.1)
    x = torch.randn(10, 8, device=device, requires_grad=requires_grad)
    opcheck(torch.ops.mixops.permute.default, (x, ids, 4))
    opcheck(torch.ops.mixops.permute.default, (x, ids, 4), dict(capacity=3))
    opcheck(
        torch.ops.mixops.permute.default,
        (x, ids, 4),
        dict(capacity=3, priority=torch.rand(10, 2, device=device)),
    )
    p = mixops.ops.permute(x.detach(), ids, 4)
    y_sorted = torch.randn(20, 8, device=device, requires_grad=requires_grad)
    w = torch.rand(10, 2, device=device, requires_grad=requires_grad)
    opcheck(torch.ops.mixops.unpermute.default, (y_sorted, p.row_map, w))
    opcheck(torch.ops.mixops.unpermute.default, (y_sorted, p.row_map))
    g = torch.randn(10, 8, device=device)
    opcheck(torch.ops.mixops.unpermute_backward.default, (g, p.row_map, w.detach(), 20))
    opcheck(
        torch.ops.mixops.unpermute_weights_backward.default,
        (g, y_sorted.detach(), p.row_map, w.detach()),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_edge_cases(device):
    # no tokens
    out = check_permute(torch.randn(0, 8, device=device), random_ids(0, 2, 4, device), 4)
    assert out.x_sorted.shape == (0, 8) and out.offsets.tolist() == [0] * 4
    assert mixops.ops.unpermute(out.x_sorted, out.row_map).shape == (0, 8)
    # one expert; all tokens to one expert; experts with no tokens; no expert at all
    x = torch.randn(20, 5, device=device)
    check_permute(x, torch.zeros(20, 1, dtype=torch.int32, device=device), 1)
    out = check_permute(x, torch.full((20, 1), 6, dtype=torch.int32, device=device), 8)
    assert out.offsets.tolist() == [0] * 6 + [20, 20]
    out = check_permute(x, torch.full((20, 2), -1, dtype=torch.int32, device=device), 8)
    assert torch.all(out.x_sorted == 0) and torch.all(out.row_map == -1)
    assert torch.all(mixops.ops.unpermute(out.x_sorted, out.row_map) == 0)
    # k = E, and a non-contiguous x
    xt = torch.randn(5, 20, device=device).t()
    check_permute(xt, random_ids(20, 6, 6, device), 6)
    check_permute(xt, random_ids(20, 6, 6, device), 6, capacity=0)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_chain(device):
    from mixops.ops import permute, router_topk, unpermute

    def chain(x, logits):
        r = router_topk(logits, 2)
        p = permute(x, r.ids, 8)
        return unpermute(p.x_sorted * 2, p.row_map, r.weights) + r.lse[:, None]

    x = torch.randn(24, 16, device=device)
    logits = torch.randn(24, 8, device=device)
    compiled = torch.compile(chain, fullgraph=True, dynamic=True)
    for n in (24, 17):
        xe, le = x[:n].clone().requires_grad_(True), logits[:n].clone().requires_grad_(True)
        xc, lc = x[:n].clone().requires_grad_(True), logits[:n].clone().requires_grad_(True)
        ye, yc = chain(xe, le), compiled(xc, lc)
        torch.testing.assert_close(yc, ye)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad)
        torch.testing.assert_close(lc.grad, le.grad)


BAD = [
    (lambda x, ids: mixops.ops.permute(x[0], ids, 8), "x must be 2-D"),
    (lambda x, ids: mixops.ops.permute(x, ids.float(), 8), "ids must be int32 or int64"),
    (lambda x, ids: mixops.ops.permute(x, ids[:5], 8), "ids must have shape"),
    (lambda x, ids: mixops.ops.permute(x, ids, 0), "num_experts must be in"),
    (
        lambda x, ids: mixops.ops.permute(x, ids, 4),
        r"ids values must be in \[-1, num_experts = 4\)",
    ),
    (lambda x, ids: mixops.ops.permute(x, ids - 3, 8), "ids values must be in"),
    (lambda x, ids: mixops.ops.permute(x, ids, 8, capacity=-1), "capacity must be >= 0"),
    (lambda x, ids: mixops.ops.permute(x, ids, 8, priority=torch.rand(10, 2)), "give capacity"),
    (
        lambda x, ids: mixops.ops.permute(x, ids, 8, capacity=2, priority=torch.rand(10, 3)),
        "priority must have the shape of ids",
    ),
]


@pytest.mark.parametrize("fn,match", BAD, ids=[m for _, m in BAD])
def test_bad_permute(fn, match):
    x = torch.randn(10, 4)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(10)]).int()
    with pytest.raises(RuntimeError, match=match):
        fn(x, ids)


def test_bad_unpermute():
    x = torch.randn(10, 4)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(10)]).int()
    p = mixops.ops.permute(x, ids, 8)
    with pytest.raises(RuntimeError, match="row_map values must be in"):
        mixops.ops.unpermute(p.x_sorted[:15], p.row_map)  # rows from another call's shape
    with pytest.raises(RuntimeError, match="row_map must be int32"):
        mixops.ops.unpermute(p.x_sorted, p.row_map.long())
    with pytest.raises(RuntimeError, match="weights must have the shape of row_map"):
        mixops.ops.unpermute(p.x_sorted, p.row_map, torch.ones(10, 3))
    with pytest.raises(RuntimeError, match="weights must be float32, float64 or the data"):
        mixops.ops.unpermute(p.x_sorted, p.row_map, torch.ones(10, 2, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="maps two slots to row"):
        mixops.ops.unpermute(p.x_sorted, torch.zeros_like(p.row_map))
    with pytest.raises(RuntimeError, match="row_map must have shape"):
        torch.ops.mixops.unpermute_backward(torch.randn(9, 4), p.row_map, None, 20)


def test_bad_backward_ops():
    x = torch.randn(10, 4)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(10)]).int()
    p = mixops.ops.permute(x, ids, 8)
    g, w = torch.randn(10, 4), torch.rand(10, 2)
    with pytest.raises(RuntimeError, match="y_sorted must match grad_y in dtype and hidden size"):
        torch.ops.mixops.unpermute_weights_backward(g, p.x_sorted[:, :3], p.row_map, w)
    with pytest.raises(RuntimeError, match="row_map values must be in"):
        torch.ops.mixops.unpermute_weights_backward(g, p.x_sorted[:7], p.row_map, w)
    with pytest.raises(RuntimeError, match="weights must have the shape of row_map"):
        torch.ops.mixops.unpermute_backward(g, p.row_map, w[:, :1], 20)
    with pytest.raises(RuntimeError, match="num_rows must be >= 0"):
        torch.ops.mixops.unpermute_backward(g, p.row_map, w, -1)
    with pytest.raises(RuntimeError, match="row_map values must be in"):
        torch.ops.mixops.unpermute_backward(g, p.row_map, w, 5)


# A capacity at least the number of slots (T * k) drops nothing, however large: num_rows must not
# come from a wrapping num_experts * capacity (2^62 + 100 with E = 4 gave 400 rows for 2000 slots
# and a heap overflow on CPU). Run in a subprocess so that a crash fails this test, not the run.
_HUGE_CAPACITY = """
import torch, mixops
torch.manual_seed(0)
T, k, E = 1000, 2, 4
x = torch.randn(T, 8)
ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
ids[::7, 1] = -1
ref = mixops.ops.permute(x, ids, E)
for cap in (2**62 + 100, 2**63 - 1, T * k, T * k - 1, T):
    for dev in ("cpu", "meta"):
        out = mixops.ops.permute(x.to(dev), ids.to(dev), E, capacity=cap)
        assert out.x_sorted.shape == (T * k, 8), (cap, dev, tuple(out.x_sorted.shape))
        if dev == "cpu":
            for name, a, b in zip(out._fields, out, ref):
                assert torch.equal(a, b), (cap, name)
print("ok")
"""


def test_huge_capacity_equals_dropless():
    run_script_ok(_HUGE_CAPACITY)


def sequential_unpermute(y_sorted, row_map, weights, dtype):
    """unpermute's contract to the bit: per token, acc = 0 (fp32), then for j = 0..k-1 with a
    row, acc = acc + fl(w * y) (a rounded fp32 product, then a rounded add: no FMA), rounded once
    to dtype at the end."""
    acc = torch.zeros(row_map.shape[0], y_sorted.shape[1], dtype=torch.float32)
    for j in range(row_map.shape[1]):
        r = row_map[:, j].long()
        has = r >= 0
        prod = y_sorted[r[has]].float()
        if weights is not None:
            prod = weights[has, j].float()[:, None] * prod
        acc[has] = acc[has] + prod
    return acc.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [3, 16, 17, 20, 32])
@pytest.mark.parametrize("weights_dtype", ["fp32", "same", None])
def test_unpermute_accumulates_in_fp32_bit_exact(dtype, k, weights_dtype):
    # More than 16 choices used to round the partial sum to dtype every 16 choices.
    num_tokens, num_experts, hidden = 40, 48, 200  # hidden: 3 full column blocks and a tail
    ids = random_ids(num_tokens, k, num_experts, none_frac=0.1)
    ids[3] = -1  # a token with no row at all
    p = mixops.ops.permute(torch.randn(num_tokens, hidden).to(dtype), ids, num_experts)
    y_sorted = (torch.randn_like(p.x_sorted.float()) * 4).to(dtype)
    w = None
    if weights_dtype:
        w = torch.rand(num_tokens, k)
        w = w.to(dtype) if weights_dtype == "same" else w
    out = mixops.ops.unpermute(y_sorted, p.row_map, w)
    expect = sequential_unpermute(y_sorted, p.row_map, w, dtype)
    differ = (out != expect).float().mean().item()
    assert torch.equal(out, expect), f"{differ:.1%} of the values differ"
