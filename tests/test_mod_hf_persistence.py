"""HF decoders with MoD layers survive what users do with models: deep copies and pickles keep the
padding mask working; a saved model reloaded by plain HF has every original weight, and
mod_from_pretrained restores the MoD model exactly (also from the earlier ``block.`` checkpoint
format); HF's weight init keeps MoD's zero tanh gate; recorded hidden states and attentions are
full length and equal the original model's at capacity 1."""

import copy
import io

import pytest
import torch

from helpers import TRANSFORMERS_MIN, TRANSFORMERS_REASON, skip_unsupported_transformers

pytest.importorskip("transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON)
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from mixops.integrations.mod import add_mod, mod_from_pretrained, restore_mod
from mixops.nn import MoDRouting, TokenCount
from test_mod_hf import batch, tiny

skip_unsupported_transformers()


def half_capacity(model, layers=(0, 2)):
    mods = add_mod(model, layers=list(layers), capacity=0.5, causal_rule="router", gate="sigmoid")
    g = torch.Generator().manual_seed(4)
    for m in mods:
        m.router.weight.data = torch.randn(m.router.weight.shape, generator=g) * 0.5
    return mods


def logits(model, ids, am):
    with torch.no_grad():
        return model(ids, attention_mask=am, use_cache=False).logits


def topc_oracle(model, ids, am):
    """Top-C logits with the padding mask handed to every MoD layer by hand (not by the hook)."""
    for m in model.modules():
        if isinstance(m, MoDRouting):
            m.hf_padding_mask = am
    hooks = model.model._forward_pre_hooks
    saved = dict(hooks)
    hooks.clear()
    try:
        return logits(model, ids, am)
    finally:
        hooks.update(saved)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "pickle-twice"])
def test_copies_and_pickles_keep_the_padding_mask(how):
    model = tiny()
    half_capacity(model)
    ids, am = batch()
    want = logits(model, ids, am)
    if how == "deepcopy":
        other = copy.deepcopy(model)
    else:
        other = model
        for _ in range(1 if how == "torch.save" else 2):
            buf = io.BytesIO()
            torch.save(other, buf)
            buf.seek(0)
            other = torch.load(buf, weights_only=False)
    assert type(other.model.layers[0]) is type(model.model.layers[0])
    got = logits(other, ids, am)
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=0)
    torch.testing.assert_close(got[real], topc_oracle(other, ids, am)[real], rtol=0, atol=0)
    mods = [m for m in other.modules() if isinstance(m, MoDRouting)]
    assert len(mods) == 2 and not any((m.chosen & ~real).any() for m in mods)  # padding skipped


def test_plain_hf_reload_has_every_original_weight_and_mod_from_pretrained_restores(tmp_path):
    model = tiny()
    mods = half_capacity(model)
    ids, am = batch()
    want = logits(model, ids, am)
    model.save_pretrained(tmp_path)
    saved = model.state_dict()
    plain = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    for k, v in plain.state_dict().items():  # every layer weight is the saved one
        assert torch.equal(v, saved[k]), k
    assert set(saved) - set(plain.state_dict()) == {
        f"model.layers.{i}.router.weight" for i in (0, 2)
    }
    back = mod_from_pretrained(LlamaForCausalLM, tmp_path).eval()
    assert [type(layer) for layer in back.model.layers] == [type(x) for x in model.model.layers]
    for a, b in zip(mods, [back.model.layers[0], back.model.layers[2]]):
        assert a.mod_options() == b.mod_options()
    torch.testing.assert_close(logits(back, ids, am), want, rtol=0, atol=0)
    back.init_weights()  # loaded routers are kept by HF's init
    torch.testing.assert_close(logits(back, ids, am), want, rtol=0, atol=0)


def test_checkpoints_of_the_block_format_load(tmp_path):
    model = tiny()
    mods = half_capacity(model, layers=(1,))
    ids, am = batch()
    want = logits(model, ids, am)
    old = {
        k.replace("layers.1.", "layers.1.block.")
        if "layers.1." in k and "router" not in k
        else k: v
        for k, v in model.state_dict().items()
    }  # the earlier add_mod's keys
    assert "model.layers.1.block.self_attn.q_proj.weight" in old
    fresh = tiny()
    fresh_mods = add_mod(fresh, layers=[1], capacity=0.5, causal_rule="router", gate="sigmoid")
    fresh.load_state_dict(old)  # strict: every old key lands, nothing missing
    torch.testing.assert_close(logits(fresh, ids, am), want, rtol=0, atol=0)
    assert fresh_mods[0].router.weight.data_ptr() != mods[0].router.weight.data_ptr()
    # On disk, with a config that records nothing (as the earlier version saved it).
    cfg = copy.deepcopy(model.config)
    del cfg.mixops_mod
    cfg.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in old.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(ValueError, match="records no MoD layers"):
        mod_from_pretrained(LlamaForCausalLM, tmp_path)
    back = mod_from_pretrained(
        LlamaForCausalLM, tmp_path, mod_layers=[1],
        mod_options=dict(capacity=0.5, causal_rule="router", gate="sigmoid"),
    )  # fmt: skip
    torch.testing.assert_close(logits(back.eval(), ids, am), want, rtol=0, atol=0)


def test_restore_mod_errors(tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match="records no MoD layers"):
        restore_mod(model)
    model.save_pretrained(tmp_path)  # no MoD: no router keys in the files
    with pytest.raises(ValueError, match="checkpoint has no .*router.weight"):
        restore_mod(tiny(), tmp_path, layers=[1], options=dict(capacity=0.5))


def test_hf_init_keeps_the_zero_tanh_gate():
    model = tiny()
    mods = add_mod(model, layers=[0, 2], capacity=1.0)  # gate "tanh": zero routers
    model.init_weights()
    assert all(torch.count_nonzero(m.router.weight) == 0 for m in mods)
    for layer in model.modules():  # HF's init on a model whose modules are all initialised anew
        for t in layer.parameters(recurse=False):
            t.__dict__.pop("_is_hf_initialized", None)
        layer.__dict__.pop("_is_hf_initialized", None)
    with torch.no_grad():
        for m in mods:
            m.router.weight.fill_(1.0)
    model.init_weights()
    assert all(torch.count_nonzero(m.router.weight) == 0 for m in mods)
    assert all(m._gate(torch.zeros(1)).item() == 1.0 for m in mods)
    mods[0].router.reset_parameters()  # torch's reset_parameters follows the same rule
    assert torch.count_nonzero(mods[0].router.weight) == 0


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_recorded_states_and_attentions_at_capacity_one_equal_the_original(kind):
    model = tiny(kind, attn="eager")
    conv = copy.deepcopy(model)
    add_mod(conv, layers=[0, 2], capacity=1.0)
    ids, am = batch()
    kw = dict(attention_mask=am, use_cache=False, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        ref, out = model(ids, **kw), conv(ids, **kw)
    real = am.bool()
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
    assert len(out.attentions) == len(ref.attentions) == 3
    pair = real[:, None, :, None] & real[:, None, None, :]
    for a, b in zip(out.attentions, ref.attentions):
        assert a.shape == b.shape == (3, 4, 11, 11)
        torch.testing.assert_close(a[pair.expand_as(a)], b[pair.expand_as(b)], rtol=1e-5, atol=1e-6)


def test_recorded_outputs_below_capacity_one_are_full_length():
    model = tiny(attn="eager")
    mods = half_capacity(model, layers=(1,))
    ids, am = batch()
    kw = dict(attention_mask=am, use_cache=False, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        out = model(ids, **kw)
    chosen = mods[0].chosen
    assert chosen.any() and (~chosen & am.bool()).any()
    h_in, h_out = out.hidden_states[1], out.hidden_states[2]
    assert h_out.shape == h_in.shape == (3, 11, 64)
    torch.testing.assert_close(h_out[~chosen], h_in[~chosen], rtol=0, atol=0)  # skipped: unchanged
    assert not torch.equal(h_out[chosen], h_in[chosen])
    w = out.attentions[1]
    assert w.shape == (3, 4, 11, 11)
    pair = chosen[:, None, :, None] & chosen[:, None, None, :]
    assert torch.count_nonzero(w[~pair.expand_as(w)]) == 0  # skipped tokens neither ask nor answer
    rows = w.sum(-1).permute(0, 2, 1)[chosen]  # each chosen query's weights sum to 1
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    assert torch.count_nonzero(w[..., ~causal]) == 0


def test_recorded_attentions_carry_the_gradient_of_the_original():
    model = tiny(attn="eager")
    conv = copy.deepcopy(model)
    add_mod(conv, layers=[0, 2], capacity=1.0)
    ids, am = batch()
    real = am.bool()
    gy = torch.randn(3, 11, 101, generator=torch.Generator().manual_seed(1))
    grads = []
    for m in (model, conv):
        out = m(ids, attention_mask=am, use_cache=False, output_attentions=True)
        for a in out.attentions:
            a.retain_grad()
        (out.logits * gy * real[..., None]).sum().backward()
        grads.append([a.grad for a in out.attentions])
    pair = (real[:, None, :, None] & real[:, None, None, :]).expand(3, 4, 11, 11)
    for got, want in zip(*grads):
        assert got is not None
        torch.testing.assert_close(got[pair], want[pair], rtol=1e-4, atol=1e-6)
    mine = dict(conv.named_parameters())
    for n, p in model.named_parameters():  # parameter gradients unchanged
        torch.testing.assert_close(mine[n].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_a_recorded_capacity_of_one_token_restores_as_one_token(tmp_path):
    # A checkpoint's int capacity is a token count, 1 included (saved before a bare capacity=1 was
    # refused as ambiguous, or with TokenCount(1)): it restores as one token per sequence.
    model = tiny()
    mods = add_mod(model, layers=[1], capacity=TokenCount(1), causal_rule="router")
    torch.nn.init.normal_(mods[0].router.weight, std=0.5)
    ids, am = batch()
    want = logits(model, ids, am)
    assert model.config.mixops_mod["layers"]["1"]["capacity"] == 1  # recorded as an int count
    model.save_pretrained(tmp_path)
    back = mod_from_pretrained(LlamaForCausalLM, tmp_path).eval()
    torch.testing.assert_close(logits(back, ids, am), want, rtol=0, atol=0)
    back(ids, attention_mask=am, use_cache=False)
    assert back.model.layers[1].chosen.sum(1).tolist() == [1, 1, 1]  # one token per sequence
