"""The references of the tests of experts of different widths (test_moe_ffn_sizes.py,
test_packed_experts.py): ``gmp_reference``, a plain-PyTorch per-group loop with the signature of
``mixops.ops.grouped_mm_packed`` (registered as a custom op with a fake and the op's autograd
table, so torch.compile traces it), the ``impl`` fixture that runs each test on it and on the op,
and ``loop_forward``, the layer's output from the definition: each expert its own dense MLP of
width F_e on the rows that chose it."""

import copy

import pytest
import torch
from torch import Tensor

import mixops
import mixops.ops
import moe_reference as ref
from mixops.nn import MoE

H, T = 16, 29
SIZES = [8, 1, 24, 5, 16]  # a width-1 expert, odd widths, one above the others


# -- operands of grouped_mm_packed's tests ---------------------------------------------------
def packed_shapes(mode, fixed, width, total, ragged):
    """(a's shape, b's shape) in ``mode``: ``ragged`` the grouped dimension's size, ``width`` /
    ``total`` the padded / packed sizes, ``fixed`` the GEMM's remaining dimension."""
    return {
        "mn": ((ragged, fixed), (fixed, total)),
        "mk": ((ragged, width), (total, fixed)),
        "km": ((width, ragged), (ragged, fixed)),
        "kn": ((fixed, ragged), (ragged, width)),
    }[mode]


def layout_randn(shape, layout, dtype, device="cpu"):
    """Random values of ``shape``, row-major ("row") or as the transposed view of a row-major
    tensor ("col")."""
    if layout == "row":
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.randn(shape[::-1], dtype=dtype, device=device).t()


# -- the reference op -------------------------------------------------------------------------
def _groups(offsets, ends):
    o, e = [0, *offsets.tolist()], [0, *ends.tolist()]
    return [(o[g], o[g + 1], e[g], e[g + 1] - e[g]) for g in range(len(offsets))]


@torch.library.custom_op("mixops_test::gmp_reference", mutates_args=())
def gmp_reference(
    a: Tensor, b: Tensor, offsets: Tensor, ends: Tensor, mode: str, width: int, total: int
) -> Tensor:
    """grouped_mm_packed from its table (python/mixops/ops/grouped_mm_packed.py), one matmul per
    group, zeros where no group writes."""
    out = a.new_zeros(_out_shape(a, b, mode, width, total))
    for r0, r1, p, w in _groups(offsets, ends):
        if mode == "mn":
            out[r0:r1, :w] = a[r0:r1] @ b[:, p : p + w]
        elif mode == "mk":
            out[r0:r1] = a[r0:r1, :w] @ b[p : p + w]
        elif mode == "km":
            out[p : p + w] = a[:w, r0:r1] @ b[r0:r1]
        else:
            out[:, p : p + w] = a[:, r0:r1] @ b[r0:r1, :w]
    return out


def _out_shape(a, b, mode, width, total):
    return {
        "mn": (a.shape[0], width),
        "mk": (a.shape[0], b.shape[1]),
        "km": (total, b.shape[1]),
        "kn": (a.shape[0], total),
    }[mode]


@gmp_reference.register_fake
def _(a, b, offsets, ends, mode, width, total):
    return a.new_empty(_out_shape(a, b, mode, width, total))


def _setup(ctx, inputs, output):
    a, b, offsets, ends, mode, width, total = inputs
    ctx.save_for_backward(a, b, offsets, ends)
    ctx.mode, ctx.width, ctx.total = mode, width, total


def _backward(ctx, g):
    a, b, off, ends = ctx.saved_tensors

    def gmp(x, y, mode):
        return gmp_reference(x, y, off, ends, mode, ctx.width, ctx.total)

    m = ctx.mode
    if m == "mn":
        da, db = gmp(g, b.t(), "mk"), gmp(a.t(), g, "kn")
    elif m == "mk":
        da, db = gmp(g, b.t(), "mn"), gmp(a.t(), g, "km")
    elif m == "km":
        da, db = gmp(b, g.t(), "mn").t(), gmp(a.t(), g, "mk")
    else:
        da, db = gmp(b, g.t(), "mk").t(), gmp(a.t(), g, "mn")
    return da, db, None, None, None, None, None


gmp_reference.register_autograd(_backward, setup_context=_setup)

HAS_OP = hasattr(torch.ops.mixops, "grouped_mm_packed") and hasattr(mixops.ops, "grouped_mm_packed")


@pytest.fixture(
    name="impl",
    autouse=True,
    params=["reference", pytest.param("op", marks=pytest.mark.skipif(not HAS_OP, reason="no op"))],
)
def impl_fixture(request, monkeypatch):
    """Each test on the reference op (patched in) and on mixops.ops.grouped_mm_packed."""
    if request.param == "reference":
        monkeypatch.setattr(mixops.ops, "grouped_mm_packed", gmp_reference, raising=False)
    return request.param


# -- the per-expert loop ----------------------------------------------------------------------
def experts_of(params, sizes, gated):
    """Expert e's (gate, up, down) [F_e, H], [F_e, H], [H, F_e] from the packed parameters, as the
    layout defines them (gate/up rows interleaved per expert)."""
    out, p = [], 0
    for f in sizes:
        if gated:
            rows = params["experts.gate_up_proj"][2 * p : 2 * p + 2 * f]
            gate, up = rows[0::2], rows[1::2]
        else:
            gate, up = None, params["experts.up_proj"][p : p + f]
        out.append((gate, up, params["experts.down_proj"][:, p : p + f]))
        p += f
    return out


def loop_forward(params, x, cfg, moe):
    """The layer's output from the definition: routing as moe_reference defines it, then each
    computing expert its own MLP of width F_e on the rows that chose it (capacity drops, zero and
    shared experts as there)."""
    cfg = ref.full_config(**cfg)
    x2 = x.reshape(-1, H)
    E = len(cfg["ffn_sizes"])
    logits = ref.router_logits(params["gate.weight"], x2, False)
    bias = moe.gate.e_score_correction_bias if cfg["selection_bias"] else None
    ids = ref.select_experts(logits, dict(cfg, num_experts=E), bias)
    w = ref.expert_weights(logits, ids, cfg)
    cap = ref.capacity_of(dict(cfg, num_experts=E), x2.shape[0])
    keep = ref.capacity_keep(ids, ref.num_choices(dict(cfg, num_experts=E)), cap)
    keep = keep | (ids >= E)
    y = torch.zeros_like(x2)
    experts = experts_of(params, cfg["ffn_sizes"], cfg["activation"] in ref.GATED_ACTS)
    for e, (gate, up, down) in enumerate(experts):
        tok, j = ((ids == e) & keep).nonzero(as_tuple=True)
        if tok.numel():
            o = ref.mlp(x2[tok], gate, up, down, cfg["activation"])
            y = y.index_add(0, tok, o * w[tok, j, None])
    for z, kind in enumerate(ref.zero_kinds(cfg)):
        tok, j = (ids == E + z).nonzero(as_tuple=True)
        if kind == "identity" and tok.numel():
            y = y.index_add(0, tok, x2[tok] * w[tok, j, None])
    if cfg["shared_ffn_size"]:
        y = y + ref.shared_forward(params, x2, cfg)
    return y.reshape(x.shape), ids


def make(cfg, dtype=torch.float64):
    cfg = {"hidden_size": H, "top_k": 2, **cfg}
    return MoE(**cfg, dtype=dtype), cfg


def check_against_loop(moe, cfg, x):
    params = {n: p.detach().clone().requires_grad_() for n, p in moe.named_parameters()}
    xr = x.detach().clone().requires_grad_()
    y_ref, ids = loop_forward(params, xr, cfg, moe)
    xm = x.detach().clone().requires_grad_()
    y = moe(xm)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(xm.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(p.grad, params[n].grad, rtol=1e-10, atol=1e-12, msg=n)
    return ids


def _grad_experts(experts):
    """A copy of the PackedExperts holding its gradients as parameters."""
    g = copy.deepcopy(experts)
    with torch.no_grad():
        for n, p in g.named_parameters():
            p.copy_(getattr(experts, n).grad)
    return g
