"""patch_model on whole HF transformers models: all-or-nothing per block (a block mixops cannot
express stays exactly as it was, with a warning), DeepSeek-V3 with top_k above the experts of the
kept groups, meta-device initialisation (to_empty + init_weights, the FSDP2 / empty-weights path)
and set_experts_implementation after patching."""

import copy
import warnings

import pytest
import torch

from helpers import TRANSFORMERS_MIN, TRANSFORMERS_REASON, skip_unsupported_transformers

transformers = pytest.importorskip(
    "transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON
)
from transformers import DeepseekV3Config, MixtralConfig  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3ForCausalLM,
    DeepseekV3MoE,
    DeepseekV3TopkRouter,
)
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    MixtralForCausalLM,
    MixtralSparseMoeBlock,
    MixtralTopKRouter,
)

from mixops.integrations.transformers import from_hf, patch_model  # noqa: E402
from mixops.nn import MoE  # noqa: E402
from test_moe_init import garbage_memory  # noqa: E402,F401  (a fixture)

skip_unsupported_transformers()

H = 32


def _deepseek_config(**kw):
    cfg = dict(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=2.5,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        v_head_dim=8,
        qk_nope_head_dim=8,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        first_k_dense_replace=0,
        norm_topk_prob=True,
        max_position_embeddings=64,
    )
    cfg.update(kw)
    return DeepseekV3Config(**cfg)


def _deepseek(**kw):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(_deepseek_config(**kw)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    return model


def _mixtral():
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(cfg).eval()


def _ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _snapshot(model):
    """Each module's class and identity, and every parameter/buffer object, by name."""
    return (
        [(n, type(m), id(m)) for n, m in model.named_modules()],
        [(n, id(t)) for n, t in model.state_dict(keep_vars=True).items()],
    )


# ---- DeepSeek-V3 with top_k above the experts of the kept groups -----------------------------


def test_topk_of_all_experts_is_patched_and_equal():
    # HF transformers' own DeepSeek-V3 test numbers: 8 experts in 2 groups, 1 group kept, top-8.
    # HF masks the dropped group and still takes all 8 experts, so every expert is chosen with
    # its sigmoid score: group limiting changes nothing, and mixops expresses it exactly.
    model = _deepseek(num_experts_per_tok=8)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        assert patch_model(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
        after = model(ids).logits
        after_again = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, after_again)
    cfg = model.model.layers[0].mlp.router_config
    assert (cfg.top_k, cfg.num_experts, cfg.num_groups) == (8, 8, 1)


def test_topk_reaching_into_dropped_groups_stays_hf():
    # top-6 of 8 with only 4 experts in the kept group: HF fills the last 2 choices with experts
    # of the dropped group, ranking their -inf scores in torch.topk's unspecified tie order.
    # mixops cannot reproduce that: the blocks stay exactly as they were, with a warning.
    model = _deepseek(num_experts_per_tok=6)
    ids = _ids()
    snap = _snapshot(model)
    with torch.no_grad():
        before = model(ids).logits
    with pytest.warns(UserWarning) as record:
        assert patch_model(model) == []
    assert [str(w.message).split(" left")[0] for w in record] == [
        f"mixops.patch_model: model.layers.{i}.mlp" for i in range(2)
    ]
    assert all("top_k (6) is more than the 4 experts" in str(w.message) for w in record)
    assert _snapshot(model) == snap
    assert type(model.model.layers[0].mlp.gate) is DeepseekV3TopkRouter
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(ValueError, match=r"cannot convert.*top_k \(6\)"):
        from_hf(model.model.layers[0].mlp)


def test_from_hf_topk_of_all_experts_parity():
    torch.manual_seed(0)
    block = DeepseekV3MoE(_deepseek_config(num_experts_per_tok=8))
    for name, p in block.named_parameters():
        torch.nn.init.normal_(p, std=1.0 if name.startswith("gate.") else 0.2)
    block.gate.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(2, 7, H)
    with torch.no_grad():
        torch.testing.assert_close(from_hf(block)(x), block(x), rtol=1e-5, atol=1e-5)


# ---- all-or-nothing ---------------------------------------------------------------------------


def test_one_block_left_alone_the_others_patched():
    model = _mixtral()
    model.model.layers[1].mlp.jitter_noise = 0.1  # no mixops equivalent
    keep = model.model.layers[1].mlp
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.mlp.*jitter"):
        assert patch_model(model) == ["model.layers.0.mlp"]
    assert isinstance(model.model.layers[0].mlp, MoE)
    assert model.model.layers[1].mlp is keep
    assert type(keep) is MixtralSparseMoeBlock and type(keep.gate) is MixtralTopKRouter


def test_unknown_moe_block_warns_and_stays():
    class MyMoeBlock(torch.nn.Module):  # a router and experts, but not a block mixops knows
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(H, 4)
            self.experts = torch.nn.Linear(H, H)

    model = torch.nn.Sequential(MyMoeBlock())
    block = model[0]
    with pytest.warns(
        UserWarning,
        match=r"patch_model: 0 left as it is: MyMoeBlock is not a "
        r"supported MoE block",
    ):
        assert patch_model(model) == []
    assert model[0] is block and type(block.gate) is torch.nn.Linear


def test_bad_moe_options_change_nothing():
    model = _mixtral()
    ids = _ids()
    snap = _snapshot(model)
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ValueError, match="capacity_factor"):
        patch_model(model, capacity_factor=-1.0)
    assert _snapshot(model) == snap
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


# ---- meta-device initialisation ---------------------------------------------------------------


def test_meta_patch_to_empty_init_weights(garbage_memory):
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(_deepseek_config(num_experts_per_tok=2))
    assert patch_model(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    model.to_empty(device="cpu")
    model.init_weights()
    for layer in model.model.layers:
        moe = layer.mlp
        assert torch.equal(moe.tokens_per_expert, torch.zeros(8, dtype=torch.int64))
        assert torch.equal(moe.gate.e_score_correction_bias, torch.zeros(8))
        for name, t in moe.state_dict().items():
            assert torch.isfinite(t.float()).all(), name
    model.train()
    ids = _ids()
    model(ids)
    for layer in model.model.layers:  # the counter holds exactly this forward's choices
        assert int(layer.mlp.tokens_per_expert.sum()) == ids.numel() * 2
    load = model.model.layers[0].mlp.tokens_per_expert.float()
    used = model.model.layers[0].mlp.update_bias(1e-3)
    assert torch.equal(used, load)
    torch.testing.assert_close(
        model.model.layers[0].mlp.gate.e_score_correction_bias,
        1e-3 * torch.sign(load.mean() - load),
        rtol=0,
        atol=0,
    )


# ---- set_experts_implementation after patching -------------------------------------------------


def _counting(monkeypatch, names):
    """Wrap HF's experts functions ``names`` in the table HF dispatches through; returns the call
    counts (the mocks of HF's own test_eager_matches_batched_and_grouped_inference)."""
    from transformers.integrations import moe as hf_moe

    table = hf_moe.ALL_EXPERTS_FUNCTIONS._global_mapping
    calls = dict.fromkeys(names, 0)
    for n in names:

        def wrapped(*a, _n=n, _f=table[n], **k):
            calls[_n] += 1
            return _f(*a, **k)

        monkeypatch.setitem(table, n, wrapped)
    return calls


def test_set_experts_implementation_after_patch_reaches_the_patched_blocks(monkeypatch):
    model, hf = _mixtral(), _mixtral()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning before patching, none for blocks that follow
        model.set_experts_implementation("eager")
        patch_model(model)
        ids = _ids()
        calls = _counting(monkeypatch, ["batched_mm", "grouped_mm"])
        for impl in ("batched_mm", "grouped_mm", "eager"):
            model.set_experts_implementation(impl)
            hf.set_experts_implementation(impl)
            assert model.config._experts_implementation == impl  # HF's own effect happens
            before = dict(calls)
            with torch.no_grad():
                got = model(ids).logits
                for n in calls:  # HF's function for impl ran (once per layer), no other one
                    assert calls[n] - before[n] == (2 if n == impl else 0), (impl, n, calls)
                want = hf(ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        model.set_experts_implementation("mixops")  # back to mixops' grouped GEMMs
        before = dict(calls)
        with torch.no_grad():
            got = model(ids).logits
        assert calls == before
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert all(
            m.hf_experts_implementation == "mixops" for m in model.modules() if isinstance(m, MoE)
        )
    # Blocks patched by the base model's post_init first (HF builds the nested model first): the
    # outer model's set_experts_implementation reaches them too.
    nested = _mixtral()
    patch_model(nested.model)
    assert patch_model(nested) == []
    nested.set_experts_implementation("batched_mm")
    assert [m.hf_experts_implementation for m in nested.modules() if isinstance(m, MoE)] == [
        "batched_mm"
    ] * 2
    # A block with a capacity cannot follow HF's (dropless) experts: it stays mixops', and says so.
    capped = _mixtral()
    patch_model(capped, capacity_factor=1.0)
    with pytest.warns(UserWarning, match=r"set_experts_implementation\('grouped_mm'\).*layers"):
        capped.set_experts_implementation("grouped_mm")
    assert capped.config._experts_implementation == "grouped_mm"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capped.model.set_experts_implementation("mixops")  # nothing to warn about
    # A copy keeps the hooks, and they act on the copy, not on the original.
    clone = copy.deepcopy(model)
    for a, b in zip(model.model.layers, clone.model.layers):
        a.mlp.tokens_per_expert.fill_(3)
        b.mlp.tokens_per_expert.fill_(5)
    clone.init_weights()
    for a, b in zip(model.model.layers, clone.model.layers):
        assert torch.equal(b.mlp.tokens_per_expert, torch.zeros(8, dtype=torch.int64))
        assert torch.equal(a.mlp.tokens_per_expert, torch.full((8,), 3))
    clone.set_experts_implementation("batched_mm")
    assert all(
        m.hf_experts_implementation == "batched_mm" for m in clone.modules() if isinstance(m, MoE)
    )
    assert all(
        m.hf_experts_implementation == "mixops" for m in model.modules() if isinstance(m, MoE)
    )


# ---- expert choice is not causal ----------------------------------------------------------------


def test_router_option_is_refused_with_the_model_untouched():
    # The routing is the HF router's; expert choice would also leak later tokens in a decoder.
    model = _mixtral()
    snap = _snapshot(model)
    with pytest.raises(
        ValueError, match=r"patch_model: router= is not an option.*expert choice is not causal"
    ):
        patch_model(model, router="expert_choice", capacity_factor=1.0)
    assert _snapshot(model) == snap
    with pytest.raises(ValueError, match=r"from_hf: router= is not an option"):
        from_hf(model.model.layers[0].mlp, router="expert_choice", capacity_factor=1.0)


def _with_expert_choice_mlps(causal):
    """Mixtral with an expert-choice mixops MoE put in each decoder layer by hand (the way one
    reaches an HF decoder: patch_model keeps HF's token choice)."""
    model = _mixtral()
    torch.manual_seed(2)
    for layer in model.model.layers:
        layer.mlp = MoE(H, 24, 8, router="expert_choice", capacity_factor=1.0, causal=causal)
    return model


def _earlier_logits_move(model, ids, pos):
    """Whether some replacement of token ``pos`` changes the logits before it (one sequence per
    forward: expert choice also mixes the sequences of a batch)."""
    with torch.no_grad():
        base = model(ids).logits[:, :pos]
        for tok in range(16):
            other = ids.clone()
            other[0, pos] = tok
            if (model(other).logits[:, :pos] - base).abs().max() > 1e-4:
                return True
    return False


def test_expert_choice_in_a_decoder_sees_later_tokens_token_choice_does_not():
    ids = _ids()[:1]  # [1, 9]
    assert not _earlier_logits_move(_mixtral(), ids, 8)  # HF's token choice: causal
    assert _earlier_logits_move(_with_expert_choice_mlps(causal=False), ids, 8)


@pytest.mark.parametrize("causal", [None, True, False])
def test_expert_choice_in_a_decoder_warns_once_per_layer_when_generating(causal):
    # causal=None: the prefill ([batch, 9, hidden]) cannot tell; the first cached decoding step
    # ([batch, 1, hidden]) warns. causal=True: the first forward warns. False: never.
    model = _with_expert_choice_mlps(causal)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model.generate(_ids(), max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
    got = [str(w.message) for w in rec if "expert choice is not causal" in str(w.message)]
    assert len(got) == (0 if causal is False else 2), got
    why = {None: "a decoding step with a cache", True: "built with causal=True"}
    assert all(why[causal] in m for m in got)
