"""patch_model on HF transformers' LongCat-Flash: a small random-initialised LongcatFlashForCausalLM
before and after patching gives the same logits, loss and gradients (every parameter), with a
selection bias that sends part of the tokens to the zero (identity) experts; the routing decisions
equal HF's; the Parameters, their order and the state-dict keys are kept; generation with the
cache, output_router_logits, init_weights and the layers mixops cannot express."""

import copy
import warnings

import pytest
import torch

from helpers import TRANSFORMERS_MIN, TRANSFORMERS_REASON, skip_unsupported_transformers

transformers = pytest.importorskip(
    "transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON
)
from transformers import LongcatFlashConfig, LongcatFlashForCausalLM  # noqa: E402

from mixops.integrations.transformers import patch_model  # noqa: E402
from mixops.nn import MoE  # noqa: E402

skip_unsupported_transformers()

E, Z, K, H = 4, 2, 2, 32
# The router's logits, softmax and top-k run in fp32 in both (HF's and mixops' own fp32 routing
# math may differ by an ulp of fp32 in a weight): fp64 models agree to about 1e-7 relative.
TOL64 = dict(rtol=1e-6, atol=1e-7)


def _config(**kw):
    cfg = dict(
        vocab_size=64,
        hidden_size=H,
        num_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        ffn_hidden_size=48,
        expert_ffn_hidden_size=24,
        n_routed_experts=E,
        zero_expert_num=Z,
        moe_topk=K,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        head_dim=8,
        v_head_dim=8,
        routed_scaling_factor=2.5,
        max_position_embeddings=64,
    )
    cfg.update(kw)
    return LongcatFlashConfig(**cfg)


def _models(dtype=torch.float64, attn="sdpa", **kw):
    torch.manual_seed(0)
    ref = LongcatFlashForCausalLM(_config(**kw)).to(dtype)
    ref.config._attn_implementation = attn
    with torch.no_grad():  # a selection bias that sends part of the tokens to the zero experts
        for layer in ref.model.layers:
            layer.mlp.router.e_score_correction_bias[E:] = torch.tensor([0.02, 0.01])
    ours = copy.deepcopy(ref)
    assert patch_model(ours) == [f"model.layers.{i}" for i in range(2)]
    return ref, ours


def _hf_choices(model, ids):
    """Each layer's (ids, weights) as HF's own router chooses them, recorded by hooks."""
    got = []

    def hook(mod, args, out):
        got.append((out[2].sort(-1).values, out[1].gather(1, out[2].sort(-1).indices)))

    hs = [layer.mlp.router.register_forward_hook(hook) for layer in model.model.layers]
    model(ids)
    for h in hs:
        h.remove()
    return got


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_patched_model_equals_hf(attn):
    ref, ours = _models(attn=attn)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    out_ref, out = ref(ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, **TOL64)
    torch.testing.assert_close(out.loss, out_ref.loss, **TOL64)
    out_ref.loss.backward()
    out.loss.backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        want = grads_ref[name].grad
        assert p.grad is not None and want is not None, name
        torch.testing.assert_close(p.grad, want, **TOL64, msg=name)
    # The zero experts' slices of gate_up_proj are used by nobody: zero gradient in both.
    for layer in ours.model.layers:
        assert layer.mlp.experts.gate_up_proj.grad[E:].abs().max() == 0
        assert layer.mlp.experts.gate_up_proj.grad[:E].abs().max() > 0


def test_routing_decisions_equal_hf_and_reach_zero_experts():
    ref, ours = _models()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    want = _hf_choices(ref, ids)
    # mixops' routing of each layer's MoE input (post_attention_layernorm[0]'s output).
    inputs, hooks = [], []
    for layer in ours.model.layers:
        hooks.append(
            layer.post_attention_layernorm[0].register_forward_hook(
                lambda m, a, o: inputs.append(o.detach())
            )
        )
    ours(ids)
    for h in hooks:
        h.remove()
    got = []
    for i, layer in enumerate(ours.model.layers):
        r, _ = layer.mlp._route(inputs[i].reshape(-1, H), None, None)
        order = r.ids.sort(-1)
        got.append((order.values.long(), r.weights.gather(1, order.indices.long())))
    for (ids_w, w_w), (ids_g, w_g) in zip(want, got):
        assert torch.equal(ids_g, ids_w)
        # fp32 weights: HF's softmax x scaling against mixops' fp32 routing math (an ulp apart)
        torch.testing.assert_close(w_g, w_w.float(), rtol=4e-7, atol=0)
    zero = torch.cat([g[0].flatten() for g in got]) >= E
    assert 0.1 < zero.float().mean() < 0.9  # both kinds of experts are chosen


def test_parameters_keys_and_order_are_kept():
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(_config())
    before = list(model.named_parameters())
    keys = list(model.state_dict().keys())
    patch_model(model)
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(p is q for (_, p), (_, q) in zip(after, before))
    assert list(model.state_dict().keys()) == keys
    layer = model.model.layers[0]
    assert isinstance(layer.mlp, MoE) and layer.mlp.zero_experts == ("identity",) * Z
    assert isinstance(layer, type(LongcatFlashForCausalLM(_config()).model.layers[0]))


def test_generate_and_router_logits_match():
    ref, ours = _models(dtype=torch.float64)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))
    lr = ref(ids, output_router_logits=True).router_logits
    lo = ours(ids, output_router_logits=True).router_logits
    assert len(lo) == len(lr) == 2
    torch.testing.assert_close(lo[0], lr[0], rtol=0, atol=0)  # the same input: bit-equal
    torch.testing.assert_close(lo[1], lr[1], rtol=1e-5, atol=1e-7)  # fp32 logits of ~equal inputs


def test_init_weights_and_modes_after_patch():
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(_config()).eval()
    patch_model(model)
    assert not model.model.layers[0].mlp.training
    model.model.layers[0].mlp.tokens_per_expert.fill_(3)
    model.init_weights()
    assert model.model.layers[0].mlp.tokens_per_expert.abs().sum() == 0
    # Training mode counts the load of all E + Z choices (the selection-bias update's input).
    model.train()
    ids = torch.randint(0, 64, (2, 8))
    model(ids)
    counts = model.model.layers[0].mlp.tokens_per_expert
    assert counts.shape == (E + Z,) and counts.sum() == 2 * 8 * K


def test_unsupported_layers_stay_with_a_warning():
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(_config(hidden_act="tanh"))
    before = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert patch_model(model) == []
    assert any("activation 'tanh'" in str(x.message) for x in w)
    assert type(model.model.layers[0]) is type(before.model.layers[0])
    ids = torch.randint(0, 64, (1, 4))
    torch.testing.assert_close(model(ids).logits, before(ids).logits, rtol=0, atol=0)


def test_from_hf_shares_the_weights_and_leaves_the_block_working():
    from mixops.integrations.transformers import from_hf

    ref, _ = _models()
    block = ref.model.layers[0].mlp
    moe = from_hf(block)
    assert moe.router.classifier.weight is block.router.classifier.weight
    assert moe.experts is block.experts
    assert set(moe.state_dict()) == set(block.state_dict())
    x = torch.randn(3, 7, H, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(moe(x), block(x), **TOL64)
    assert len(block.router(x.reshape(-1, H))) == 3  # HF's own router is untouched


def test_hidden_states_and_gradient_checkpointing():
    ref, ours = _models()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    hr = ref(ids, output_hidden_states=True).hidden_states
    ho = ours(ids, output_hidden_states=True).hidden_states
    assert len(ho) == len(hr) == 3
    for a, b in zip(ho, hr):
        torch.testing.assert_close(a, b, **TOL64)
    for m in (ref, ours):
        m.train()
        enable = getattr(m, "activation_checkpointing_enable", None)  # transformers >= 5.24
        (enable or m.gradient_checkpointing_enable)()
        m(ids, labels=ids).loss.backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[name].grad, **TOL64, msg=name)


def test_patched_model_pickles():
    import io
    import pickle

    ref, ours = _models()
    buf = io.BytesIO()
    torch.save(ours, buf)  # a whole-model pickle, as torch.save(model) makes it
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=0, atol=0)
    assert type(back.model.layers[0]).__name__ == "MixopsLongcatFlashDecoderLayer"
    pickle.dumps(ours.model.layers[0].mlp.router)
