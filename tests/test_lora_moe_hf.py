"""add_lora_moe on tiny random HF decoders (Llama, Qwen3): at zero B the model is the original
bit for bit (logits and greedy generation); only the adapters and routers train; MoLA's per-layer
expert counts; save_pretrained -> lora_moe_from_pretrained and state_dict round trips give the
same model; plain HF loading keeps every base weight; bad arguments name what is wrong."""

import copy

import pytest
import torch

from helpers import TRANSFORMERS_MIN, TRANSFORMERS_REASON, skip_unsupported_transformers

pytest.importorskip("transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON)
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from mixops.integrations.lora_moe import (
    add_lora_moe,
    lora_moe_aux_loss,
    lora_moe_from_pretrained,
    restore_lora_moe,
)
from mixops.nn import LoRAMoE

skip_unsupported_transformers()

V = 61
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def tiny(kind="llama"):
    torch.manual_seed(0)
    kw = dict(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="sdpa",
    )  # fmt: skip
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw)).eval()
    return Qwen3ForCausalLM(Qwen3Config(head_dim=8, **kw)).eval()


def batch(B=2, S=9):
    """Token ids and an attention mask with left padding in row 1 (as generate() expects)."""
    g = torch.Generator().manual_seed(1)
    am = torch.ones(B, S, dtype=torch.long)
    am[1, :3] = 0
    return torch.randint(0, V, (B, S), generator=g), am


def logits(model, ids, am):
    with torch.no_grad():
        return model(ids, attention_mask=am).logits


def generate(model, ids, am):
    return model.generate(
        ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0
    ).tolist()


def randomize_b(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def layers_of(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAMoE)}


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_zero_b_equals_the_original_model(kind):
    model = tiny(kind)
    orig = copy.deepcopy(model)
    ids, am = batch()
    out = add_lora_moe(model, TARGETS, num_experts=4, top_k=2, rank=4, shared_adapter=True)
    assert out is model and len(layers_of(model)) == 2 * len(TARGETS)
    assert torch.equal(logits(model, ids, am), logits(orig, ids, am))
    assert generate(model, ids, am) == generate(orig, ids, am)
    # the base Parameters and their keys are the original model's
    sd, osd = model.state_dict(), orig.state_dict()
    assert set(osd) <= set(sd) and all(torch.equal(sd[k], v) for k, v in osd.items())
    assert all("lora_" in k or ".gate." in k for k in set(sd) - set(osd))


def test_training_step_trains_only_the_adapters():
    model = tiny()
    add_lora_moe(model, TARGETS, num_experts=4, top_k=2, rank=4, aux_loss_coef=0.01,
                 z_loss_coef=1e-3, dropout=0.1)  # fmt: skip
    randomize_b(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{n}.{k}" for n, m in layers_of(model).items() for k in ("lora_A", "lora_B", "gate.weight")
    }
    model.train()
    ids, am = batch()
    out = model(ids, attention_mask=am, labels=ids)
    aux = lora_moe_aux_loss(model)
    assert torch.equal(aux, sum(m.aux_loss for m in layers_of(model).values()))
    (out.loss + aux).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    add_lora_moe(m2 := tiny(), ["o_proj"], 2, 1, freeze_base=False)
    assert all(p.requires_grad for p in m2.parameters() if p is not None)


def test_mola_per_layer_expert_counts():
    model = tiny()
    add_lora_moe(model, TARGETS, top_k=2, num_experts_per_layer=[2, 6])
    add_lora_moe(model, ["lm_head"], num_experts=3, top_k=1, num_experts_per_layer=lambda i: 8)
    counts = {n: m.num_experts for n, m in layers_of(model).items()}
    assert counts == {
        **{f"model.layers.0.{p}": 2 for p in ("self_attn.q_proj", "self_attn.v_proj",
                                              "mlp.up_proj", "mlp.down_proj")},
        **{f"model.layers.1.{p}": 6 for p in ("self_attn.q_proj", "self_attn.v_proj",
                                              "mlp.up_proj", "mlp.down_proj")},
        "lm_head": 3,
    }  # fmt: skip
    assert model.config.mixops_lora_moe["lm_head"]["num_experts"] == 3
    m2 = tiny()
    add_lora_moe(m2, "model\\.layers\\.1\\..*_proj", 2, 1, num_experts_per_layer=lambda i: 2 + i)
    assert {m.num_experts for m in layers_of(m2).values()} == {3} and len(layers_of(m2)) == 7


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_save_and_load_round_trips(kind, tmp_path):
    model = tiny(kind)
    add_lora_moe(model, TARGETS, num_experts=4, top_k=2, rank=4, shared_adapter=2,
                 score_fn="sigmoid", selection_bias=True, num_experts_per_layer=[4, 3])  # fmt: skip
    randomize_b(model)
    ids, am = batch()
    want, want_gen = logits(model, ids, am), generate(model, ids, am)
    # a state dict into a fresh (differently initialised) model wrapped the same way
    torch.manual_seed(5)
    fresh = tiny(kind)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    add_lora_moe(fresh, TARGETS, num_experts=4, top_k=2, rank=4, shared_adapter=2,
                 score_fn="sigmoid", selection_bias=True, num_experts_per_layer=[4, 3])  # fmt: skip
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(logits(fresh, ids, am), want)
    # save_pretrained -> lora_moe_from_pretrained: the same model; plain HF: every base weight
    model.save_pretrained(tmp_path)
    cls = type(model)
    back = lora_moe_from_pretrained(cls, tmp_path).eval()
    assert torch.equal(logits(back, ids, am), want) and generate(back, ids, am) == want_gen
    assert not any(p.requires_grad for n, p in back.named_parameters() if n.endswith("proj.weight"))
    plain = cls.from_pretrained(tmp_path)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in plain.state_dict().items())
    base_logits = logits(plain, ids, am)
    restore_lora_moe(plain)  # the recorded layers, freshly initialised: the base model again
    assert len(layers_of(plain)) == len(layers_of(model))
    assert torch.equal(logits(plain, ids, am), base_logits)


def test_bad_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="matched no module"):
        add_lora_moe(model, ["nope_proj"], 2, 1)
    with pytest.raises(ValueError, match="matched 'model.layers.0.mlp', a LlamaMLP"):
        add_lora_moe(model, ["mlp"], 2, 1)
    with pytest.raises(ValueError, match="num_experts_per_layer has 1 entries, but"):
        add_lora_moe(model, ["q_proj"], top_k=1, num_experts_per_layer=[2])
    with pytest.raises(ValueError, match="num_experts is needed for 'lm_head'"):
        add_lora_moe(model, ["lm_head"], top_k=1)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj: RouterConfig: top_k"):
        add_lora_moe(model, ["q_proj"], top_k=3, num_experts_per_layer=[4, 2])
    with pytest.raises(TypeError, match="unexpected keyword arguments: capacity"):
        add_lora_moe(model, ["q_proj"], 2, 1, capacity=2)
    assert not layers_of(model) and not hasattr(model.config, "mixops_lora_moe")
    add_lora_moe(model, ["q_proj"], 2, 1)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj' is already a LoRAMoE"):
        add_lora_moe(model, ["q_proj"], 2, 1)
    with pytest.raises(ValueError, match="records no LoRAMoE layers"):
        restore_lora_moe(tiny())


def test_gradient_checkpointing_non_reentrant_gives_the_same_gradients():
    """The layers' losses are side outputs: HF's non-reentrant checkpointing keeps their graph
    (under reentrant checkpointing the layer forward runs without autograd and they get none)."""
    model = tiny()
    add_lora_moe(model, TARGETS, 4, 2, 4, aux_loss_coef=0.01, z_loss_coef=1e-3)
    randomize_b(model)
    ref = copy.deepcopy(model).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, am = batch()
    for m in (model, ref):
        out = m(ids, attention_mask=am, labels=ids, use_cache=False)
        (out.loss + lora_moe_aux_loss(m)).backward()
    want = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert (p.grad is None) == (want[n].grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, want[n].grad), n


def test_padding_stays_out_of_the_losses():
    """The model's attention_mask reaches every layer: each layer's losses equal those of the
    layer called on its recorded input with that mask as token_mask."""
    model = tiny()
    add_lora_moe(model, TARGETS + ["lm_head"], 4, 2, 4, aux_loss_coef=0.01, z_loss_coef=1e-3)
    ids, am = batch()
    seen = {}
    hooks = [
        m.register_forward_hook(lambda m, a, out: seen.__setitem__(m, (a[0], m.aux_loss)))
        for m in layers_of(model).values()
    ]
    with torch.no_grad():
        model(ids, attention_mask=am)
    for h in hooks:
        h.remove()
    assert len(seen) == len(TARGETS) * 2 + 1
    for m, (x, aux) in seen.items():
        m.padding_mask = None
        m(x, token_mask=am)
        assert torch.equal(aux, m.aux_loss)
        m(x)
        assert not torch.equal(aux, m.aux_loss)  # the padding counted: other losses
