"""mixops.nn.MoE against HF transformers' own MoE blocks and models (transformers is required).

Parity: outputs and the gradients of the input and of every weight, fp32 within 1e-5 of the
tensor's scale, bf16 by the project's rule (tests/helpers.py) against the HF block in fp64.
"""

import pytest
import torch

from helpers import TRANSFORMERS_MIN, TRANSFORMERS_REASON, skip_unsupported_transformers

transformers = pytest.importorskip(
    "transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON
)
from transformers import (
    DeepseekV3Config,
    Glm4MoeConfig,
    MixtralConfig,  # noqa: E402
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    MixtralForCausalLM,
    MixtralSparseMoeBlock,
)
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

from helpers import assert_close_to_ref  # noqa: E402
from mixops.integrations.transformers import (
    from_hf,
    mixops_experts_forward,  # noqa: E402
    patch_model,
)
from mixops.nn import MoE  # noqa: E402

skip_unsupported_transformers()

H, F = 32, 24


def _mixtral():
    return MixtralSparseMoeBlock(
        MixtralConfig(
            hidden_size=H, intermediate_size=F, num_local_experts=8, num_experts_per_tok=2
        )
    )


def _qwen2(norm):
    return Qwen2MoeSparseMoeBlock(
        Qwen2MoeConfig(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=F,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=norm,
        )
    )


def _qwen3():
    return Qwen3MoeSparseMoeBlock(
        Qwen3MoeConfig(
            hidden_size=H,
            moe_intermediate_size=F,
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=True,
        )
    )


def _olmoe():
    return OlmoeSparseMoeBlock(
        OlmoeConfig(
            hidden_size=H,
            intermediate_size=F,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
    )


def _deepseek(cfg_cls=DeepseekV3Config, block=DeepseekV3MoE):
    b = block(
        cfg_cls(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=F,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        )
    )
    b.gate.e_score_correction_bias.normal_(0, 0.3)  # includes negative biases
    return b


BLOCKS = {
    "mixtral": _mixtral,
    "qwen2_moe_norm": lambda: _qwen2(True),
    "qwen2_moe_no_norm": lambda: _qwen2(False),
    "qwen3_moe": _qwen3,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek,
    "glm4_moe": lambda: _deepseek(Glm4MoeConfig, Glm4MoeMoE),
}


def _init(block):
    for name, p in block.named_parameters():
        # Routers spread wide enough that bf16 rounding cannot swap near-tied choices.
        torch.nn.init.normal_(p, std=1.0 if name.startswith("gate.") else 0.2)
    return block


def _run(module, x, gy):
    x = x.detach().clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(gy)
    return [y.detach(), x.grad] + [p.grad for _, p in sorted(module.named_parameters())]


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_from_hf_parity_fp32(kind):
    block = _init(BLOCKS[kind]())
    moe = from_hf(block)
    assert isinstance(moe, MoE)
    assert sorted(moe.state_dict()) == sorted(block.state_dict())
    x, gy = torch.randn(2, 9, H), torch.randn(2, 9, H)
    ours, theirs = _run(moe, x, gy), _run(block, x, gy)
    names = ["y", "x.grad"] + [n for n, _ in sorted(block.named_parameters())]
    for name, a, b in zip(names, ours, theirs):
        assert b is not None and a is not None, name
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * max(scale, 1e-30), f"{kind} {name}: {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe_norm", "deepseek_v3"])
def test_from_hf_parity_bf16(kind):
    block = _init(BLOCKS[kind]())
    # The bf16 weights, then the same values in fp64 for the reference.
    lowp = block.to(torch.bfloat16)
    if hasattr(lowp.gate, "e_score_correction_bias"):
        lowp.gate.e_score_correction_bias.data = lowp.gate.e_score_correction_bias.float()
    x = torch.randn(2, 9, H).to(torch.bfloat16)
    gy = torch.randn(2, 9, H).to(torch.bfloat16)
    ours = _run(from_hf(lowp), x, gy)
    torch_lowp = _run(lowp, x, gy)
    ref_block = BLOCKS[kind]().double()
    ref_block.load_state_dict({k: v.double() for k, v in lowp.state_dict().items()})
    ref = _run(ref_block, x.double(), gy.double())
    names = ["y", "x.grad"] + [n for n, _ in sorted(block.named_parameters())]
    for name, a, r, t in zip(names, ours, ref, torch_lowp):
        assert_close_to_ref(a, r, t, f"{kind} bf16 {name}")


def test_from_hf_refuses_what_it_cannot_express():
    block = MixtralSparseMoeBlock(
        MixtralConfig(
            hidden_size=H,
            intermediate_size=F,
            num_local_experts=8,
            num_experts_per_tok=2,
            router_jitter_noise=0.1,
        )
    )
    with pytest.raises(ValueError, match="router_jitter_noise"):
        from_hf(block)
    with pytest.raises(ValueError, match="not a supported MoE block") as err:
        from_hf(torch.nn.Linear(4, 4))
    for name in ("MixtralSparseMoeBlock", "Glm4MoeMoE", "LongcatFlashMoE", "JetMoeAttention"):
        assert name in str(err.value)  # every block from_hf converts is listed


def _tiny_mixtral(**kw):
    cfg = MixtralConfig(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=F,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        **kw,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    return model


def test_patch_model_keeps_logits_params_keys_and_aux_loss():
    model = _tiny_mixtral()
    ids = torch.randint(0, 64, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # padding: HF's aux loss leaves it out
    before = model(ids, attention_mask=mask, labels=ids)
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    replaced = patch_model(model)
    assert replaced == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(layer.mlp, MoE) for layer in model.model.layers)
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())

    after = model(ids, attention_mask=mask, labels=ids)
    for what in ("logits", "aux_loss", "loss"):
        a, b = getattr(after, what), getattr(before, what)
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item(), what
    assert len(after.router_logits) == 2
    for a, b in zip(after.router_logits, before.router_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # The optimizer made before the patch trains the patched model.
    w = model.model.layers[0].mlp.experts.gate_up_proj
    w0 = w.detach().clone()
    after.loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0  # through the aux loss too
    opt.step()
    assert not torch.equal(w.detach(), w0)


def test_patched_model_matches_unpatched_gradients():
    ref, ours = _tiny_mixtral(), _tiny_mixtral()
    patch_model(ours)
    ids = torch.randint(0, 64, (2, 7))
    ref(ids, labels=ids).loss.backward()
    ours(ids, labels=ids).loss.backward()
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        scale = b.grad.abs().max().item()
        assert (a.grad - b.grad).abs().max().item() <= 1e-5 * max(scale, 1e-30), n


def test_experts_implementation_mixops():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["mixops"] is mixops_experts_forward
    eager = _tiny_mixtral()
    eager.set_experts_implementation("eager")
    ours = _tiny_mixtral()
    ours.set_experts_implementation("mixops")
    assert ours.config._experts_implementation == "mixops"
    ids = torch.randint(0, 64, (2, 9))
    with torch.profiler.profile() as prof:
        out = ours(ids, labels=ids)
    assert any("mixops::grouped_mm" in e.key for e in prof.key_averages())
    ref = eager(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for (n, a), (_, b) in zip(ours.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("transposed", [False, True])
def test_mixops_experts_with_biases_matches_hf_batched_mm(transposed):
    # Expert biases and [E, in, out] weights (GPT-OSS-style layouts), against HF's own
    # batched_mm implementation on the same module.
    from transformers.integrations.moe import batched_mm_experts_forward, use_experts_implementation

    E, k = 6, 2

    @use_experts_implementation(has_bias=True, is_transposed=transposed)
    class BiasedExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            shape1 = (E, H, 2 * F) if transposed else (E, 2 * F, H)
            shape2 = (E, F, H) if transposed else (E, H, F)
            self.gate_up_proj = torch.nn.Parameter(torch.randn(shape1) * 0.2)
            self.gate_up_proj_bias = torch.nn.Parameter(torch.randn(E, 2 * F) * 0.2)
            self.down_proj = torch.nn.Parameter(torch.randn(shape2) * 0.2)
            self.down_proj_bias = torch.nn.Parameter(torch.randn(E, H) * 0.2)
            self.act_fn = torch.nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("not used")

    cfg = MixtralConfig(hidden_size=H)
    experts = BiasedExperts(cfg)
    x = torch.randn(13, H)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(13)])
    w = torch.rand(13, k)
    outs = []
    for fn in (mixops_experts_forward, batched_mm_experts_forward):
        xi = x.clone().requires_grad_(True)
        for p in experts.parameters():
            p.grad = None
        y = fn(experts, xi, ids, w)
        y.sum().backward()
        outs.append([y.detach(), xi.grad] + [p.grad.clone() for p in experts.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
