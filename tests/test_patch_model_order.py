"""patch_model keeps the order of HF's parameters, state-dict keys and buffers, for every family it
supports: an optimizer state saved before patching and loaded by position (torch.optim's
state_dict holds parameter indices, not names) must map each moment onto the same tensor after.
The reference is the unpatched model itself; buffers mixops adds (each MoE's non-persistent
``tokens_per_expert`` load counter) are left out of the comparison, everything else must be equal
in order and identity."""

import pytest
import torch

from helpers import TRANSFORMERS_MIN, TRANSFORMERS_REASON, skip_unsupported_transformers

transformers = pytest.importorskip(
    "transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON
)
from transformers import (  # noqa: E402
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    JetMoeConfig,
    JetMoeForCausalLM,
    LongcatFlashConfig,
    LongcatFlashForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from mixops.integrations.transformers import patch_model  # noqa: E402

skip_unsupported_transformers()

H = 32
COMMON = dict(
    vocab_size=64,
    hidden_size=H,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
DEEPSEEK = dict(
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
)

MODELS = {
    "mixtral": lambda: MixtralForCausalLM(
        MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    ),
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
        )
    ),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
        )
    ),
    "olmoe": lambda: OlmoeForCausalLM(
        OlmoeConfig(**COMMON, intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    ),
    "deepseek_v3": lambda: DeepseekV3ForCausalLM(
        DeepseekV3Config(
            **COMMON,
            **DEEPSEEK,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            v_head_dim=8,
            qk_nope_head_dim=8,
            first_k_dense_replace=1,  # a dense layer first: HF's layer order around it is kept
        )
    ),
    "glm4_moe": lambda: Glm4MoeForCausalLM(
        Glm4MoeConfig(**COMMON, **DEEPSEEK, head_dim=8, first_k_dense_replace=0)
    ),
    "jetmoe": lambda: JetMoeForCausalLM(
        JetMoeConfig(
            **{k: v for k, v in COMMON.items() if k != "num_attention_heads"},
            kv_channels=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=24,
        )
    ),
    "longcat_flash": lambda: LongcatFlashForCausalLM(
        LongcatFlashConfig(
            **{k: v for k, v in COMMON.items() if k != "num_hidden_layers"},
            num_layers=2,
            ffn_hidden_size=48,
            expert_ffn_hidden_size=24,
            n_routed_experts=4,
            zero_expert_num=2,
            moe_topk=2,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=2.5,
        )
    ),
}

# What mixops adds: MoE's load counter (non-persistent, so never in a state dict).
_ADDED_BUFFERS = ("tokens_per_expert",)


def _orders(model):
    return (
        [(n, id(p)) for n, p in model.named_parameters()],
        list(model.state_dict()),
        [
            (n, id(b))
            for n, b in model.named_buffers()
            if n.rpartition(".")[2] not in _ADDED_BUFFERS
        ],
    )


@pytest.mark.parametrize("family", list(MODELS))
def test_patch_model_keeps_hf_parameter_key_and_buffer_order(family):
    torch.manual_seed(0)
    model = MODELS[family]()
    params, keys, buffers = _orders(model)
    assert patch_model(model)  # something was patched
    after_params, after_keys, after_buffers = _orders(model)
    assert [n for n, _ in after_params] == [n for n, _ in params]
    assert after_params == params  # the same Parameter objects at the same positions
    assert after_keys == keys
    assert after_buffers == buffers


def test_optimizer_state_saved_before_patching_loads_onto_the_same_tensors():
    # The failure mode this order protects: Adam's moments are stored by parameter index.
    torch.manual_seed(0)
    model = MODELS["qwen3_moe"]()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(ids, labels=ids).loss.backward()
    opt.step()
    saved = opt.state_dict()
    by_name = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    patch_model(model)
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt2.load_state_dict(saved)
    for n, p in model.named_parameters():
        assert torch.equal(opt2.state[p]["exp_avg"], by_name[n]), n
