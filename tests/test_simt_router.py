"""router_topk's CUDA kernels (csrc/routing/router_kernel.cuh, launched by the real router.cu) run
on the CPU under the SIMT harness (tests/simt, driver tests/simt/drivers/router.cpp), against the
CPU twin (torch.ops.mixops.router_topk / router_topk_backward on CPU tensors).

Every call runs under the four harness runs (forward / reversed / shuffled schedules, a different
poison byte for shared memory, the workspace and the outputs each time) and must give the same
bits in all of them. Then, against the CPU op:
  * ids and counts are bit-equal (the design: every selection decision goes through routing.h);
  * weights and lse are bit-equal too: both backends compute a row with the same det:: functions
    and sum it in det::canonical_sum's order (a warp's butterfly), and the harness runs that code
    on the host, so even fp64 (the platform exp / log) matches here;
  * score_sum is NOT bit-equal in general, by design: the CPU sums rows in order per 128-row chunk,
    the GPU per warp, then warps in order per block, then blocks in 16 strided slices; the order
    of the float additions differs whenever more than one block of rows contributes. It is held
    to tests/helpers.py's rule (twice the CPU op's own error against the same op in float64);
  * grad_logits uses the same rule: the backward's formulas (dot products, the softmax Jacobian)
    are arranged differently on the two backends and were never meant to agree in the last bit.
"""

import ctypes

import pytest
import torch

import mixops
from helpers import assert_close_to_ref
from simt_driver import call, load_driver, requires_cxx, run_all, runs_with

pytestmark = requires_cxx

DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}  # mixops::Dtype
SCORE_FN = {"none": 0, "softmax": 1, "sigmoid": 2, "relu": 3}  # mixops::ScoreFn
RULE = {"topk": 0, "top_p": 1, "cum_threshold": 2}  # mixops::Rule; relu: kPositive (below)
RULE_POSITIVE = 3  # what router_check sets with score_fn relu
GROUP_SCORE = {"top2_sum": 0, "max": 1}  # mixops::GroupScore
MODALITY_OUT_OF_RANGE, IDS_NOT_ELIGIBLE = 1, 2  # mixops::RouterError
SMEM_DEFAULT = 48 * 1024

_i, _i64, _d, _p = ctypes.c_int, ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
_RUN_ARGS = [_p, ctypes.c_char_p, _i]  # const SimtRun*, err, err_len
_SIGNATURES = {
    "simt_router_topk": [_i, _i64, _i, _i, _i, _i, _i, _d, _d, _i, _i, _i, _i, _i, _d]
    + [_p, _i64, _p, _p, _i, _p]
    + [_p] * 6
    + _RUN_ARGS,
    "simt_router_topk_backward": [_i, _i64, _i, _i, _i, _i, _i, _d, _d, _i]
    + [_p, _i64, _p, _i, _p, _p, _p, _p, _p, _p, _p]
    + _RUN_ARGS,
    "simt_router_plans": [_i, _i64, _i, _i, _i, _i, _i64, _p, _p],
}


def _lib():
    lib = load_driver("router")
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    lib.simt_router_plans.restype = None
    return lib


def _ptr(t):
    """Data pointer of a CPU tensor whose innermost stride is 1 (None for None)."""
    if t is None:
        return None
    assert t.device.type == "cpu" and (t.dim() == 0 or t.stride(-1) == 1 or t.numel() <= 1)
    return ctypes.c_void_p(t.data_ptr())


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


SM90_OPTIN = 232448  # the opt-in the default runs' device reports (simt_run.h)
SM80_OPTIN = 166912
# The harness runs every call goes through (None: simt_driver.RUNS); a test forcing a plan sets it.
_runs = [None]


def plans(dtype, num_tokens, num_experts, k, num_groups=1, num_modalities=1, max_smem=SM90_OPTIN):
    """router_kernel.cuh's fwd_plan and bwd_plan: dicts of vpt, warps, smem, num_blocks,
    global_stride (0: scratch in shared memory)."""
    fwd, bwd = torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
    _lib().simt_router_plans(
        DTYPE[dtype],
        ctypes.c_int64(num_tokens),
        num_experts,
        k,
        num_groups,
        num_modalities,
        ctypes.c_int64(max_smem),
        _ptr(fwd),
        _ptr(bwd),
    )
    keys = ("vpt", "warps", "smem", "num_blocks", "global_stride")
    return dict(zip(keys, fwd.tolist())), dict(zip(keys, bwd.tolist()))


def simt_router_topk(
    logits,
    k,
    *,
    score_fn="softmax",
    topk_then_score=False,
    renormalize=True,
    renorm_eps=0.0,
    scaling=1.0,
    bias=None,
    num_groups=1,
    groups_kept=1,
    group_score="top2_sum",
    modality=None,
    num_modalities=1,
    token_mask=None,
    rule="topk",
    threshold=0.0,
):
    """The CUDA forward under the four harness runs (same bits required); returns
    (weights, ids, counts, score_sum, lse, error_flag) with the op layer's (cuda.cpp) inputs (the
    options as router_check builds them: score_fn relu takes rule kPositive)."""
    num_tokens, num_experts = logits.shape
    acc = _acc(logits.dtype)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    bias = bias.to(acc).contiguous() if bias is not None else None
    modality = modality.contiguous() if modality is not None else None
    mask = token_mask.contiguous() if token_mask is not None else None
    fn = _lib().simt_router_topk

    def outputs():
        return [
            torch.empty(num_tokens, k, dtype=acc),
            torch.empty(num_tokens, k, dtype=torch.int32),
            torch.empty(num_experts, dtype=torch.int32),
            torch.empty(num_experts, dtype=acc),
            torch.empty(num_tokens, dtype=acc),
            torch.zeros(1, dtype=torch.int32),  # the op's zeroed error slot
        ]

    def launch(out, run):
        call(
            fn,
            DTYPE[logits.dtype],
            num_tokens,
            num_experts,
            k,
            SCORE_FN[score_fn],
            int(topk_then_score),
            int(renormalize),
            renorm_eps,
            scaling,
            num_groups,
            groups_kept,
            GROUP_SCORE[group_score],
            num_modalities,
            RULE_POSITIVE if score_fn == "relu" else RULE[rule],
            threshold,
            _ptr(logits),
            logits.stride(0),
            _ptr(bias),
            _ptr(modality),
            int(modality is not None and modality.dtype == torch.int64),
            _ptr(mask),
            *[_ptr(t) for t in out],
            run=run,
        )

    *result, flag = run_all(outputs, launch, runs=_runs[0])
    return result, flag.item()


def simt_router_topk_backward(
    grad_weights,
    grad_score_sum,
    grad_lse,
    logits,
    ids,
    score_fn,
    topk_then_score,
    renormalize,
    renorm_eps,
    scaling,
    modality,
    num_modalities,
    token_mask,
):
    """The CUDA backward under the four harness runs; the op's arguments, returns
    (grad_logits, error_flag)."""
    num_tokens, num_experts = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    c = [None if t is None else t.contiguous() for t in (grad_weights, grad_score_sum, grad_lse)]
    modality = modality.contiguous() if modality is not None else None
    mask = token_mask.contiguous() if token_mask is not None else None
    ids = ids.contiguous()
    fn = _lib().simt_router_topk_backward

    def outputs():
        return [
            torch.empty(num_tokens, num_experts, dtype=logits.dtype),
            torch.zeros(1, dtype=torch.int32),
        ]

    def launch(out, run):
        call(
            fn,
            DTYPE[logits.dtype],
            num_tokens,
            num_experts,
            ids.shape[1],
            SCORE_FN[score_fn],
            int(topk_then_score),
            int(renormalize),
            renorm_eps,
            scaling,
            num_modalities,
            _ptr(logits),
            logits.stride(0),
            _ptr(modality),
            int(modality is not None and modality.dtype == torch.int64),
            _ptr(mask),
            _ptr(ids),
            *[_ptr(t) for t in c],
            *[_ptr(t) for t in out],
            run=run,
        )

    grad, flag = run_all(outputs, launch, runs=_runs[0])
    return grad, flag.item()


# ---- comparisons ------------------------------------------------------------------------------


def assert_bits(ours, cpu, what):
    assert ours.shape == cpu.shape and ours.dtype == cpu.dtype, (
        f"{what}: {ours.dtype} {tuple(ours.shape)} vs CPU {cpu.dtype} {tuple(cpu.shape)}"
    )
    if ours.dtype.is_floating_point:
        # NaN is compared as a value, not as bits: x86 propagates an operand's NaN (sign and
        # payload depend on the operand order of each add / sub), CUDA returns one canonical NaN.
        # Every other value, -0.0 and the infinities included, must match bit for bit.
        assert torch.equal(ours.isnan(), cpu.isnan()), f"{what}: NaN positions differ from the CPU"
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[ours.element_size()]
        nan = torch.tensor(float("nan"), dtype=ours.dtype)
        a = torch.where(ours.isnan(), nan, ours).view(view)
        b = torch.where(cpu.isnan(), nan, cpu).view(view)
    else:
        a, b = ours, cpu
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(
            f"{what}: {len(bad)} elements differ from the CPU op's bits, first at {i}: "
            f"{ours[i].item()!r} vs {cpu[i].item()!r}"
        )


def assert_close_special(ours, ref_hi, lowp, what):
    """tests/helpers.py's rule on the finite elements; NaN and +-inf exactly where the CPU op has
    them."""
    assert torch.equal(ours.isnan(), lowp.isnan()), f"{what}: NaN positions differ from the CPU"
    inf = lowp.isinf()
    assert torch.equal(ours.isinf(), inf), f"{what}: inf positions differ from the CPU"
    assert torch.equal(ours[inf], lowp[inf]), f"{what}: inf signs differ from the CPU"
    fin = lowp.isfinite() & ref_hi.isfinite()
    assert_close_to_ref(ours[fin], ref_hi[fin], lowp[fin], what)


def _hi(kw):
    """Keyword tensors in float64 (the bias), for the float64 reference."""
    return {
        n: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
        for n, v in kw.items()
    }


def check_forward(logits, k, *, expect_flag=0, cpu_modality=None, **kw):
    """The CUDA forward on the harness against the CPU op (cpu_modality: what the CPU twin gets
    instead of a modality with out-of-range values, which it rejects)."""
    ours, flag = simt_router_topk(logits, k, **kw)
    cpu_kw = dict(kw, modality=cpu_modality) if cpu_modality is not None else kw
    cpu = mixops.ops.router_topk(logits, k, **cpu_kw)
    assert flag == expect_flag, f"error flag {flag}, expected {expect_flag}"
    for name, a, b in zip(("weights", "ids", "counts"), ours, cpu):
        assert_bits(a, b, name)
    assert_bits(ours[4], cpu.lse, "lse")
    ref = mixops.ops.router_topk(logits.double(), k, **_hi(cpu_kw)).score_sum
    assert_close_special(ours[3], ref, cpu.score_sum, "score_sum")
    return ours, cpu


def backward_args(logits, ids, grads, options, modality=None, num_modalities=1, token_mask=None):
    gw, gss, glse = grads
    return (gw, gss, glse, logits, ids, *options, modality, num_modalities, token_mask)


def check_backward(args, *, expect_flag=0):
    """The CUDA backward on the harness against the CPU op, by the tolerance rule."""
    ours, flag = simt_router_topk_backward(*args)
    assert flag == expect_flag, f"error flag {flag}, expected {expect_flag}"
    cpu = torch.ops.mixops.router_topk_backward(*args)
    hi = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    ref = torch.ops.mixops.router_topk_backward(*hi)
    assert ours.dtype == cpu.dtype and ours.shape == cpu.shape
    assert_close_special(ours, ref, cpu, "grad_logits")
    return ours, cpu


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(num_tokens, num_experts, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(num_tokens, num_experts, generator=gen(seed)) * scale).to(dtype)


# ---- forward: options --------------------------------------------------------------------------

# Every option combination on one shape (T = 37: five blocks of 8 warps, the last one short;
# E = 64: two values per lane; k = 6). groups: num_groups 8, groups_kept 3; modality: 2 groups.
OPTIONS = [
    dict(score_fn=s, topk_then_score=o, renormalize=r, bias=b, groups=g, modality=m)
    for s in ("softmax", "sigmoid", "none")
    for o in (False, True)
    for r in (False, True)
    for b in (False, True)
    for g in (None, "top2_sum", "max")
    for m in (False, True)
    if not (g and m)  # the op rejects the combination
]


def _option_kwargs(case, index, num_tokens, num_experts, num_groups=8, groups_kept=3):
    kw = dict(
        score_fn=case["score_fn"],
        topk_then_score=case["topk_then_score"],
        renormalize=case["renormalize"],
        # periods coprime with the grid's innermost 4 (groups x modality): every combination
        renorm_eps=1e-3 if case["renormalize"] and index % 5 in (0, 2) else 0.0,
        scaling=2.5 if index % 3 == 0 else 1.0,
    )
    if case["bias"]:
        kw["bias"] = torch.rand(num_experts, generator=gen(1)) - 0.5
    if case["groups"]:
        kw.update(num_groups=num_groups, groups_kept=groups_kept, group_score=case["groups"])
    if case["modality"]:
        m = torch.randint(0, 2, (num_tokens,), generator=gen(2), dtype=torch.int32)
        kw.update(modality=m, num_modalities=2)
    return kw


@pytest.mark.parametrize("index", range(len(OPTIONS)), ids=lambda i: str(OPTIONS[i]))
def test_forward_options(index):
    case = OPTIONS[index]
    kw = _option_kwargs(case, index, 37, 64)
    check_forward(randn(37, 64, seed=index), 6, **kw)


# ---- forward: shapes and the kernel's paths ----------------------------------------------------

# (T, E, k, dtype, what the launch plan must be: the path the case is there for)
SHAPES = [
    (0, 64, 4, torch.float32, dict(num_blocks=0)),  # only the statistics reduction runs
    (1, 1, 1, torch.float32, dict(vpt=1)),
    (1, 8, 1, torch.bfloat16, dict(vpt=1, num_blocks=1)),
    (33, 60, 4, torch.float32, dict(vpt=2, warps=8, num_blocks=5)),  # E % 32 != 0
    (7, 33, 33, torch.float16, dict(vpt=2)),  # k == E
    (9, 64, 40, torch.float32, dict(vpt=2)),  # k > 32: lanes write several ids
    (5, 96, 64, torch.float64, dict(vpt=4)),
    (11, 512, 8, torch.float32, dict(vpt=16)),  # the last register path
    (5, 513, 3, torch.float32, dict(vpt=0, warps=8)),  # generic: keys staged in shared memory
    (3, 600, 600, torch.float32, dict(vpt=0, warps=4)),  # generic, k == E
    (16, 1000, 8, torch.bfloat16, dict(vpt=0)),
    (64, 2048, 8, torch.float32, dict(vpt=0, warps=2)),  # fewer warps per block
    (64, 4096, 8, torch.float32, dict(vpt=0, warps=1)),  # one warp, > 48 KB (opt-in)
    (16, 4096, 4, torch.float64, dict(vpt=0, warps=1)),
    (300, 16, 2, torch.float32, dict(vpt=1, num_blocks=38)),  # > 16 blocks: strided reduction
    (1025, 4096, 1, torch.float32, dict(warps=1, num_blocks=513)),  # 2 rows per warp
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-E{s[1]}-k{s[2]}-{s[3]}")
@pytest.mark.parametrize("variant", ["softmax", "sigmoid_bias_tts"])
def test_forward_shapes(shape, variant):
    num_tokens, num_experts, k, dtype, plan = shape
    fwd, _ = plans(dtype, num_tokens, num_experts, k)
    assert {n: fwd[n] for n in plan} == plan, f"the case no longer takes its path: {fwd}"
    if plan.get("warps") == 1 and num_experts >= 4096:
        assert fwd["smem"] > SMEM_DEFAULT
    kw = {}
    if variant != "softmax":
        bias = torch.rand(num_experts, generator=gen(3)) - 0.5
        kw = dict(score_fn="sigmoid", bias=bias, topk_then_score=True, renorm_eps=1e-2)
    check_forward(randn(num_tokens, num_experts, dtype, seed=num_experts), k, **kw)


def test_forward_strided_rows():
    wide = randn(29, 80, seed=4)
    check_forward(wide[:, :70], 5, score_fn="sigmoid", bias=torch.randn(70, generator=gen(5)))


@pytest.fixture
def smem_optin():
    """Makes every harness run's device report this shared-memory opt-in (so the plans match
    across runs), e.g. small to drive the global-memory scratch with small shapes."""

    def use(bytes_):
        _runs[0] = runs_with(smem_optin=bytes_)

    yield use
    _runs[0] = None


@pytest.mark.parametrize(
    "num_tokens, num_experts, k, dtype, optin",
    [
        (4, 16384, 2, torch.float32, SM80_OPTIN),  # past sm_80's opt-in: the design's "any E"
        (37, 600, 6, torch.float32, 4096),
        (37, 64, 40, torch.float32, 1024),  # VPT would be 2: the global plan takes the generic path
        (9, 700, 8, torch.bfloat16, 4096),
        (5, 96, 3, torch.float64, 512),
    ],
)
def test_global_memory_scratch_past_the_shared_memory_opt_in(
    smem_optin, num_tokens, num_experts, k, dtype, optin
):
    fwd, bwd = plans(dtype, num_tokens, num_experts, k, max_smem=optin)
    assert fwd["global_stride"] > 0 and fwd["smem"] == 0 and fwd["vpt"] == 0
    smem_optin(optin)
    x = randn(num_tokens, num_experts, dtype, seed=num_experts)
    bias = (torch.rand(num_experts, generator=gen(7)) - 0.5).to(_acc(dtype))
    for kw in (dict(), dict(score_fn="sigmoid", bias=bias)):
        ours, _ = check_forward(x, k, **kw)
    grads = _grads((True, True, True), num_tokens, num_experts, k, _acc(dtype), 3)
    options = ("softmax", False, True, 0.0, 1.0)
    if bwd["global_stride"] > 0:
        check_backward(backward_args(x, ours[1], grads, options))


# ---- forward: values ---------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def special_logits(kind, num_tokens, num_experts, dtype, seed):
    x = randn(num_tokens, num_experts, seed=seed)
    g = gen(seed + 1)
    if kind == "ties":  # few distinct values: most keys tie, the lower id must win
        x = torch.randint(-2, 3, (num_tokens, num_experts), generator=g).float() * 0.5
    elif kind == "equal":
        x = torch.zeros(num_tokens, num_experts)
        x[1::2] = 3.0
    else:
        place = torch.rand(num_tokens, num_experts, generator=g) < 0.15
        value = {"nan": NAN, "+inf": INF, "-inf": -INF}.get(kind)
        if value is not None:
            x[place] = value
        else:  # mixed: every special value, and rows made of one
            x[place] = NAN
            x[torch.rand(num_tokens, num_experts, generator=g) < 0.1] = INF
            x[torch.rand(num_tokens, num_experts, generator=g) < 0.1] = -INF
            x[0] = NAN
            x[1] = -INF
            x[2] = INF
            x[3, ::3] = NAN
    return x.to(dtype)


VALUE_KINDS = ["nan", "+inf", "-inf", "mixed", "ties", "equal"]


@pytest.mark.parametrize("kind", VALUE_KINDS)
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("topk_then_score", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_special_values(kind, score_fn, topk_then_score, with_bias):
    """ids stay the CPU's (NaN ranks last, ties to the lower id); NaN weights where the CPU's are.
    E = 40 (two values per lane, the second mostly empty), k = 5."""
    x = special_logits(kind, 24, 40, torch.float32, seed=len(kind))
    kw = dict(score_fn=score_fn, topk_then_score=topk_then_score)
    if with_bias:  # bias values that keep ties tied
        kw["bias"] = torch.randint(0, 2, (40,), generator=gen(7)).float() * 0.25
    check_forward(x, 5, **kw)


@pytest.mark.parametrize("kind", ["mixed", "ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("num_experts, k", [(40, 5), (700, 35)], ids=["E40", "E700"])
def test_forward_special_values_dtypes(kind, dtype, num_experts, k):
    x = special_logits(kind, 12, num_experts, dtype, seed=k)
    check_forward(x, k, score_fn="sigmoid", bias=torch.zeros(num_experts))
    check_forward(x, k, num_groups=4, groups_kept=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
@pytest.mark.parametrize("topk_then_score", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_experts", [72, 700])
def test_forward_dtypes(dtype, score_fn, topk_then_score, with_bias, num_experts):
    """Every logits dtype (bf16 / fp16 randn has natural ties), registers and shared paths."""
    kw = dict(score_fn=score_fn, topk_then_score=topk_then_score)
    if with_bias:
        kw["bias"] = (torch.rand(num_experts, generator=gen(8)) - 0.5).to(dtype)
    num_tokens = 50 if num_experts < 512 else 10
    check_forward(randn(num_tokens, num_experts, dtype, seed=9, scale=2.0), 8, **kw)


# ---- forward: group-limited selection ----------------------------------------------------------

# (T, E, num_groups, groups_kept, k): group sizes 8, 32, 128 (generic path), 2 (more groups than
# lanes), 1 (a group's score is its only key)
GROUPS = [(33, 64, 8, 3, 6), (17, 256, 8, 3, 8), (9, 1024, 8, 3, 8), (20, 128, 64, 5, 4)]
GROUPS += [(20, 16, 16, 3, 3)]


@pytest.mark.parametrize("shape", GROUPS, ids=lambda s: "T{}-E{}-G{}-kept{}-k{}".format(*s))
@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
@pytest.mark.parametrize("style", ["softmax", "sigmoid_bias"])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_forward_groups(shape, group_score, style, kind):
    num_tokens, num_experts, num_groups, kept, k = shape
    x = (
        randn(num_tokens, num_experts, seed=num_experts)
        if kind == "randn"
        else special_logits("ties", num_tokens, num_experts, torch.float32, seed=num_groups)
    )
    kw = dict(num_groups=num_groups, groups_kept=kept, group_score=group_score)
    if style == "sigmoid_bias":  # DeepSeek-V3's router
        bias = torch.randint(-2, 3, (num_experts,), generator=gen(10)).float() * 0.125
        kw.update(score_fn="sigmoid", bias=bias, scaling=2.5)
    check_forward(x, k, **kw)


# ---- forward: modalities, bad modality values, token_mask --------------------------------------

MOD_CASES = [  # (E, num_modalities, k)
    (64, 2, 4),
    (96, 4, 3),  # 24 experts per modality: a lane's second value outside the group
    (1200, 2, 8),  # 600 per modality: the generic path
]


@pytest.mark.parametrize("case", MOD_CASES, ids=lambda c: "E{}-M{}-k{}".format(*c))
@pytest.mark.parametrize(
    "mod_dtype, bad",
    [(d, b) for d in (torch.int32, torch.int64) for b in (None, -1, "M", 2**31 - 1)]
    + [(torch.int64, 2**32)],
    ids=str,
)
def test_forward_modality(case, mod_dtype, bad):
    """Out-of-range modality values: error bit set, the row routed (and scored) as modality 0. The
    CPU twin raises on them instead, so the rows are compared with the CPU run on the clamped
    modality. 2^32 in int64 would read as 0 if truncated (and set no bit)."""
    num_experts, num_mod, k = case
    num_tokens = 21
    modality = torch.randint(0, num_mod, (num_tokens,), generator=gen(11)).to(mod_dtype)
    clamped = None
    if bad is not None:
        modality[[1, 2, 9]] = num_mod if bad == "M" else bad
        clamped = modality.clone()
        clamped[[1, 2, 9]] = 0
        with pytest.raises(RuntimeError, match="modality values must be in"):
            mixops.ops.router_topk(
                randn(num_tokens, num_experts), k, modality=modality, num_modalities=num_mod
            )
    mask = torch.rand(num_tokens, generator=gen(12)) < 0.7
    for kw in (
        dict(),
        dict(score_fn="sigmoid", bias=torch.randn(num_experts, generator=gen(13)), token_mask=mask),
    ):
        check_forward(
            randn(num_tokens, num_experts, seed=num_mod),
            k,
            modality=modality,
            num_modalities=num_mod,
            expect_flag=0 if bad is None else MODALITY_OUT_OF_RANGE,
            cpu_modality=clamped,
            **kw,
        )


@pytest.mark.parametrize("mask_kind", ["random", "none_true", "all_true", "first_only"])
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid", "none"])
def test_forward_token_mask(mask_kind, score_fn):
    """counts and score_sum only over unmasked tokens; weights, ids and lse for every row."""
    num_tokens = 45
    mask = {
        "random": torch.rand(num_tokens, generator=gen(14)) < 0.5,
        "none_true": torch.zeros(num_tokens, dtype=torch.bool),
        "all_true": torch.ones(num_tokens, dtype=torch.bool),
        "first_only": torch.arange(num_tokens) == 0,
    }[mask_kind]
    (_, _, counts, score_sum, _), _ = check_forward(
        randn(num_tokens, 48, seed=15), 4, score_fn=score_fn, token_mask=mask
    )
    assert counts.sum().item() == 4 * mask.sum().item()
    if mask_kind == "none_true":
        assert not score_sum.any()


# ---- backward ----------------------------------------------------------------------------------

GRADS = [(w, s, l) for w in (False, True) for s in (False, True) for l in (False, True)]


def _grads(which, num_tokens, num_experts, k, acc, seed):
    g = gen(seed)
    return (
        torch.randn(num_tokens, k, generator=g).to(acc) if which[0] else None,
        torch.randn(num_experts, generator=g).to(acc) if which[1] else None,
        torch.randn(num_tokens, generator=g).to(acc) if which[2] else None,
    )


@pytest.mark.parametrize("which", GRADS, ids=lambda w: "w{}-ss{}-lse{}".format(*map(int, w)))
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("topk_then_score", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
def test_backward_options(which, score_fn, topk_then_score, renormalize):
    """Each of the three incoming gradients optional (none at all: zeros). T = 21, E = 48, k = 5."""
    x = randn(21, 48, seed=16)
    options = (score_fn, topk_then_score, renormalize, 1e-3 if renormalize else 0.0, 1.5)
    ids = mixops.ops.router_topk(x, 5, score_fn=score_fn, topk_then_score=topk_then_score).ids
    grad, _ = check_backward(
        backward_args(x, ids, _grads(which, 21, 48, 5, torch.float32, 17), options)
    )
    if not any(which):
        assert not grad.any()


# (T, E, k, dtype, backward plan)
BWD_SHAPES = [
    (0, 64, 4, torch.float32, None),
    (1, 1, 1, torch.float32, dict(vpt=1)),
    (7, 33, 33, torch.bfloat16, dict(vpt=2)),
    (9, 64, 40, torch.float16, dict(vpt=2)),
    (16, 1000, 8, torch.float32, dict(vpt=0, warps=8)),
    (32, 4096, 8, torch.float32, dict(vpt=0, warps=2)),
    (16, 4096, 8, torch.float64, dict(vpt=0, warps=1)),
    (300, 16, 2, torch.float32, dict(vpt=1, num_blocks=38)),
]


@pytest.mark.parametrize("shape", BWD_SHAPES, ids=lambda s: f"T{s[0]}-E{s[1]}-k{s[2]}-{s[3]}")
@pytest.mark.parametrize(
    "score_fn, tts", [("softmax", False), ("sigmoid", False), ("softmax", True)]
)
def test_backward_shapes(shape, score_fn, tts):
    num_tokens, num_experts, k, dtype, plan = shape
    if plan is not None:
        _, bwd = plans(dtype, num_tokens, num_experts, k)
        assert {n: bwd[n] for n in plan} == plan, f"the case no longer takes its path: {bwd}"
    x = randn(num_tokens, num_experts, dtype, seed=18)
    ids = mixops.ops.router_topk(x, k, score_fn=score_fn, topk_then_score=tts).ids
    grads = _grads((True, True, True), num_tokens, num_experts, k, _acc(dtype), 19)
    check_backward(backward_args(x, ids, grads, (score_fn, tts, True, 0.0, 1.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("mod_dtype", [None, torch.int32, torch.int64])
def test_backward_dtypes_modality_mask(dtype, score_fn, mod_dtype):
    num_tokens, num_experts, k = 26, 72, 4
    x = randn(num_tokens, num_experts, dtype, seed=20, scale=2.0)
    mod_kw, mask = {}, torch.rand(num_tokens, generator=gen(21)) < 0.6
    if mod_dtype is not None:
        m = torch.randint(0, 3, (num_tokens,), generator=gen(22)).to(mod_dtype)
        mod_kw = dict(modality=m, num_modalities=3)
    ids = mixops.ops.router_topk(x, k, score_fn=score_fn, **mod_kw).ids
    grads = _grads((True, True, True), num_tokens, num_experts, k, _acc(dtype), 23)
    args = backward_args(
        x, ids, grads, (score_fn, False, True, 0.0, 2.0), token_mask=mask, **mod_kw
    )
    check_backward(args)


@pytest.mark.parametrize("mod_dtype", [torch.int32, torch.int64], ids=str)
def test_backward_bad_modality(mod_dtype):
    """Out-of-range modality values in the backward: error bit 1, the row taken as modality 0 (the
    CPU raises; compared with the CPU on the clamped modality)."""
    num_tokens, num_experts, k = 14, 60, 3
    x = randn(num_tokens, num_experts, seed=34)
    modality = torch.randint(0, 3, (num_tokens,), generator=gen(35)).to(mod_dtype)
    modality[[0, 5]] = torch.tensor([-7, 3], dtype=mod_dtype)
    clamped = modality.clone()
    clamped[[0, 5]] = 0
    ids = mixops.ops.router_topk(x, k, modality=clamped, num_modalities=3).ids
    grads = _grads((True, True, True), num_tokens, num_experts, k, torch.float32, 36)
    options = ("softmax", False, True, 0.0, 1.0)
    ours, flag = simt_router_topk_backward(*backward_args(x, ids, grads, options, modality, 3))
    assert flag == MODALITY_OUT_OF_RANGE
    with pytest.raises(RuntimeError, match="modality values must be in"):
        torch.ops.mixops.router_topk_backward(*backward_args(x, ids, grads, options, modality, 3))
    # The clamped run on the harness (flag 0) matches the CPU, and the bad run is that run.
    on_clamped, _ = check_backward(backward_args(x, ids, grads, options, clamped, 3))
    assert_bits(ours, on_clamped, "grad_logits with bad modality values vs clamped")


def test_backward_special_values():
    x = special_logits("mixed", 16, 40, torch.float32, seed=24)
    ids = mixops.ops.router_topk(x, 3).ids
    check_backward(
        backward_args(
            x,
            ids,
            _grads((True, True, True), 16, 40, 3, torch.float32, 25),
            ("softmax", False, True, 0.0, 1.0),
        )
    )


def test_backward_repeated_ids():
    """ids the forward never makes (a row naming one expert twice) are still valid input: the CPU
    accumulates both slots."""
    x = randn(10, 24, seed=26)
    ids = mixops.ops.router_topk(x, 4).ids
    ids[:, 1] = ids[:, 0]
    for options in (("softmax", False, True, 0.0, 1.0), ("sigmoid", True, False, 0.0, 3.0)):
        check_backward(
            backward_args(
                x, ids, _grads((True, False, True), 10, 24, 4, torch.float32, 27), options
            )
        )


@pytest.mark.parametrize("bad", ["other_modality", "negative", "past_E"])
@pytest.mark.parametrize(
    "score_fn, tts, renorm",
    [("softmax", False, False), ("sigmoid", False, True), ("softmax", True, True)],
)
def test_backward_ids_not_eligible(bad, score_fn, tts, renorm):
    """ids outside a row's eligible experts: error bit 2 (the CPU raises). Rows without a bad id
    match the CPU op; a bad row stays finite and zero outside its eligible experts, and where the
    slots do not interact (no renormalisation, score then top-k) the bad slot is ignored: the row
    equals the CPU's with that slot's gradient zeroed (any valid id in its place)."""
    num_tokens, num_experts, k, num_mod = 12, 64, 3, 2
    x = randn(num_tokens, num_experts, seed=28)
    modality = torch.randint(0, num_mod, (num_tokens,), generator=gen(29))
    ids = mixops.ops.router_topk(
        x, k, score_fn=score_fn, topk_then_score=tts, modality=modality, num_modalities=num_mod
    ).ids
    rows = torch.tensor([2, 7])
    good_ids = ids.clone()
    bad_value = {
        "other_modality": ((1 - modality[rows]) * 32 + 5).to(torch.int32),
        "negative": torch.full((2,), -1, dtype=torch.int32),
        "past_E": torch.full((2,), num_experts, dtype=torch.int32),
    }[bad]
    ids[rows, 1] = bad_value
    gw, gss, glse = _grads((True, True, True), num_tokens, num_experts, k, torch.float32, 30)
    options = (score_fn, tts, renorm, 0.0, 1.0)
    grad, flag = simt_router_topk_backward(gw, gss, glse, x, ids, *options, modality, num_mod, None)
    assert flag == IDS_NOT_ELIGIBLE
    with pytest.raises(RuntimeError, match="ids values must be in the token's eligible experts"):
        torch.ops.mixops.router_topk_backward(
            gw, gss, glse, x, ids, *options, modality, num_mod, None
        )
    good = torch.ones(num_tokens, dtype=torch.bool)
    good[rows] = False
    # The good rows alone through the CPU op (rows are independent, score_sum's gradient too).
    sub = (gw[good], gss, glse[good], x[good], ids[good], *options, modality[good], num_mod, None)
    cpu = torch.ops.mixops.router_topk_backward(*sub)
    ref = torch.ops.mixops.router_topk_backward(
        *[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in sub]
    )
    assert_close_special(grad[good], ref, cpu, "grad_logits of the rows without bad ids")
    assert grad[rows].isfinite().all()
    for r in rows.tolist():
        lo = int(modality[r]) * 32
        outside = torch.ones(num_experts, dtype=torch.bool)
        outside[lo : lo + 32] = False
        assert not grad[r, outside].any()
    if not renorm and not tts:
        gw0 = gw.clone()
        gw0[rows, 1] = 0.0
        args = (gw0, gss, glse, x, good_ids, *options, modality, num_mod, None)
        cpu = torch.ops.mixops.router_topk_backward(*args)
        ref = torch.ops.mixops.router_topk_backward(
            *[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        )
        assert_close_special(grad, ref, cpu, "grad_logits with the bad slots ignored")


# ---- rules: a variable number of experts per token (routing::kept_slots) ----------------------

# (rule, p): rule top_p / cum_threshold with threshold p, or score_fn relu (rule kPositive)
RULES = [(r, p) for r in ("top_p", "cum_threshold") for p in (0.0, 0.3, 0.5, 1.0, 2.0)]
RULES += [("relu", 0.0)]
RULE_SHAPES = [(e, k) for e in (8, 64, 300) for k in (1, 4, e)]  # (E, k)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def rule_kwargs(rule, p):
    return dict(score_fn="relu") if rule == "relu" else dict(rule=rule, threshold=p)


def rule_logits(num_tokens, num_experts, dtype, seed):
    """randn rows at temperatures from flat to peaked (top_p keeps 1 to all k), shifted so that
    some rows have no positive logit and some only positive ones (relu keeps 0 to all k)."""
    g = gen(seed)
    x = torch.randn(num_tokens, num_experts, generator=g)
    scale = torch.linspace(0.2, 8.0, num_tokens)[torch.randperm(num_tokens, generator=g)]
    shift = torch.linspace(-4.0, 2.5, num_tokens)[torch.randperm(num_tokens, generator=g)]
    return ((x + shift[:, None]) * scale[:, None]).to(dtype)


def check_rule_backward(x, ids, kw, seed, **token_kw):
    """The backward with the forward's ids (-1 in the slots a rule cleared: no gradient, no error
    flag), all three incoming gradients and then grad_weights alone (the kept slots' path)."""
    num_tokens, num_experts = x.shape
    k = ids.shape[1]
    options = (
        kw.get("score_fn", "softmax"),
        False,
        kw.get("renormalize", True),
        kw.get("renorm_eps", 0.0),
        kw.get("scaling", 1.0),
    )
    grads = _grads((True, True, True), num_tokens, num_experts, k, _acc(x.dtype), seed)
    check_backward(backward_args(x, ids, grads, options, **token_kw))
    check_backward(backward_args(x, ids, (grads[0], None, None), options, **token_kw))


@pytest.mark.parametrize("shape", RULE_SHAPES, ids=lambda s: "E{}-k{}".format(*s))
@pytest.mark.parametrize("rule, p", RULES, ids=lambda v: str(v))
def test_rules(rule, p, shape):
    """Forward bit-equal to the CPU op (kept prefix, cleared slots, weights finished over the kept
    ones, counts of the kept ones) and the backward by the tolerance rule, with the options rotated
    over the grid: dtype, renormalize (with / without renorm_eps), scaling, modality, token_mask."""
    num_experts, k = shape
    index = RULES.index((rule, p)) * len(RULE_SHAPES) + RULE_SHAPES.index(shape)
    num_tokens = 24 if k < 300 else 6  # k = 300: 300 warp rounds per row on the harness
    dtype = DTYPES[index % 4]
    kw = rule_kwargs(rule, p)
    kw.update(renormalize=index % 3 != 0, scaling=2.5 if index % 7 in (0, 2, 4) else 1.0)
    if kw["renormalize"] and index % 5 == 1:
        kw["renorm_eps"] = 1e-3
    token_kw = {}
    if index % 2 == 1 and 2 * k <= num_experts:
        m = torch.randint(0, 2, (num_tokens,), generator=gen(index), dtype=torch.int32)
        token_kw.update(modality=m, num_modalities=2)
    if (index // 2) % 2 == 1:
        token_kw["token_mask"] = torch.rand(num_tokens, generator=gen(index + 1)) < 0.6
    x = rule_logits(num_tokens, num_experts, dtype, seed=index)
    (weights, ids, counts, _, _), _ = check_forward(x, k, **kw, **token_kw)
    kept = (ids >= 0).sum(1)
    assert torch.equal(ids >= 0, torch.arange(k) < kept[:, None]), "kept slots not a prefix"
    assert not weights[ids < 0].any()
    mask = token_kw.get("token_mask")
    assert counts.sum().item() == (kept if mask is None else kept[mask]).sum().item()
    check_rule_backward(x, ids, kw, index, **token_kw)


def test_rules_keep_a_variable_number():
    """rule_logits gives the rule tests rows that keep 1, some and all k (relu: 0 too)."""
    x = rule_logits(24, 64, torch.float32, seed=0)
    for kw, least in ((dict(rule="top_p", threshold=0.5), 1), (dict(score_fn="relu"), 0)):
        (_, ids, _, _, _), _ = check_forward(x, 8, **kw)
        kept = set((ids >= 0).sum(1).tolist())
        assert {least, 8} <= kept and len(kept) >= 4, kept


@pytest.mark.parametrize("kind", ["mixed", "ties", "equal"])
@pytest.mark.parametrize("rule, p", RULES, ids=lambda v: str(v))
def test_rules_special_values(kind, rule, p):
    """NaN, +-inf and all-special rows (NaN prefix sums keep one slot, NaN is never > 0), ties at
    the threshold and between kept and cleared slots. E = 40, k = 5 or 40."""
    index = RULES.index((rule, p))
    k = 5 if index % 2 == 0 else 40
    dtype = (torch.float32, torch.bfloat16)[(index // 2) % 2]
    x = special_logits(kind, 16, 40, dtype, seed=index)
    kw = rule_kwargs(rule, p)
    kw.update(renormalize=kind != "ties", scaling=1.5)
    (_, ids, _, _, _), _ = check_forward(x, k, **kw)
    check_rule_backward(x, ids, kw, index)


def test_backward_cleared_slots_and_bad_ids():
    """A trailing -1 is a cleared slot (no error); a -1 before an id, or an id outside the row's
    experts before the trailing -1s, is not from this forward: error bit 2, that slot ignored."""
    x = rule_logits(12, 32, torch.float32, seed=40)
    ids = mixops.ops.router_topk(x, 6, score_fn="relu").ids
    assert (ids[:, 0] < 0).any() and (ids[:, -1] < 0).any() and (ids[:, -1] >= 0).any()
    gw, _, glse = _grads((True, False, True), 12, 32, 6, torch.float32, 41)
    options = ("relu", False, True, 0.0, 1.0)
    check_backward((gw, None, glse, x, ids, *options, None, 1, None))
    row = int((ids >= 0).sum(1).argmax())  # a row keeping the most slots
    for j, value in ((0, -1), (1, 32), (1, -2)):
        bad = ids.clone()
        bad[row, j] = value
        _, flag = simt_router_topk_backward(gw, None, glse, x, bad, *options, None, 1, None)
        assert flag == IDS_NOT_ELIGIBLE, (j, value)
        with pytest.raises(RuntimeError, match="or -1 in the slots after them"):
            torch.ops.mixops.router_topk_backward(gw, None, glse, x, bad, *options, None, 1, None)


# ---- bigger grids (pytest -m large) ------------------------------------------------------------


@pytest.mark.large
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("index", range(0, len(OPTIONS), 3), ids=lambda i: str(OPTIONS[i]))
@pytest.mark.parametrize("shape", [(203, 100, 7, 4, 2), (70, 640, 20, 8, 3)], ids=str)
def test_large_forward_options_dtypes(dtype, index, shape):
    num_tokens, num_experts, k, num_groups, kept = shape
    kw = _option_kwargs(OPTIONS[index], index, num_tokens, num_experts, num_groups, kept)
    check_forward(randn(num_tokens, num_experts, dtype, seed=index), k, **kw)


@pytest.mark.large
@pytest.mark.parametrize(
    "shape",
    [
        (8193, 64, 6, torch.float32, dict(warps=8, num_blocks=513)),  # 2 rows per warp
        (2000, 256, 8, torch.bfloat16, dict(vpt=8, num_blocks=250)),
        (256, 8192, 8, torch.float32, dict(vpt=0, warps=1)),
        (64, 12288, 4, torch.float32, dict(vpt=0, warps=1)),  # near sm_80's opt-in limit
        (128, 4096, 64, torch.float64, dict(vpt=0, warps=1)),
    ],
    ids=lambda s: f"T{s[0]}-E{s[1]}-k{s[2]}-{s[3]}",
)
def test_large_shapes(shape):
    num_tokens, num_experts, k, dtype, plan = shape
    fwd, _ = plans(dtype, num_tokens, num_experts, k)
    assert {n: fwd[n] for n in plan} == plan, f"the case no longer takes its path: {fwd}"
    x = randn(num_tokens, num_experts, dtype, seed=31)
    mask = torch.rand(num_tokens, generator=gen(32)) < 0.8
    check_forward(x, k, token_mask=mask)
    ids = mixops.ops.router_topk(x, k).ids
    grads = _grads((True, True, True), num_tokens, num_experts, k, _acc(dtype), 33)
    check_backward(
        backward_args(x, ids, grads, ("softmax", False, True, 0.0, 1.0), token_mask=mask)
    )
