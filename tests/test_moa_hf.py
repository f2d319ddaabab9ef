"""HF transformers' JetMoE on mixops: patch_model converts the MoA attention and the MoE MLP of a
small random JetMoeForCausalLM (CPU, fp64); logits, loss, aux loss and every gradient match the
unpatched model on a left-padded batch, greedy generate() gives the same tokens, and the modules,
Parameters and state-dict keys stay. from_hf turns a JetMoeAttention into a mixops.nn.MoA.

Tolerances: HF computes the router's logits and softmax in fp32 even in an fp64 model (JetMoE's
gating calls ``.float()``); mixops takes the same fp32 logits but its own fp32 softmax, so results
agree to fp32 rounding of the gates (~1e-7 relative), not to fp64.
"""

import copy
import pickle

import pytest
import torch

from helpers import TRANSFORMERS_MIN, TRANSFORMERS_REASON, skip_unsupported_transformers

transformers = pytest.importorskip(
    "transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON
)
from transformers import JetMoeConfig, JetMoeForCausalLM  # noqa: E402

from mixops.integrations import jetmoe  # noqa: E402
from mixops.integrations.transformers import from_hf, patch_model  # noqa: E402
from mixops.nn import MoA  # noqa: E402

skip_unsupported_transformers()

TOL = dict(rtol=1e-6, atol=1e-6)


def model(attn="sdpa", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = JetMoeConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, kv_channels=8, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
        max_position_embeddings=64, aux_loss_coef=0.01, attn_implementation=attn, **kw,
    )  # fmt: skip
    m = JetMoeForCausalLM(cfg).double()
    with torch.no_grad():  # HF initialises the biases to zero; make them count
        for mod in m.modules():
            if type(mod).__name__ in ("JetMoeMoA", "JetMoeMoE"):
                mod.bias.normal_()
    return m


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


# HF's eager JetMoE attention gives NaN in fp64 with padding (its additive fp64-min mask), so the
# eager cases run in fp32. With padding, eager's fully masked query rows (the padding tokens) attend
# uniformly to every key and pass gradient to them, while SDPA (HF's sdpa path, and mixops) gives
# those rows no weights: outputs agree, gradients do not, so the padded eager case checks outputs.
ATTN = [
    ("sdpa", torch.float64, TOL, True, True),
    ("eager", torch.float32, dict(rtol=1e-4, atol=1e-5), False, True),
    ("eager", torch.float32, dict(rtol=1e-4, atol=1e-5), True, False),
]


@pytest.mark.parametrize("attn,dtype,tol,padded,grads", ATTN, ids=["sdpa", "eager", "eager-pad"])
def test_patch_model_matches_hf_outputs_losses_and_grads(attn, dtype, tol, padded, grads):
    hf = model(attn).to(dtype)
    ours = copy.deepcopy(hf)
    before = {n: p for n, p in ours.named_parameters()}
    names = patch_model(ours)
    assert sorted(names) == sorted(
        f"model.layers.{i}.{b}" for i in range(2) for b in ("mlp", "self_attention")
    )
    assert {n: p for n, p in ours.named_parameters()} == before, "same Parameter objects"
    assert list(ours.state_dict()) == list(hf.state_dict())
    ids, mask, labels = batch()
    if not padded:
        mask, labels = torch.ones_like(mask), ids
    o1 = hf(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    o2 = ours(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    valid = mask.bool()
    torch.testing.assert_close(o2.logits[valid], o1.logits[valid], **tol)
    torch.testing.assert_close(o2.loss, o1.loss, **tol)
    torch.testing.assert_close(o2.aux_loss, o1.aux_loss, **tol)
    assert len(o2.router_logits) == len(o1.router_logits) == 4  # attention + MLP per layer
    for a, b in zip(o2.router_logits, o1.router_logits):
        torch.testing.assert_close(a, b, **tol)
    if not grads:
        return
    o1.loss.backward()
    o2.loss.backward()
    for (n, p1), (_, p2) in zip(hf.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, **tol, msg=f"grad of {n}")


def test_generate_gives_the_same_tokens():
    hf = model()
    ours = copy.deepcopy(hf)
    patch_model(ours)
    ids, mask, _ = batch(2)
    g1 = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    g2 = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(g1, g2)


def test_patched_blocks_are_hf_subclasses_and_pickle():
    ours = model()
    patch_model(ours)
    layer = ours.model.layers[0]
    assert isinstance(layer.self_attention, jetmoe.MixopsJetMoeAttention)
    assert isinstance(layer.mlp, jetmoe.MixopsJetMoeMoE)
    assert isinstance(layer.mlp.router, jetmoe.JetMoeTopKGating)
    assert patch_model(ours) == [], "patching twice changes nothing"
    again = pickle.loads(pickle.dumps(ours))
    ids, mask, _ = batch()
    torch.testing.assert_close(
        again(input_ids=ids, attention_mask=mask).logits,
        ours(input_ids=ids, attention_mask=mask).logits,
        rtol=0,
        atol=0,
    )
    for m in (layer.mlp, layer.self_attention.experts):  # HF's init still reaches them
        ours._init_weights(m)
        assert torch.all(m.bias == 0)


def test_from_hf_attention_gives_a_moa_sharing_parameters():
    hf = model()
    attn = hf.model.layers[1].self_attention
    moa = from_hf(attn, aux_loss_coef=0.1)
    assert isinstance(moa, MoA)
    assert moa.experts is attn.experts and moa.kv_proj is attn.kv_proj
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    rot = hf.model.rotary_emb(x, torch.arange(5).expand(2, 5))
    ref, _, logits = attn(x, attention_mask=None, position_embeddings=rot)
    torch.testing.assert_close(moa(x, position_embeddings=rot), ref, **TOL)
    assert moa.aux_loss is not None
    torch.testing.assert_close(moa.router_logits, logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="JetMoeAttention"):
        jetmoe.moa_from_hf(hf.model.layers[0].mlp)
