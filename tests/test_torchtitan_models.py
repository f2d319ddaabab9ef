"""torchtitan's MoE models with the mixops override (mixops.integrations.torchtitan): each of
MODELS from torchtitan's registry, built as torchtitan builds it and after ``use_mixops(cfg,
expert_dtype=None)``, agrees in float64 (state dicts, logits, every gradient, expert counts, the
load-balancing update); DCP checkpoints load either way; the bf16 default meets tests/helpers.py's
rule against torchtitan's bf16 layer; the layer compiles; Qwen3.5's configs and MoE layer agree.

The float64 reference is torchtitan with its casts taken out here (the experts' bf16 ones, by a
per-expert loop from their definitions, and combine's float32 one). torchtitan's attention runs
flex (no CPU backward) or varlen (CUDA) only, so both models get ``torchtitan_cases.MathAttention``. Qwen3.5 runs
fla's Triton GatedDeltaNet kernels in 3 of 4 layers (fla is stubbed for the import if missing).
"""

from helpers import require_torchtitan

require_torchtitan()

import importlib.util  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from dataclasses import fields  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.checkpoint import state_dict as dcp_state  # noqa: E402
from torchtitan.components.optimizer import register_moe_load_balancing_hook  # noqa: E402
from torchtitan.models.common.moe import GroupedExperts, MoE  # noqa: E402
from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher  # noqa: E402
from torchtitan.models.gpt_oss.moe import GptOssGroupedExperts, swiglu  # noqa: E402

import torchtitan_cases as tc  # noqa: E402
from helpers import assert_close_to_ref  # noqa: E402
from mixops.integrations import torchtitan_moe  # noqa: E402
from mixops.integrations.torchtitan import MixopsMoE, to_mixops, use_mixops  # noqa: E402

B, L = 2, 16  # tokens per forward: B * L
pytestmark = pytest.mark.filterwarnings(
    "ignore:In CPU autocast:UserWarning", "ignore:torch.distributed is disabled:UserWarning"
)


# ---- the models, from torchtitan's registries ---------------------------------------------------

# name: (torchtitan.models.<module>, flavour, changes besides keeping the first two layers)
MODELS = {
    # softmax top-3 of 8, two shared experts; dense + first MoE layer; 2 MLA heads, not 16
    "deepseek_v3": ("deepseek_v3", "debugmodel", {"mla_heads": 2}),
    # routed as the 671B flavour: sigmoid, 8 groups keep 4, route norm, scale 2.5 (16 experts)
    "deepseek_v3_671b_routing": (
        "deepseek_v3",
        "debugmodel",
        {"mla_heads": 2, "num_experts": 16, "top_k": 4, "router_of": "671B"},
    ),
    # text only (no vision encoder), routed as Kimi-K2.5: sigmoid, route norm, scale 2.827
    "kimi_k2_7": ("kimi_k2_7", "debugmodel", {"mla_heads": 2, "router_of": "Kimi-K2.5"}),
    # softmax top-8, route norm, no shared experts; 16 experts of hidden 256, not 64 of 768
    "qwen3": ("qwen3", "debugmodel_moe", {"num_experts": 16, "inner": {"hidden_dim": 256}}),
    # biased gate and experts, sinks, clamped SwiGLU (limit 7 never clamps at this init's scale)
    "gpt_oss": ("gpt_oss", "debugmodel", {"inner": {"hidden_dim": 256, "swiglu_limit": 0.1}}),
}


def _moe_configs(cfg):
    return [layer.moe for layer in cfg.layers if layer.moe is not None]


def _config(name):
    module, flavour, change = MODELS[name]
    registry = importlib.import_module(f"torchtitan.models.{module}").model_registry
    cfg = registry(flavour, moe_comm_backend="standard").model
    cfg.layers = cfg.layers[:2]
    if hasattr(cfg, "vision_encoder"):
        cfg.vision_encoder = None
    for layer in cfg.layers if "mla_heads" in change else []:
        a, h = layer.attention, change["mla_heads"]  # MLA without q LoRA: wq, wkv_b, wo
        a.n_heads, a.wq.out_features = h, h * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        a.wkv_b.out_features = h * (a.qk_nope_head_dim + a.v_head_dim)
        a.wo.in_features = h * a.v_head_dim
    big = registry(change["router_of"]).model.layers[-1].moe if "router_of" in change else None
    for moe in _moe_configs(cfg):
        router, inner = moe.router, moe.routed_experts.inner_experts
        E = change.get("num_experts", moe.num_experts)
        moe.num_experts = router.num_experts = router.gate.out_features = inner.num_experts = E
        router.top_k = change.get("top_k", router.top_k)
        moe.routed_experts.token_dispatcher.num_experts = E
        moe.routed_experts.token_dispatcher.top_k = router.top_k
        for f, value in change.get("inner", {}).items():
            setattr(inner, f, value)
        for f in ("score_func", "num_expert_groups", "num_limited_groups", "route_norm"):
            setattr(router, f, getattr(big.router, f) if big else getattr(router, f))
        router.route_scale = big.router.route_scale if big else router.route_scale
    return cfg


def _apply_override(cfg, **kwargs):
    """use_mixops on ``cfg``: every MoE config becomes a MixopsMoE.Config holding the very same
    option objects (torchtitan's derive copies by reference) and ``expert_dtype``."""
    before = [layer.moe for layer in cfg.layers]
    assert len(use_mixops(cfg, **kwargs)) == len(_moe_configs(cfg))
    for old, layer in zip(before, cfg.layers):
        assert (old is None) == (layer.moe is None)
        if old is not None:
            assert type(layer.moe) is MixopsMoE.Config, type(layer.moe)
            assert layer.moe.expert_dtype == kwargs["expert_dtype"], layer.moe.expert_dtype
            for f in fields(old):
                assert getattr(layer.moe, f.name) is getattr(old, f.name), f.name


def _build(name, *, mixops, seed=0):
    """Model ``name`` in float64 after torchtitan's init_states from ``seed``."""
    cfg = _config(name)
    for layer in cfg.layers:
        layer.attention.inner_attention = tc.MathAttention.Config()
    if mixops:
        _apply_override(cfg, expert_dtype=None)
    torch.manual_seed(seed)
    model = cfg.build()
    model.init_states()
    return model.double()


def _moe_layers(model):  # the MoE modules, torchtitan's or mixops' (a subclass)
    return [m for m in model.modules() if isinstance(m, MoE)]


def _layer_pair(cfg, dtype, **kwargs):
    """torchtitan's MoE layer from ``cfg`` and to_mixops(cfg)'s with its weights, in ``dtype``."""
    torch.manual_seed(0)
    ref = cfg.build()
    ref.init_states()
    ours = to_mixops(cfg, **kwargs).build().to(dtype)
    ours.load_state_dict(ref.to(dtype).state_dict())
    return ref.train(), ours.train()


# ---- the float64 reference: torchtitan without its casts -----------------------------------------


def _grouped_experts_fp64(self, x_RD, counts_E):
    """GroupedExperts.forward without its bfloat16 casts: w2 (silu(w1 x) * w3 x) per expert."""
    *parts, pad = x_RD.split(counts_E.tolist() + [len(x_RD) - int(counts_E.sum())])
    w1, w2, w3 = self.w1_EFD, self.w2_EDF, self.w3_EFD
    out = [(F.silu(x @ w1[e].T) * (x @ w3[e].T)) @ w2[e].T for e, x in enumerate(parts)]
    return torch.cat(out + [torch.zeros_like(pad)])


def _gpt_oss_experts_fp64(self, x_RD, counts_E):
    """GptOssGroupedExperts.forward without its casts: W2 swiglu(W1 x + b1) + b2 per expert."""
    *parts, pad = x_RD.split(counts_E.tolist() + [len(x_RD) - int(counts_E.sum())])
    out = []
    for e, x in enumerate(parts):
        h = swiglu(x @ self.mlp1_weight_EGD[e].T + self.mlp1_bias_EG[e], limit=self.swiglu_limit)
        out.append(h @ self.mlp2_weight_EDF[e].T + self.mlp2_bias_ED[e])
    return torch.cat(out + [torch.zeros_like(pad)])


def _combine_fp64(self, routed_output_RD, metadata, x_TD):
    """LocalTokenDispatcher.combine without rounding the expert outputs to float32 first."""
    y_RD = routed_output_RD * metadata.topk_scores_experts_sorted_N.reshape(-1, 1)
    return torch.zeros_like(x_TD).index_add(0, metadata.token_indices_experts_sorted_N, y_RD)


@pytest.fixture
def ref_experts(monkeypatch):
    """Patches torchtitan into the float64 reference; call it to apply."""

    def apply():
        monkeypatch.setattr(GroupedExperts, "forward", _grouped_experts_fp64)
        monkeypatch.setattr(GptOssGroupedExperts, "forward", _gpt_oss_experts_fp64)
        monkeypatch.setattr(LocalTokenDispatcher, "combine", _combine_fp64)

    return apply


def _exact(ours, ref, what):
    """float64 vs float64 at the reference's scale, to the rule's float64 atol (1e-10)."""
    s = ref.abs().max().clamp_min(1e-300)
    assert_close_to_ref(ours / s, ref / s, ref / s, what)


def _tokens(model):
    g = torch.Generator().manual_seed(1)
    return torch.randint(model.config.vocab_size, (B, L + 1), generator=g)


def _assert_same_step(ours, ref, tokens, what):
    """Logits of tokens[:, :-1] and every gradient of the next-token cross entropy agree."""
    out = []
    for model in (ours, ref):
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        out.append([("logits", logits)] + [(n, p.grad) for n, p in model.named_parameters()])
    for (n, a), (n_ref, r) in zip(*out, strict=True):
        assert n == n_ref and a is not None and r is not None, f"{what}: {n} / {n_ref}"
        _exact(a.detach(), r.detach(), f"{what} {n}")


def _layer_grads(layer, x):
    """A MoE layer's output and its input's and parameters' gradients for a fixed output grad."""
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
    out = {"output": y, "input grad": x.grad} | {n: p.grad for n, p in layer.named_parameters()}
    return {n: t.detach().clone() for n, t in out.items()}


def _balance(model):
    """torchtitan's load-balancing update: the optimizer pre-hook it registers, run once."""
    hooks = []
    optimizers = types.SimpleNamespace(register_step_pre_hook=hooks.append)
    dims = types.SimpleNamespace(get_optional_mesh=lambda name: None, ep_enabled=False, tp=1)
    register_moe_load_balancing_hook(optimizers, [model], dims)
    (hook,) = hooks
    hook()


# ---- 1. the models end to end --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_torchtitan_fp64(name, ref_experts):
    ref_experts()
    ref, ours = _build(name, mixops=False), _build(name, mixops=True)
    moes, ref_moes = _moe_layers(ours), _moe_layers(ref)
    assert moes and all(type(m) is MixopsMoE for m in moes) and len(moes) == len(ref_moes)
    assert not any(isinstance(m, MixopsMoE) for m in ref.modules())
    # The same names, and the same initial values: init_states runs the same initialisers.
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(sd[k], v), f"init differs at {k}"
    tokens = _tokens(ref)
    ours.train(), ref.train()
    _assert_same_step(ours, ref, tokens, name)
    for m, r in zip(moes, ref_moes):  # one forward's T * top_k slots, counted the same
        assert torch.equal(m.tokens_per_expert_E, r.tokens_per_expert_E)
        assert m.tokens_per_expert_E.sum().item() == B * L * m.router.top_k
    # torchtitan's load-balancing update reads and writes the same buffers ...
    _balance(ours), _balance(ref)
    for m, r in zip(moes, ref_moes):
        assert m.expert_bias_E.abs().sum() > 0 and not m.tokens_per_expert_E.any()
        assert torch.equal(m.expert_bias_E, r.expert_bias_E)
    # ... and the biased routing agrees too.
    with torch.no_grad():
        _exact(ours(tokens), ref(tokens), f"{name} logits after the bias update")


# ---- 2. the bfloat16 default against torchtitan's own bf16 layer ---------------------------------


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("deepseek_v3_671b_routing", torch.float32),
        ("qwen3", torch.float32),
        # torchtitan's GPT-OSS experts return bfloat16 (no type_as), which its combine cannot
        # scatter-add into a float32 output: it runs on bf16 activations only (FSDP's mixed
        # precision). A bf16 gate routes unlike the float64 reference: balanced debug routing.
        ("gpt_oss", torch.bfloat16),
    ],
)
def test_layer_bf16_default(name, dtype, ref_experts, monkeypatch):
    """One MoE layer, experts in bfloat16 (the default): mixops' error against the float64
    cast-free layer is at most twice torchtitan's own plus atol (tests/helpers.py)."""
    cfg = _moe_configs(_config(name))[0]
    cfg.router._debug_force_load_balance = balanced = dtype == torch.bfloat16
    cfg.router.route_scale *= 1.5 if balanced else 1.0  # GPT-OSS's is 1
    ref, ours = _layer_pair(cfg, dtype)
    x = torch.randn(B, L, cfg.routed_experts.inner_experts.dim).to(dtype)
    lowp = _layer_grads(ref, x)  # torchtitan's experts, with their bf16 casts
    seen, gmm = [], torchtitan_moe.grouped_mm  # the dtypes of mixops' expert GEMMs
    monkeypatch.setattr(
        torchtitan_moe, "grouped_mm", lambda a, *r: seen.append(a.dtype) or gmm(a, *r)
    )
    mine = _layer_grads(ours, x)
    assert set(seen) == {torch.bfloat16}, seen
    ref_experts()
    hi = _layer_grads(ref.double(), x.double())
    for n, h in hi.items():
        assert_close_to_ref(mine[n], h, lowp[n], f"{name} {n}")


# ---- 3. DCP checkpoints, either way ---------------------------------------------------------------


def _load_and_compare(model, path, src, what):
    sd = dcp_state.get_model_state_dict(model)
    dcp.load(sd, checkpoint_id=path, no_dist=True)
    dcp_state.set_model_state_dict(model, sd)
    sd = model.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(sd[k], v), f"{what}: {k} not loaded"
    tokens = _tokens(src)
    with torch.no_grad():
        _exact(model(tokens), src(tokens), f"{what}: logits")


def test_dcp_round_trip(tmp_path, ref_experts):
    """DCP in one process (no process group): torchtitan's checkpoint loads into mixops' model,
    mixops' into torchtitan's and mixops'; targets start from other weights; the bias travels."""
    ref_experts()
    titan = _build("deepseek_v3", mixops=False, seed=0)
    ours, other = (_build("deepseek_v3", mixops=True, seed=s) for s in (1, 2))
    for i, model in enumerate((titan, ours)):
        with torch.no_grad():
            for m in _moe_layers(model):
                m.expert_bias_E.normal_(0.0, 0.05)  # persistent, and it changes the routing
        sd = dcp_state.get_model_state_dict(model)
        dcp.save(sd, checkpoint_id=tmp_path / str(i), no_dist=True)
    _load_and_compare(other, tmp_path / "0", titan, "torchtitan -> mixops")
    _load_and_compare(titan, tmp_path / "1", ours, "mixops -> torchtitan")
    _load_and_compare(other, tmp_path / "1", ours, "mixops -> mixops")


# ---- 4. torch.compile ------------------------------------------------------------------------------


def test_compile_layer():
    """torch.compile(fullgraph=True) of MixopsMoE (DeepSeek-V3's) gives eager's outputs, grads and
    counts; aot_eager traces the ops' fake/autograd registrations without inductor's 20 s."""
    cfg = _moe_configs(_config("deepseek_v3"))[0]
    _, layer = _layer_pair(cfg, torch.float32)
    x = torch.randn(B, L, cfg.routed_experts.inner_experts.dim)
    eager = _layer_grads(layer, x)
    counts = layer.tokens_per_expert_E.clone()
    compiled = _layer_grads(torch.compile(layer, fullgraph=True, backend="aot_eager"), x)
    for (n, e), c in zip(eager.items(), compiled.values()):  # compiled names: _orig_mod.*
        assert torch.equal(c, e), n
    assert counts.sum() == B * L * cfg.router.top_k, counts
    assert torch.equal(layer.tokens_per_expert_E, 2 * counts)


# ---- 5. Qwen3.5: its configs and its MoE layer ----------------------------------------------------

_FLA_STUBS = {  # what torchtitan.models.qwen3_5.model imports from fla (Triton kernels)
    "fla.modules.conv.triton.ops": "CausalConv1dFunction",
    "fla.ops.gated_delta_rule": "chunk_gated_delta_rule fused_recurrent_gated_delta_rule",
    "fla.ops.gated_delta_rule.chunk": "ChunkGatedDeltaRuleFunction",
    "fla.ops.gated_delta_rule.fused_recurrent": "FusedRecurrentFunction",
}


@pytest.fixture
def qwen3_5(monkeypatch):
    """torchtitan.models.qwen3_5, importing stubs for fla when it is not installed; the modules
    that imported them are dropped afterwards."""
    loaded = set(sys.modules)
    for name, attrs in _FLA_STUBS.items() if importlib.util.find_spec("fla") is None else ():
        parts = name.split(".")
        for prefix in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if prefix not in sys.modules:
                monkeypatch.setitem(sys.modules, prefix, types.ModuleType(prefix))
        for attr in attrs.split():
            setattr(sys.modules[name], attr, type(attr, (torch.autograd.Function,), {}))
    yield importlib.import_module("torchtitan.models.qwen3_5")
    for name in set(sys.modules) - loaded:
        if name.startswith("torchtitan.models.qwen3_5"):
            del sys.modules[name]
    if "torchtitan.models.qwen3_5" not in loaded:
        delattr(sys.modules["torchtitan.models"], "qwen3_5")


def test_qwen3_5(qwen3_5, ref_experts):
    """Qwen3.5's debugmodel_moe: all MoE configs replaced, options kept; its MoE layer (softmax
    top-2 of 8, route norm, sigmoid-gated shared expert) matches torchtitan's in float64."""
    cfg = qwen3_5.model_registry("debugmodel_moe", moe_comm_backend="standard").model
    moe = cfg.layers[0].moe
    _apply_override(cfg, expert_dtype="bfloat16")
    ref, ours = _layer_pair(moe, torch.float64, expert_dtype=None)
    ref_experts()
    x = torch.randn(B, L, moe.routed_experts.inner_experts.dim, dtype=torch.float64)
    mine, theirs = _layer_grads(ours, x), _layer_grads(ref, x)
    for n, r in theirs.items():
        _exact(mine[n], r, f"qwen3_5 layer {n}")
    assert torch.equal(ours.tokens_per_expert_E, ref.tokens_per_expert_E)
