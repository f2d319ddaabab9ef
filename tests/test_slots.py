"""rows_to_slots / slots_to_rows (the MoA slot layout, csrc/permute/permute.h) against the
plain-torch reference (mixops.reference): exact copies in every dtype (the bits, NaN included),
each the inverse of the other on permute's rows, the strided layouts SDPA makes, gradients,
opcheck, compile with dynamic shapes, bad input and extreme sizes."""

import pytest
import torch
import torch.nn.functional as F

import mixops
import mixops.reference as ref
from conftest import DEVICES, HAS_CUDA, requires_cuda
from helpers import assert_bits_equal, data, opcheck, run_script_ok
from mixops.ops import permute, rows_to_slots, slots_to_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def routed(num_tokens, k, num_experts, device="cpu", capacity=None, none_frac=0.1):
    """(row_map, num_rows) from a real permute call: -1 for slots without an expert and, with a
    capacity, for dropped ones; permute's rows past its used ones have no slot."""
    ids = torch.randint(0, num_experts, (num_tokens, k))
    ids[torch.rand(num_tokens, k) < none_frac] = -1
    x = torch.zeros(num_tokens, 1, device=device)
    p = permute(x, ids.int().to(device), num_experts, capacity=capacity)
    return p.row_map, p.x_sorted.shape[0]


# (T, k, E, capacity): k = 1, T = 0, dropless, a capacity that drops slots (and leaves rows no
# slot maps to), every slot dropped.
CASES = [(37, 2, 8, None), (40, 1, 5, None), (0, 2, 4, None), (50, 4, 8, 12), (9, 3, 4, 0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads", [1, 2, 4])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_rows_to_slots(device, dtype, num_heads, case):
    t, k, e, capacity = case
    row_map, num_rows = routed(t, k, e, device, capacity)
    d = 6 if dtype != torch.float16 else 8  # 8 fp16: 16-byte pieces on CUDA
    rows = data(num_rows, num_heads * d, dtype, device)
    slots = rows_to_slots(rows, row_map, num_heads)
    assert slots.shape == (t, num_heads, k, d) and slots.is_contiguous()
    expect = ref.rows_to_slots(rows.cpu(), row_map.cpu(), num_heads)
    assert_bits_equal(slots, expect, "slots")
    assert torch.all(slots.cpu().transpose(1, 2)[row_map.cpu() < 0] == 0), "-1 slots are zero"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads", [1, 2, 4])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_slots_to_rows(device, dtype, num_heads, case):
    t, k, e, capacity = case
    row_map, num_rows = routed(t, k, e, device, capacity)
    d = 5
    slots = data(t * num_heads * k, d, dtype, device).view(t, num_heads, k, d)
    for extra in (0, 3):  # rows past permute's: no slot maps to them
        rows = slots_to_rows(slots, row_map, num_rows + extra)
        assert rows.shape == (num_rows + extra, num_heads * d) and rows.is_contiguous()
        expect = ref.slots_to_rows(slots.cpu(), row_map.cpu(), num_rows + extra)
        assert_bits_equal(rows, expect, "rows")
        mapped = torch.zeros(num_rows + extra, dtype=torch.bool)
        mapped[row_map.cpu()[row_map.cpu() >= 0].long()] = True
        assert torch.all(rows.cpu()[~mapped] == 0), "rows no slot maps to are zero"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("capacity", [None, 7])
def test_each_is_the_others_inverse(device, dtype, capacity):
    t, k, e, num_heads, d = 45, 3, 6, 2, 8
    ids = torch.randint(0, e, (t, k)).int().to(device)
    ids[::5, 1] = -1
    x = data(t, num_heads * d, dtype, device)
    p = permute(x, ids, e, capacity=capacity)
    slots = rows_to_slots(p.x_sorted, p.row_map, num_heads)
    # permute's rows no slot maps to are zero, so the round trip gives back every row
    assert_bits_equal(slots_to_rows(slots, p.row_map, p.x_sorted.shape[0]), p.x_sorted, "rows")
    # and slots whose -1 slots are zero come back from their rows
    back = rows_to_slots(slots_to_rows(slots, p.row_map, p.x_sorted.shape[0]), p.row_map, num_heads)
    assert_bits_equal(back, slots, "slots")
    # slot (t, j) holds token t's row of x, head by head
    has = p.row_map >= 0
    tok = torch.arange(t, device=device)[:, None].expand(t, k)
    got = slots.transpose(1, 2)[has].reshape(-1, num_heads * d)
    assert_bits_equal(got, x[tok[has]], "slots hold the tokens' rows")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_rows(device, dtype):
    t, k, e, num_heads, d = 30, 2, 5, 4, 4
    row_map, num_rows = routed(t, k, e, device)
    wide = data(num_rows, 3 * num_heads * d + 1, dtype, device)
    for rows in (wide[:, 1 : 1 + num_heads * d], wide[:, : 3 * num_heads * d : 3]):
        assert not rows.is_contiguous()  # row-strided, then column-strided (copied)
        expect = ref.rows_to_slots(rows.cpu(), row_map.cpu(), num_heads)
        assert_bits_equal(rows_to_slots(rows, row_map, num_heads), expect, "slots")
    # a row stride of 0 (every row the same storage)
    rows = data(1, num_heads * d, dtype, device).expand(num_rows, num_heads * d)
    expect = ref.rows_to_slots(rows.cpu(), row_map.cpu(), num_heads)
    assert_bits_equal(rows_to_slots(rows, row_map, num_heads), expect, "slots")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_sdpa_layout(device, dtype, batch):
    """The slots of B * S tokens are SDPA's query with enable_gqa (query head h * k + j reads kv
    head h) through views alone, and SDPA's output comes back through views (a reshape copies
    only when B > 1)."""
    seq, k, e, num_heads, d = 11, 2, 4, 3, 8
    t = batch * seq
    row_map, num_rows = routed(t, k, e, device)
    rows = data(num_rows, num_heads * d, dtype, device).nan_to_num(0.0, 0.0, 0.0)
    slots = rows_to_slots(rows, row_map, num_heads)
    q = slots.view(batch, seq, num_heads * k, d).transpose(1, 2)  # [B, Hq, S, d], no copy
    assert q.data_ptr() == slots.data_ptr() and q.shape == (batch, num_heads * k, seq, d)
    for h in range(num_heads):
        for j in range(k):
            r = row_map.view(batch, seq, k)[:, :, j].long()
            expect = torch.where(
                (r >= 0)[..., None], rows[r.clamp(min=0)][..., h * d : (h + 1) * d], 0
            )
            assert_bits_equal(q[:, h * k + j], expect, f"query head {h * k + j}")
    if dtype in (torch.float32, torch.float64):
        kv = torch.randn(2, batch, num_heads, seq, d, dtype=dtype, device=device)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], enable_gqa=True)
        rep = [x.repeat_interleave(k, dim=1) for x in kv]  # what enable_gqa means
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, *rep))
    # SDPA's output [B, Hq, S, d] (contiguous) back to rows
    o = data(batch * num_heads * k * seq, d, dtype, device).view(batch, num_heads * k, seq, d)
    o_slots = o.transpose(1, 2).reshape(t, num_heads, k, d)
    assert (o_slots.data_ptr() == o.data_ptr()) == (batch == 1), "a view exactly when B == 1"
    if batch == 1:
        assert not o_slots.is_contiguous()  # token stride d, head stride k * S * d
    expect = ref.slots_to_rows(o_slots.cpu().contiguous(), row_map.cpu(), num_rows)
    assert_bits_equal(slots_to_rows(o_slots, row_map, num_rows), expect, "rows")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_slots(device):
    t, k, e, num_heads, d = 20, 3, 5, 2, 6
    row_map, num_rows = routed(t, k, e, device)
    base = data(t * k * num_heads * 2, d + 2, torch.float32, device)
    cases = {
        "permuted dims": base[:, :d].reshape(t, k, num_heads, 2, d)[:, :, :, 0].transpose(1, 2),
        "expanded heads": base[: t * k, :d].view(t, 1, k, d).expand(t, num_heads, k, d),
        "last dim strided": base[: t * num_heads * k].view(t, num_heads, k, d + 2)[..., ::2],
    }
    for name, slots in cases.items():
        expect = ref.slots_to_rows(slots.cpu().contiguous(), row_map.cpu(), num_rows)
        assert_bits_equal(slots_to_rows(slots, row_map, num_rows), expect, name)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    t, k, e, num_heads, d = 8, 2, 4, 2, 3
    row_map, num_rows = routed(t, k, e, device, capacity=3)
    f64 = dict(dtype=torch.float64, device=device)
    rows = torch.randn(num_rows, num_heads * d, **f64, requires_grad=True)
    torch.autograd.gradcheck(lambda r: rows_to_slots(r, row_map, num_heads), (rows,))
    slots = torch.randn(t, k, num_heads, d, **f64).transpose(1, 2).requires_grad_(True)
    torch.autograd.gradcheck(lambda s: slots_to_rows(s, row_map, num_rows + 2), (slots,))
    # second order (each backward is the other op)
    torch.autograd.gradgradcheck(lambda r: rows_to_slots(r, row_map, num_heads), (rows,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_are_the_other_op(device):
    t, k, e, num_heads, d = 16, 2, 4, 2, 4
    row_map, num_rows = routed(t, k, e, device, capacity=5)
    rows = torch.randn(num_rows, num_heads * d, device=device, requires_grad=True)
    g = torch.randn(t, num_heads, k, d, device=device)
    rows_to_slots(rows, row_map, num_heads).backward(g)
    assert torch.equal(rows.grad, slots_to_rows(g, row_map, num_rows))
    slots = torch.randn(t, num_heads, k, d, device=device, requires_grad=True)
    gr = torch.randn(num_rows, num_heads * d, device=device)
    slots_to_rows(slots, row_map, num_rows).backward(gr)
    assert torch.equal(slots.grad, rows_to_slots(gr, row_map, num_heads))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    row_map, num_rows = routed(10, 2, 4, device, capacity=4)
    rows = torch.randn(num_rows, 8, device=device, requires_grad=requires_grad)
    opcheck(torch.ops.mixops.rows_to_slots.default, (rows, row_map, 2))
    opcheck(torch.ops.mixops.rows_to_slots.default, (rows, row_map))
    slots = torch.randn(10, 2, 2, 4, device=device, requires_grad=requires_grad)
    opcheck(torch.ops.mixops.slots_to_rows.default, (slots, row_map, num_rows))
    strided = torch.randn(10, 2, 2, 4, device=device).transpose(1, 2)
    opcheck(torch.ops.mixops.slots_to_rows.default, (strided, row_map, num_rows + 3))


@pytest.mark.parametrize("device", DEVICES)
def test_compile(device):
    """A MoA-shaped chain: permute, a per-row projection, the slot layout, a per-slot-head scale,
    back to rows and unpermute; torch.compile(fullgraph, dynamic) forward and backward."""
    e, k, num_heads, d = 4, 2, 2, 4
    scale = torch.randn(num_heads, k, 1, device=device)

    def chain(x, ids):
        p = permute(x, ids, e)
        s = rows_to_slots(p.x_sorted * 2, p.row_map, num_heads)
        s = (s.transpose(1, 2) * scale.transpose(0, 1)).transpose(1, 2)  # strided slots
        rows = slots_to_rows(s, p.row_map, p.x_sorted.shape[0])
        return mixops.ops.unpermute(rows, p.row_map)

    compiled = torch.compile(chain, fullgraph=True, dynamic=True)
    for n in (24, 17):
        x = torch.randn(n, num_heads * d, device=device)
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)]).int().to(device)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = chain(xe, ids), compiled(xc, ids)
        torch.testing.assert_close(yc, ye, rtol=0, atol=0)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=0)


# ---- bad input -------------------------------------------------------------------------------

RM = torch.tensor([[0, 3], [1, -1], [2, 4]], dtype=torch.int32)  # 3 tokens, k = 2, 5 rows
R = torch.randn(5, 8)
S = torch.randn(3, 2, 2, 4)

BAD = [
    (lambda: rows_to_slots(R[0], RM), "rows_to_slots: rows must be 2-D"),
    (lambda: rows_to_slots(R.int(), RM), "rows_to_slots: rows must be float32"),
    (lambda: rows_to_slots(R, RM.long()), "rows_to_slots: row_map must be int32"),
    (lambda: rows_to_slots(R, RM[0]), r"rows_to_slots: row_map must be 2-D \[num_tokens, k\]"),
    (lambda: rows_to_slots(R, RM[:, :0]), "rows_to_slots: row_map must have k >= 1"),
    (lambda: rows_to_slots(R, RM, 3), "rows.size\\(1\\) = 8 must be divisible by num_heads = 3"),
    (lambda: rows_to_slots(R, RM, 0), "rows_to_slots: num_heads must be >= 1, got 0"),
    (lambda: rows_to_slots(R, RM, -2), "rows_to_slots: num_heads must be >= 1, got -2"),
    (lambda: rows_to_slots(R[:4], RM), r"row_map values must be in \[-1, num_rows = 4\)"),
    (lambda: rows_to_slots(R, RM - 2), r"got row_map\[0, 0\] = -2"),
    (lambda: rows_to_slots(R, RM.clamp(max=2)), "row_map maps two slots to row 2"),
    (
        lambda: rows_to_slots(R, RM.to("meta")),
        "rows_to_slots: row_map must be on the same device as rows",
    ),
    (lambda: slots_to_rows(S[0], RM, 5), "slots_to_rows: slots must be 4-D"),
    (lambda: slots_to_rows(S.int(), RM, 5), "slots_to_rows: slots must be float32"),
    (lambda: slots_to_rows(S, RM.long(), 5), "slots_to_rows: row_map must be int32"),
    (lambda: slots_to_rows(S, RM[:2], 5), "num_tokens = slots.size\\(0\\) = 3"),
    (lambda: slots_to_rows(S, RM[:, :1], 5), r"row_map must have k = slots.size\(2\) = 2"),
    (lambda: slots_to_rows(S[:, :0], RM, 5), r"num_heads = slots.size\(1\) >= 1"),
    (lambda: slots_to_rows(S, RM, -1), "slots_to_rows: num_rows must be >= 0, got -1"),
    (lambda: slots_to_rows(S, RM, 4), r"slots_to_rows: row_map values must be in \[-1, num_rows"),
    (lambda: slots_to_rows(S, RM.clamp(max=2), 5), r"maps two slots to row 2 \(at row_map\[2, "),
    (
        lambda: slots_to_rows(S, RM.to("meta"), 5),
        "slots_to_rows: row_map must be on the same device as slots",
    ),
    (lambda: slots_to_rows(S.to(torch.complex64), RM, 5), "slots must be float32"),
]


@pytest.mark.parametrize("fn,match", BAD, ids=[m for _, m in BAD])
def test_bad_input(fn, match):
    with pytest.raises(RuntimeError, match=match):
        fn()


@requires_cuda
def test_cuda_device_mismatch():
    with pytest.raises(RuntimeError, match="row_map must be on the same device as rows"):
        rows_to_slots(R.cuda(), RM)
    with pytest.raises(RuntimeError, match="row_map must be on the same device as slots"):
        slots_to_rows(S, RM.cuda(), 5)


@requires_cuda
def test_cuda_bad_values_are_flagged():
    """CUDA cannot raise without a sync: out-of-range values count as -1, a row two slots map to
    keeps the last slot, and mixops.check_errors() names the op (the CPU raises at once)."""
    mixops.check_errors()
    rows, slots = R.cuda(), S.cuda()
    bad = RM.clone()
    bad[0, 1] = 77
    out = rows_to_slots(rows, bad.cuda(), 2)
    clean = bad.clone()
    clean[0, 1] = -1
    assert torch.equal(out.cpu(), rows_to_slots(R, clean, 2))
    with pytest.raises(RuntimeError, match="rows_to_slots: invalid input values: row_map values"):
        mixops.check_errors()
    dup = RM.clone()
    dup[2, 0] = 1  # slots (1, 0) and (2, 0) on row 1: the later one is kept
    out = slots_to_rows(slots, dup.cuda(), 5)
    kept = dup.clone()
    kept[1, 0] = -1
    assert torch.equal(out.cpu(), slots_to_rows(S, kept, 5))
    with pytest.raises(RuntimeError, match="slots_to_rows: invalid input values: row_map maps"):
        mixops.check_errors()
    slots_to_rows(slots, bad.cuda(), 5)
    with pytest.raises(RuntimeError, match=r"slots_to_rows: .*num_rows = 5\)"):
        mixops.check_errors()
    mixops.check_errors()  # cleared


@requires_cuda
def test_cuda_graph_capture_follows_new_routing():
    """No host sync: the MoA chain (permute, rows_to_slots, SDPA, slots_to_rows, unpermute)
    captures into a CUDA graph, and replays follow new routing and new inputs."""
    t, e, k, heads, d = 64, 8, 2, 2, 16
    x = torch.randn(t, heads * d, device="cuda")
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).int().cuda()
    kv = torch.randn(2, 1, heads, t, d, device="cuda")

    def chain():
        p = permute(x, ids, e, capacity=12)
        q = rows_to_slots(p.x_sorted, p.row_map, heads).view(1, t, heads * k, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, kv[0], kv[1], enable_gqa=True)
        rows = slots_to_rows(
            o.transpose(1, 2).reshape(t, heads, k, d), p.row_map, p.x_sorted.shape[0]
        )
        return mixops.ops.unpermute(rows, p.row_map)

    chain()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = chain()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        ids.copy_(torch.stack([torch.randperm(e)[:k] for _ in range(t)]).int())
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, chain(), rtol=0, atol=0)


def test_deterministic_and_cpu_equal_on_cuda_shapes():
    """The same call twice gives the same bits (no atomics on data); on a GPU, CUDA's bits equal
    the CPU's for a shape with 16-byte units and many heads."""
    row_map, num_rows = routed(300, 4, 16, capacity=80)
    rows = data(num_rows, 8 * 64, torch.bfloat16)
    devices = ["cpu"] + (["cuda"] if HAS_CUDA else [])
    outs = []
    for dev in devices:
        for _ in range(2):
            s = rows_to_slots(rows.to(dev), row_map.to(dev), 8)
            outs.append((s.cpu(), slots_to_rows(s, row_map.to(dev), num_rows).cpu()))
    for s, r in outs[1:]:
        assert_bits_equal(s, outs[0][0], "slots")
        assert_bits_equal(r, outs[0][1], "rows")


# ---- extreme sizes (a subprocess: a crash fails this test, not the run) ------------------------

_EXTREMES = """
import torch, mixops
from mixops.ops import rows_to_slots, slots_to_rows
rm = torch.tensor([[2**31 - 2, -1], [0, 5]], dtype=torch.int32)
# rows_to_slots reads only the rows row_map names: expanded rows (one element of storage) of
# 2^31 + 7 .. 2^63 - 1 rows give the right result.
for n in (2**31 - 1, 2**31 + 7, 2**62, 2**63 - 1):
    for dev in ("cpu", "meta"):
        rows = torch.full((1, 1), 5.0, device=dev).expand(n, 1)
        s = rows_to_slots(rows, rm.to(dev))
        assert s.shape == (2, 1, 2, 1), (n, dev, s.shape)
        if dev == "cpu":
            assert s.view(-1).tolist() == [5.0, 0.0, 5.0, 5.0], (n, s)
try:
    rows_to_slots(torch.zeros(1, 1).expand(2**31 - 2, 1), rm)
    raise AssertionError("a row past num_rows was accepted")
except RuntimeError as e:
    assert "row_map values must be in [-1, num_rows = 2147483646)" in str(e), e
# slots_to_rows: empty rows of any count are a correct result; a byte count past 2^63 is
# torch's "overflowed" error on CPU and meta, never a wrapped size. (No CPU case that could
# really be allocated: with always-overcommit a 400 GB output would be mapped and zeroed.)
slots = torch.randn(2, 3, 2, 4)
for n in (2**31 + 7, 2**62, 2**63 - 1):
    for dev in ("cpu", "meta"):
        out = slots_to_rows(slots[..., :0].to(dev), rm.to(dev), n)
        assert out.shape == (n, 0), (n, dev, out.shape)
out = slots_to_rows(slots.to("meta"), rm.to("meta"), 2**31 + 7)  # sizes only on meta
assert out.shape == (2**31 + 7, 12), out.shape
for n in (2**62, 2**63 - 1):
    for dev in ("cpu", "meta"):
        try:
            slots_to_rows(slots.to(dev), rm.to(dev), n)
            raise AssertionError(f"{n} rows of 12 floats on {dev}")
        except RuntimeError as e:
            assert "overflow" in str(e), (n, dev, e)
print("ok")
"""


def test_extreme_sizes():
    run_script_ok(_EXTREMES)
