"""MoD layers under HF's runtime options: bf16 autocast (training and generation; fp32 master
weights get fp32 gradients, the loss within the tolerance rule of HF's own autocast loss), the
attention backends (flex attention refused with a message naming the supported ones), and blocks
whose output dtype differs from their input (a clear error outside autocast)."""

import copy

import pytest
import torch

from helpers import (
    TRANSFORMERS_MIN,
    TRANSFORMERS_REASON,
    assert_close_to_ref,
    skip_unsupported_transformers,
)

pytest.importorskip("transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON)

from mixops.integrations.mod import add_mod
from mixops.nn import MoD
from test_mod_hf import batch, tiny

skip_unsupported_transformers()


def loss_and_grads(model, ids, am, autocast, mods=()):
    labels = ids.masked_fill(am == 0, -100)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, attention_mask=am, labels=labels, use_cache=False)
    loss = out.loss
    (loss + sum(m.aux_loss for m in mods if m.aux_loss is not None)).backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("capacity", [1.0, 0.5])
def test_bf16_autocast_training_within_the_tolerance_of_hfs_own(capacity):
    hf = tiny().train()
    conv = copy.deepcopy(hf)
    mods = add_mod(conv, layers=[0, 2], capacity=capacity, causal_rule="router")
    for m in mods if capacity < 1 else ():  # routers that choose (a zero router: gate 1, ties)
        m.router.weight.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    ids, am = batch()
    ref_loss, ref_g = loss_and_grads(conv, ids, am, autocast=False, mods=mods)
    ours, g = loss_and_grads(conv, ids, am, autocast=True, mods=mods)
    assert all(t.dtype == torch.float32 for t in g.values())  # fp32 master weights
    if capacity == 1.0:  # HF's own model computes the same thing: its autocast error is the bar
        hf_ref, _ = loss_and_grads(hf, ids, am, autocast=False)
        torch.testing.assert_close(ref_loss, hf_ref, rtol=1e-5, atol=1e-6)
        hf_loss, hf_g = loss_and_grads(hf, ids, am, autocast=True)
        assert_close_to_ref(ours.bfloat16(), ref_loss, hf_loss.bfloat16(), "loss")
        for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"):
            assert_close_to_ref(g[n].bfloat16(), ref_g[n], hf_g[n].bfloat16(), n)
    else:  # below 1 the bar is bf16's own rounding of the loss
        assert (ours - ref_loss).abs() <= 0.05 * ref_loss.abs()
    for m in mods:
        assert m.router.weight.grad is not None and m.router.weight.grad.dtype == torch.float32


def test_bf16_autocast_generation_equals_the_original_at_capacity_one():
    hf = tiny()
    conv = copy.deepcopy(hf)
    add_mod(conv, layers=[0, 2], capacity=1.0)
    ids, am = batch()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = hf.generate(ids, attention_mask=am, **kw)
        got = conv.generate(ids, attention_mask=am, **kw)
    assert torch.equal(got, want)


def test_flex_attention_is_refused_naming_the_supported_backends():
    with pytest.raises(ValueError, match="'flex_attention' is not supported.*'sdpa' or 'eager'"):
        add_mod(tiny(attn="flex_attention"), layers=[1], capacity=0.5)
    model = tiny()
    add_mod(model, layers=[1], capacity=0.5)
    model.set_attn_implementation("flex_attention")  # switched after conversion
    ids, am = batch()
    with torch.no_grad(), pytest.raises(ValueError, match="BlockMask.*'sdpa' or 'eager'"):
        model(ids, attention_mask=am, use_cache=False)


class _Half(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, **kwargs):  # (causal routing passes a mask; this block needs none)
        return (x + self.lin(x)).half()


@pytest.mark.parametrize("routing", ["topc", "causal"])
def test_a_block_returning_another_dtype_is_a_clear_error(routing):
    mod = MoD(_Half(), 8, 1.0, gate="one", causal=False)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"returned torch.float16 for a torch.float32 input"):
        mod(x, routing=routing)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: cast back to x's dtype
        y = mod(x, routing=routing)
        want = (x + mod.block.lin(x)).half().float()
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=0, atol=0)
