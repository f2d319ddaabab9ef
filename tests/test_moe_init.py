"""mixops.nn.MoE built on the meta device and materialised (to_empty + reset_parameters, the
FSDP2 / empty-weights path): every parameter and buffer is initialised as the constructor does,
the load counter and the selection bias start at zero, whatever memory to_empty handed out."""

import pytest
import torch

from mixops.nn import MoE

H, FFN, E = 32, 24, 8


@pytest.fixture
def garbage_memory(monkeypatch):
    """Module.to_empty allocates with torch.empty_like: make that memory hold garbage (NaN, 77)
    every time, as recycled memory may, so that nothing can pass by luck."""
    real = torch.empty_like

    def empty_like(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        if out.device.type != "meta":
            out.fill_(float("nan") if out.is_floating_point() else 77)
        return out

    monkeypatch.setattr(torch, "empty_like", empty_like)


@pytest.mark.parametrize(
    "kw",
    [
        dict(selection_bias=True, shared_ffn_size=16, shared_expert_gate=True),
        dict(activation="gelu", selection_bias=True, shared_ffn_size=16),
        dict(),
    ],
    ids=["gated-bias-shared", "plain-bias-shared", "bare"],
)
def test_meta_to_empty_reset_parameters(garbage_memory, kw):
    with torch.device("meta"):
        m = MoE(H, FFN, E, 2, **kw)
    m.to_empty(device="cpu")
    assert torch.equal(m.tokens_per_expert, torch.full((E,), 77))  # the garbage is there
    torch.manual_seed(5)
    m.reset_parameters()
    torch.manual_seed(5)
    ref = MoE(H, FFN, E, 2, **kw)  # the constructor's initialisation, draw for draw
    assert m.state_dict().keys() == ref.state_dict().keys()
    for name, t in ref.state_dict().items():
        assert torch.equal(m.state_dict()[name], t), name
    assert torch.equal(m.tokens_per_expert, torch.zeros(E, dtype=torch.int64))
    if m.selection_bias:
        assert torch.equal(m.gate.e_score_correction_bias, torch.zeros(E))
        assert m.gate.e_score_correction_bias.dtype == torch.float32


def test_update_bias_after_meta_init(garbage_memory):
    with torch.device("meta"):
        m = MoE(H, FFN, E, 2, selection_bias=True)
    m.to_empty(device="cpu")
    m.reset_parameters()
    m.train()
    x = torch.randn(13, H)
    m(x)
    load = m.tokens_per_expert.float()
    assert load.sum() == 13 * 2  # exactly this forward's choices
    m.update_bias(1e-3)
    torch.testing.assert_close(
        m.gate.e_score_correction_bias, 1e-3 * torch.sign(load.mean() - load), rtol=0, atol=0
    )
