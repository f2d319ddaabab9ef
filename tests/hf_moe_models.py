"""Tiny HF transformers models of every MoE family ``patch_model`` supports, for the tests that run
all of them (test_patch_model_order, test_autocast_hf). Import after checking transformers."""

from transformers import (
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

H = 32


def tiny_moe_families(initializer_range=None, deepseek_dense_first=False):
    """{family: a factory of a 2-layer model, hidden 32}. ``initializer_range``: HF's init std
    (default HF's); ``deepseek_dense_first``: DeepSeek-V3's first layer dense (its MoE second)."""
    common = dict(
        vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    if initializer_range is not None:
        common["initializer_range"] = initializer_range
    mla = dict(common, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
               qk_nope_head_dim=8)  # fmt: skip
    deepseek = dict(
        intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )  # fmt: skip
    return {
        "mixtral": lambda: MixtralForCausalLM(
            MixtralConfig(
                **common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2
            )
        ),
        "qwen2_moe": lambda: Qwen2MoeForCausalLM(
            Qwen2MoeConfig(
                **common,
                intermediate_size=48,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                num_experts=4,
                num_experts_per_tok=2,
            )  # fmt: skip
        ),
        "qwen3_moe": lambda: Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                **common,
                intermediate_size=48,
                moe_intermediate_size=16,
                num_experts=4,
                num_experts_per_tok=2,
                head_dim=8,
            )  # fmt: skip
        ),
        "olmoe": lambda: OlmoeForCausalLM(
            OlmoeConfig(
                **common,
                intermediate_size=24,
                num_experts=4,
                num_experts_per_tok=2,
                eos_token_id=None,
            )  # fmt: skip
        ),
        "deepseek_v3": lambda: DeepseekV3ForCausalLM(
            DeepseekV3Config(
                **mla, **deepseek, q_lora_rank=None, first_k_dense_replace=int(deepseek_dense_first)
            )  # fmt: skip
        ),
        "glm4_moe": lambda: Glm4MoeForCausalLM(
            Glm4MoeConfig(**common, **deepseek, head_dim=8, first_k_dense_replace=0)
        ),
        "jetmoe": lambda: JetMoeForCausalLM(
            JetMoeConfig(
                **{k: v for k, v in common.items() if k != "num_attention_heads"},
                kv_channels=8,
                num_local_experts=4,
                num_experts_per_tok=2,
                intermediate_size=24,
            )  # fmt: skip
        ),
        "longcat_flash": lambda: LongcatFlashForCausalLM(
            LongcatFlashConfig(
                **{k: v for k, v in mla.items() if k != "num_hidden_layers"},
                num_layers=2,
                ffn_hidden_size=48,
                expert_ffn_hidden_size=24,
                n_routed_experts=4,
                zero_expert_num=2,
                moe_topk=2,
                q_lora_rank=16,
                head_dim=8,
                routed_scaling_factor=2.5,
            )  # fmt: skip
        ),
    }
