"""grouped_mm_packed bad input: a clear RuntimeError naming the argument, never a crash; the fake
(meta) raises the CPU op's message to the letter."""

import pytest
import torch

import mixops  # noqa: F401
from mixops.ops import grouped_mm_packed

I32 = torch.int32

# A valid call per mode: offsets [2, 4, 6] over the ragged size 6, ends [3, 3, 5] (widths 3, 0,
# 2) over total = 7, width = 4.
WIDTH, TOTAL = 4, 7
SHAPES = {
    "mn": ((6, 5), (5, TOTAL)),
    "mk": ((6, WIDTH), (TOTAL, 5)),
    "km": ((WIDTH, 6), (6, 5)),
    "kn": ((5, 6), (6, WIDTH)),
}


def ok(mode, device="cpu"):
    sa, sb = SHAPES[mode]
    return dict(
        a=torch.randn(sa, device=device),
        b=torch.randn(sb, device=device),
        offsets=torch.tensor([2, 4, 6], dtype=I32, device=device),
        ends=torch.tensor([3, 3, 5], dtype=I32, device=device),
        mode=mode,
        width=WIDTH,
        total=TOTAL,
    )


def call(kw):
    return grouped_mm_packed(**kw)


def _mk(**changes):
    return lambda kw: {**kw, **{k: (v(kw) if callable(v) else v) for k, v in changes.items()}}


# (change, message) for every mode: metadata checks in check.cpp's order.
COMMON = [
    (_mk(mode="nm"), "mode must be one of 'mn', 'mk', 'km', 'kn', got 'nm'"),
    (_mk(mode="MN"), "mode must be one of"),
    (_mk(a=lambda kw: kw["a"][0]), "a must be 2-D .* got a 1-D tensor"),
    (_mk(a=lambda kw: kw["a"][None]), "a must be 2-D .* got a 3-D tensor"),
    (_mk(b=lambda kw: kw["b"][0]), "b must be 2-D .* got a 1-D tensor"),
    (_mk(b=lambda kw: kw["b"][None]), "b must be 2-D .* got a 3-D tensor"),
    (_mk(b=lambda kw: kw["b"].half()), "a and b must have the same dtype, got a Float and b Half"),
    (
        _mk(a=lambda kw: kw["a"].int(), b=lambda kw: kw["b"].int()),
        "a must be float32, bfloat16, float16 or float64, got Int",
    ),
    (_mk(offsets=lambda kw: kw["offsets"].long()), "offsets must be int32, got Long"),
    (_mk(offsets=lambda kw: kw["offsets"].float()), "offsets must be int32, got Float"),
    (_mk(offsets=lambda kw: kw["offsets"].view(3, 1)), "offsets must be 1-D \\[num_experts\\]"),
    (_mk(ends=lambda kw: kw["ends"].long()), "ends must be int32, got Long"),
    (_mk(ends=lambda kw: kw["ends"].view(1, 3)), "ends must be 1-D \\[num_experts\\]"),
    (_mk(ends=lambda kw: kw["ends"][:2]), "ends must have the length of offsets .*= 3\\), got 2"),
    (_mk(offsets=lambda kw: kw["offsets"][:2]), "ends must have the length of offsets"),
    (_mk(width=-1), "width must be >= 0, got -1"),
    (_mk(total=-2), "total must be >= 0, got -2"),
]

# Each shape equality of each mode.
SHAPE_CASES = [
    ("mn", _mk(b=torch.randn(4, TOTAL)), "mode 'mn': b.size\\(0\\) must equal a.size\\(1\\) = 5"),
    ("mn", _mk(total=TOTAL + 1), "mode 'mn': b.size\\(1\\) must equal total = 8, got 7"),
    ("mk", _mk(width=WIDTH + 1), "mode 'mk': a.size\\(1\\) must equal width = 5, got 4"),
    ("mk", _mk(b=torch.randn(TOTAL - 1, 5)), "mode 'mk': b.size\\(0\\) must equal total = 7"),
    ("km", _mk(width=WIDTH + 2), "mode 'km': a.size\\(0\\) must equal width = 6, got 4"),
    ("km", _mk(b=torch.randn(5, 5)), "mode 'km': b.size\\(0\\) must equal a.size\\(1\\) = 6"),
    ("kn", _mk(b=torch.randn(7, WIDTH)), "mode 'kn': b.size\\(0\\) must equal a.size\\(1\\) = 6"),
    ("kn", _mk(width=3), "mode 'kn': b.size\\(1\\) must equal width = 3, got 4"),
]

# Index values, checked on the host for CPU tensors.
VALUE_CASES = [
    (_mk(offsets=torch.tensor([2, -1, 6], dtype=I32)), "offsets must be non-negative"),
    (_mk(offsets=torch.tensor([4, 2, 6], dtype=I32)), "offsets must be non-decreasing"),
    (_mk(offsets=torch.tensor([2, 4, 7], dtype=I32)), "offsets must be <= a.size\\(.\\) = 6"),
    (_mk(ends=torch.tensor([3, -3, 5], dtype=I32)), "invalid ends: ends must be non-negative"),
    (_mk(ends=torch.tensor([3, 2, 5], dtype=I32)), "ends must be non-decreasing, got ends\\[1\\]"),
    (_mk(ends=torch.tensor([3, 3, 8], dtype=I32)), "ends must be <= total = 7 \\(ends past"),
    (_mk(ends=torch.tensor([0, 5, 5], dtype=I32)), "must be <= width = 4, got 5 for group 1"),
    (_mk(ends=torch.tensor([5, 5, 5], dtype=I32)), "must be <= width = 4, got 5 for group 0"),
]

ALL = (
    [(m, c, s) for m in SHAPES for c, s in COMMON]
    + SHAPE_CASES
    + [(m, c, s) for m in SHAPES for c, s in VALUE_CASES]
)


def _ids(cases):
    return [f"{m}-{i}" for i, (m, _, _) in enumerate(cases)]


@pytest.mark.parametrize("mode, change, match", ALL, ids=_ids(ALL))
def test_bad_input(mode, change, match):
    kw = change(ok(mode))
    with pytest.raises(RuntimeError, match="grouped_mm_packed: .*" + match):
        call(kw)


def test_offsets_messages_name_the_ragged_dimension():
    bad = torch.tensor([2, 4, 9], dtype=I32)
    for mode, dim in [("mn", 0), ("mk", 0), ("km", 1), ("kn", 1)]:
        with pytest.raises(RuntimeError, match=f"offsets must be <= a.size\\({dim}\\) = 6"):
            call({**ok(mode), "offsets": bad})


def test_valid_calls_pass():
    for mode in SHAPES:
        call(ok(mode))


def _to_meta(kw):
    return {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.parametrize(
    "mode, change, match", [c for c in ALL if c[1] not in [v for v, _ in VALUE_CASES]]
)
def test_fake_raises_the_cpu_message(mode, change, match):
    """The Python mirror of check.cpp (the fake) raises the same message to the letter."""
    kw = change(ok(mode))
    with pytest.raises(RuntimeError) as cpu:
        call(kw)
    with pytest.raises(RuntimeError) as meta:
        call(_to_meta(kw))
    assert str(meta.value).startswith(str(cpu.value).split("\n")[0]), (cpu.value, meta.value)


@pytest.mark.parametrize("mode", list(SHAPES))
def test_fake_shape(mode):
    kw = ok(mode)
    out = call(kw)
    assert call(_to_meta(kw)).shape == out.shape


@pytest.mark.parametrize("which", ["b", "offsets", "ends"])
def test_another_device(which):
    kw = ok("mn")
    target = "cuda" if torch.cuda.is_available() else "meta"
    kw[which] = kw[which].to(target)
    msg = {
        "b": "a and b must be on the same device",
        "offsets": "offsets must be on the same device as a",
        "ends": "ends must be on the same device as a",
    }[which]
    with pytest.raises(RuntimeError, match=msg):
        call(kw)
