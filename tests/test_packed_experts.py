"""PackedExperts (nn/packed_experts.py): the packed layout's conversions to and from HF's
padded tensors, padding that must be zero, state-dict names, views per expert, meta-device init
with to_empty, the initialisation, deepcopy."""

import copy

import pytest
import torch

from mixops.nn import MoE
from mixops.nn.packed_experts import PackedExperts
from packed_reference import (  # noqa: F401  (impl_fixture: autouse)
    SIZES,
    H,
    T,
    check_against_loop,
    impl_fixture,
    make,
)


@pytest.mark.parametrize("gated", [True, False])
def test_padded_round_trip(gated):
    ex = PackedExperts(H, SIZES, gated, dtype=torch.float64)
    first, down = ex.to_padded()
    Fm = max(SIZES)
    assert first.shape == (len(SIZES), 2 * Fm if gated else Fm, H)
    assert down.shape == (len(SIZES), H, Fm)
    for e, f in enumerate(SIZES):
        w = ex.expert_weights(e)
        if gated:
            assert torch.equal(first[e, :f], w["gate_proj"])
            assert torch.equal(first[e, Fm : Fm + f], w["up_proj"])
            assert not first[e, f:Fm].any() and not first[e, Fm + f :].any()
        else:
            assert torch.equal(first[e, :f], w["up_proj"]) and not first[e, f:].any()
        assert torch.equal(down[e, :, :f], w["down_proj"]) and not down[e, :, f:].any()
    back = PackedExperts.from_padded(first, down, SIZES)
    assert back.gated == gated
    for a, b in zip(ex.parameters(), back.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(back.ffn_ends, ex.ffn_ends)
    # A checkpoint padded beyond the largest width converts too.
    wide = torch.nn.functional.pad(down, (0, 3))
    wfirst = first if not gated else torch.cat(
        [torch.nn.functional.pad(t, (0, 0, 0, 3)) for t in first.chunk(2, dim=1)], dim=1
    )  # fmt: skip
    again = PackedExperts.from_padded(wfirst if gated else torch.nn.functional.pad(
        first, (0, 0, 0, 3)), wide, SIZES)  # fmt: skip
    for a, b in zip(ex.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_from_padded_rejects_nonzero_padding():
    ex = PackedExperts(H, SIZES, dtype=torch.float64)
    first, down = ex.to_padded()
    Fm = max(SIZES)
    bad = first.clone()
    bad[1, Fm + 3, 0] = 1.0  # expert 1's up padding
    with pytest.raises(ValueError, match=r"expert 1 \(ffn_sizes\[1\] = 1\) has non-zero up rows"):
        PackedExperts.from_padded(bad, down, SIZES)
    bad = first.clone()
    bad[3, 7] = 0.5  # expert 3's gate padding
    with pytest.raises(ValueError, match=r"expert 3 .* non-zero gate rows"):
        PackedExperts.from_padded(bad, down, SIZES)
    bad = down.clone()
    bad[0, 2, 10] = 1e-30
    with pytest.raises(ValueError, match=r"expert 0 .* non-zero down columns"):
        PackedExperts.from_padded(first, bad, SIZES)
    with pytest.raises(ValueError, match="exceed the padded width"):
        PackedExperts.from_padded(first, down, [*SIZES[:-1], Fm + 1])
    with pytest.raises(ValueError, match="do not fit 4 experts"):
        PackedExperts.from_padded(first, down, SIZES[:4])
    with pytest.raises(ValueError, match="must be 3-D"):
        PackedExperts.from_padded(first[0], down, SIZES)
    with pytest.raises(ValueError, match="2\\*F \\(gated\\) or F"):
        PackedExperts.from_padded(first[:, :-1], down, SIZES)


def test_state_dict_names_and_shapes():
    moe, _ = make(dict(ffn_sizes=SIZES, shared_ffn_size=8))
    S = sum(SIZES)
    sd = moe.state_dict()
    assert sd["experts.gate_up_proj"].shape == (2 * S, H)
    assert sd["experts.down_proj"].shape == (H, S)
    assert not any("ffn_ends" in k for k in sd)
    assert set(sd) >= {"gate.weight", "shared_experts.up_proj.weight"}
    moe2, _ = make(dict(ffn_sizes=SIZES, shared_ffn_size=8))
    moe2.load_state_dict(sd)
    x = torch.randn(T, H, dtype=torch.float64)
    assert torch.equal(moe(x), moe2(x))
    ungated, _ = make(dict(ffn_sizes=SIZES, activation="relu"))
    assert ungated.state_dict()["experts.up_proj"].shape == (S, H)
    assert "ffn=[8, 1, 24, 5, 16]" in repr(moe) and "ffn_sizes=[8, 1, 24, 5, 16]" in repr(moe)


def test_expert_weights_are_views():
    ex = PackedExperts(H, SIZES, dtype=torch.float64)
    w = ex.expert_weights(-1)
    assert w["gate_proj"].shape == (16, H) and w["down_proj"].shape == (H, 16)
    with torch.no_grad():
        w["up_proj"].fill_(3.0)
    S = sum(SIZES)
    assert (ex.gate_up_proj[2 * (S - 16) + 1 :: 2] == 3).all()
    assert not (ex.gate_up_proj[2 * (S - 16) :: 2] == 3).any()
    with pytest.raises(IndexError):
        ex.expert_weights(5)


def test_meta_init_to_empty_reset_parameters():
    moe = MoE(H, num_experts=5, top_k=2, ffn_sizes=SIZES, device="meta", dtype=torch.float64)
    assert moe.experts.ffn_ends.is_meta
    moe.to_empty(device="cpu")
    # The ends are valid right after to_empty (before reset_parameters / load_state_dict).
    expect = torch.tensor(SIZES).cumsum(0).to(torch.int32)
    assert torch.equal(moe.experts.ffn_ends, torch.stack([2 * expect, expect]))
    torch.manual_seed(5)
    moe.reset_parameters()
    assert torch.equal(moe.experts.ffn_ends, torch.stack([2 * expect, expect]))
    torch.manual_seed(5)  # the constructor's initialisation, draw for draw
    fresh = MoE(H, num_experts=5, top_k=2, ffn_sizes=SIZES, dtype=torch.float64)
    for name, t in fresh.state_dict().items():
        assert torch.equal(moe.state_dict()[name], t), name
    check_against_loop(
        moe, dict(hidden_size=H, top_k=2, ffn_sizes=SIZES), torch.randn(T, H).double()
    )


def test_reset_parameters_std_per_expert():
    ex = PackedExperts(256, [64, 1024], dtype=torch.float64)
    assert abs(ex.gate_up_proj.std().item() - 256**-0.5) < 0.02 * 256**-0.5
    for e, f in enumerate([64, 1024]):
        std = ex.expert_weights(e)["down_proj"].std().item()
        assert abs(std - f**-0.5) < 0.05 * f**-0.5, (e, std)


def test_deepcopy():
    moe, cfg = make(dict(ffn_sizes=SIZES))
    x = torch.randn(T, H, dtype=torch.float64)
    twin = copy.deepcopy(moe)
    assert torch.equal(twin(x), moe(x))
    with torch.no_grad():
        twin.experts.down_proj.zero_()
    assert moe.experts.down_proj.any()
    assert twin.experts.ffn_ends.data_ptr() != moe.experts.ffn_ends.data_ptr()
