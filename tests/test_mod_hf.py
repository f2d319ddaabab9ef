"""MoD in HF transformers decoder models (mixops.integrations.mod.add_mod): Llama and Qwen3 converted
at capacity 1 with g = 1 equal the original model (forward, and greedy generation with batch 1 and
3), a converted layer equals the masked-dense oracle on HF's own layer with RoPE, causal routing in
one forward over a prompt equals step-by-step decoding with the cache (sdpa and eager), and the
original Parameters are kept."""

import copy

import pytest
import torch

from helpers import TRANSFORMERS_MIN, TRANSFORMERS_REASON, skip_unsupported_transformers

pytest.importorskip("transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON)
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from mixops.integrations.mod import add_mod
from mixops.nn import MoD, pmod_capacity_schedule
from mod_reference import dense_mod

skip_unsupported_transformers()

V = 101


def tiny(kind="llama", attn="sdpa", layers=3):
    torch.manual_seed(0)
    kw = dict(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation=attn,
    )  # fmt: skip
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw)).eval()
    return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **kw)).eval()


def batch(B=3, S=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    if B > 1:
        am[1, :4] = 0  # left padding, as generate() expects
    return ids, am


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_capacity_one_equals_the_original_model_and_its_generation(kind):
    model = tiny(kind)
    conv = copy.deepcopy(model)
    mods = add_mod(conv, layers=[0, 2], capacity=1.0)  # gate "tanh": a zero router, g = 1
    name = type(model.model.layers[1]).__name__
    assert [type(layer).__name__ for layer in conv.model.layers] == [
        "MoD" + name,
        name,
        "MoD" + name,
    ]
    assert [layer is m for layer, m in zip(conv.model.layers, [mods[0], None, mods[1]])] == [
        True, False, True
    ]  # fmt: skip
    assert all(isinstance(m, MoD) for m in mods)  # collecting MoD layers by class finds them
    ids, am = batch()
    real = am.bool()
    for use_cache in (False, True):
        ref = model(ids, attention_mask=am, use_cache=use_cache).logits
        out = conv(ids, attention_mask=am, use_cache=use_cache).logits
        torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    assert all(m.chosen[real].all() for m in mods)
    for b in (1, 3):
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        want = model.generate(ids[:b], attention_mask=am[:b], **kw)
        got = conv.generate(ids[:b], attention_mask=am[:b], **kw)
        assert torch.equal(got, want)


def test_parameters_and_keys_are_the_original_ones_in_their_order():
    model = tiny()
    before = list(model.named_parameters())
    keys = list(model.state_dict())
    mods = add_mod(model, layers=[1], capacity=0.5, causal_rule="predictor")
    after = list(model.named_parameters())
    added = [
        "model.layers.1.router.weight",
        *(f"model.layers.1.{n}" for n, _ in mods[0].predictor.named_parameters(prefix="predictor")),
    ]
    # Every original Parameter under its own name, HF's order kept; MoD's at the end of the layer.
    i = max(k for k, (n, _) in enumerate(before) if n.startswith("model.layers.1.")) + 1
    want = [n for n, _ in before[:i]] + added + [n for n, _ in before[i:]]
    assert [n for n, _ in after] == want
    objs = dict(after)
    assert all(objs[n] is p for n, p in before)
    assert [k for k in model.state_dict() if k not in added] == keys


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_converted_layer_matches_the_masked_dense_oracle_with_rope(kind):
    model = tiny(kind)
    layer = model.model.layers[1]
    mod = MoD(layer, 64, 0.25, gate="sigmoid")
    torch.nn.init.normal_(mod.router.weight, std=0.3)
    B, S = 2, 12
    x = torch.randn(B, S, 64, requires_grad=True)
    pos = (torch.arange(S) + 3).expand(B, S)
    pe = model.model.rotary_emb(x, pos)
    out = mod(x, position_embeddings=pe, position_ids=pos)
    assert mod.chosen.sum(1).tolist() == [3, 3]
    r = x @ mod.router.weight[0]
    ref = dense_mod(layer, x, r, mod.chosen, "sigmoid", position_embeddings=pe,
                    position_ids=pos)  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(out)
    ps = [x, mod.router.weight, *layer.parameters()]
    g1 = torch.autograd.grad(out, ps, gy, retain_graph=True)
    g2 = torch.autograd.grad(ref, ps, gy)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("rule", ["router", "predictor"])
def test_causal_routing_of_a_prompt_equals_step_by_step_decoding(attn, rule):
    model = tiny(attn=attn)
    mods = add_mod(model, layers=[1, 2], capacity=0.5, causal_rule=rule, gate="sigmoid")
    for m in mods:  # routers that keep some tokens and skip others
        for net in [m.router] if rule == "router" else [m.predictor[0], m.predictor[2]]:
            torch.nn.init.normal_(net.weight, std=0.5 if rule == "router" else 3.0)
            if net.bias is not None:
                torch.nn.init.zeros_(net.bias)
    ids, am = batch()
    one = model(ids, attention_mask=am, use_cache=True).logits
    kept = [m.chosen.clone() for m in mods]
    assert all(k.any() and (~k[am.bool()]).any() for k in kept)  # some tokens skip, some don't
    cache, steps = DynamicCache(config=model.config), []
    for t in range(ids.shape[1]):
        o = model(ids[:, t : t + 1], attention_mask=am[:, : t + 1], cache=cache, use_cache=True)
        steps.append(o.logits)
        for m, k in zip(mods, kept):
            assert torch.equal(m.chosen[:, 0], k[:, t])  # the same decision, token by token
    real = am.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], one[real], rtol=1e-5, atol=1e-5)
    out = model.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (3, ids.shape[1] + 4)


def test_training_uses_top_c_and_trains_the_routers():
    model = tiny().train()
    mods = add_mod(model, capacities=pmod_capacity_schedule(3, max_ratio=0.9), causal_rule="router")
    assert len(mods) == 2  # layer 0's ratio is 1.0 > 0.9: it stays dense
    ids, am = batch()
    out = model(ids, attention_mask=am, labels=ids)  # HF makes a cache; training ignores it
    (out.loss + sum(m.aux_loss for m in mods)).backward()
    for m in mods:
        assert m.router.weight.grad.abs().sum() > 0
        assert not (m.chosen & ~am.bool()).any()  # padding never chosen


def test_add_mod_keeps_the_mode_and_training_mode_cannot_decode():
    model = tiny()
    mods = add_mod(model, layers=[1], capacity=0.5, causal_rule="router")
    assert not mods[0].training  # the model was in evaluation mode
    model.train()
    ids, am = batch()
    cache = DynamicCache(config=model.config)
    model(ids, attention_mask=am, cache=cache, use_cache=True)  # top-C; the MoD layer skips it
    with pytest.raises(ValueError, match="needs evaluation mode"):
        model(ids[:, :1], attention_mask=am, cache=cache, use_cache=True)


def test_add_mod_errors():
    model = tiny()
    with pytest.raises(ValueError, match="out of range"):
        add_mod(model, layers=[3])
    with pytest.raises(ValueError, match="one entry per layer"):
        add_mod(model, capacities=[0.5])
    with pytest.raises(ValueError, match="not both"):
        add_mod(model, layers=[0], capacities=[0.5, None, None])
    add_mod(model, layers=0)
    with pytest.raises(ValueError, match="already a MoD layer"):
        add_mod(model, layers=[0])
    with pytest.raises(ValueError, match="no decoder"):
        add_mod(torch.nn.Linear(2, 2))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny().train()
        mods = add_mod(model, layers=[1, 2], capacity=0.5, causal_rule="router")
        for m in mods:
            torch.nn.init.normal_(
                m.router.weight, std=0.3, generator=torch.Generator().manual_seed(2)
            )
        if checkpointing:  # HF's checkpointing now wraps the whole MoD layer
            model.gradient_checkpointing_enable()
        ids, am = batch()
        out = model(ids, attention_mask=am, labels=ids, use_cache=False)
        (out.loss + sum(m.aux_loss for m in mods)).backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(g is not None for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
