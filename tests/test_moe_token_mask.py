"""The per-token arguments of MoE (``token_mask``, ``modality``) and MoA (``token_mask``): their
shape must be the input's leading dims ``[batch, seq]`` or flat ``[tokens]``; anything else (a
transposed ``[seq, batch]`` mask has the right element count) is an error naming the argument, the
expected and the given shape. A well-shaped mask does what it says: the losses and the load over the masked
input equal those of the layer run on the kept tokens alone (token-choice routing is per token)."""

import pytest
import torch

from mixops.nn import MoA, MoE

H, FFN, E, K = 16, 8, 4, 2
B, S = 2, 5


def _moe(**kw):
    torch.manual_seed(0)
    return MoE(H, FFN, E, K, aux_loss_coef=0.01, z_loss_coef=0.001, dtype=torch.float64, **kw)


def _mask():
    m = torch.ones(B, S, dtype=torch.bool)
    m[0, :2] = False  # left padding in the first sequence
    return m


def _x(*lead):
    return torch.randn(*lead, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


BAD_MOE = {  # name: (x's leading shape, keyword, the bad tensor, the message)
    "transposed mask [S, B]": (
        (B, S),
        "token_mask",
        torch.ones(S, B, dtype=torch.bool),
        r"MoE: token_mask must be \[2, 5\] \(x's leading dims\) or \[10\], got shape \[5, 2\]",
    ),
    "mask with a trailing 1": (
        (B, S),
        "token_mask",
        torch.ones(B, S, 1, dtype=torch.bool),
        r"token_mask must be \[2, 5\] .* or \[10\], got shape \[2, 5, 1\]",
    ),
    "mask of another batch": (
        (B, S),
        "token_mask",
        torch.ones(B + 1, S, dtype=torch.long),
        r"token_mask must be \[2, 5\] .* or \[10\], got shape \[3, 5\]",
    ),
    "2-D mask for flat tokens": (
        (B * S,),
        "token_mask",
        torch.ones(B, S, dtype=torch.bool),
        r"token_mask must be \[10\] \(x's leading dims\), got shape \[2, 5\]",
    ),
    "transposed modality [S, B]": (
        (B, S),
        "modality",
        torch.zeros(S, B, dtype=torch.long),
        r"MoE: modality must be \[2, 5\] \(x's leading dims\) or \[10\], got shape \[5, 2\]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MOE))
def test_moe_per_token_arguments_of_the_wrong_shape_raise(case):
    lead, name, bad, msg = BAD_MOE[case]
    m = _moe(num_modalities=2) if name == "modality" else _moe()
    with pytest.raises(ValueError, match=msg):
        m(_x(*lead), **{name: bad})


@pytest.mark.parametrize("shape", ["batch_seq", "flat"])
def test_moe_mask_counts_exactly_the_kept_tokens(shape):
    m = _moe(selection_bias=True, score_fn="sigmoid").train()
    x, mask = _x(B, S), _mask()
    y = m(x, token_mask=mask if shape == "batch_seq" else mask.reshape(-1))
    aux, load = m.aux_loss.detach(), m.tokens_per_expert.clone()
    m.tokens_per_expert.zero_()
    y_kept = m(x[mask])  # only the kept tokens, no mask
    torch.testing.assert_close(aux, m.aux_loss.detach(), rtol=1e-12, atol=0)
    assert torch.equal(load, m.tokens_per_expert)
    torch.testing.assert_close(y[mask], y_kept, rtol=1e-12, atol=1e-12)


def _moa():
    torch.manual_seed(0)
    return MoA(H, 4, 2, 4, 2, aux_loss_coef=0.01, dtype=torch.float64)


@pytest.mark.parametrize(
    "bad, msg",
    [
        (torch.ones(S, B, dtype=torch.bool), r"\[2, 5\] .* or \[10\], got shape \[5, 2\]"),
        (torch.ones(B, S - 1, dtype=torch.bool), r"\[2, 5\] .* or \[10\], got shape \[2, 4\]"),
    ],
    ids=["transposed", "short"],
)
def test_moa_token_mask_of_the_wrong_shape_raises(bad, msg):
    with pytest.raises(ValueError, match=r"MoA: token_mask must be " + msg):
        _moa()(_x(B, S), token_mask=bad)


def test_moa_token_mask_flat_or_batch_seq_give_the_same_loss():
    m, x, mask = _moa(), _x(B, S), _mask()
    m(x, token_mask=mask)
    a = m.aux_loss.detach()
    m(x, token_mask=mask.reshape(-1))
    torch.testing.assert_close(m.aux_loss.detach(), a, rtol=0, atol=0)
