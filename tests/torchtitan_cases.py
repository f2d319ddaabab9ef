"""Cases for the torchtitan integration tests (test_torchtitan_layer.py, test_torchtitan_router.py).

Small torchtitan ``MoE.Config``s (its own config_utils, and GPT-OSS's as models/gpt_oss builds them),
torchtitan's layer and ``MixopsMoE`` with the same weights, and an independent float64 reference of
torchtitan's definition (torchtitan/models/common/moe.py, models/gpt_oss/moe.py) written here in
plain torch without its bf16 casts: the reference, not torchtitan's layer, is what both are judged
against. ``comfortable_input`` draws tokens whose routing margins are wide enough that bf16 rounding
cannot flip a choice, so low-precision comparisons see the same routing.

Import it only after ``helpers.require_torchtitan()``.
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchtitan.models.common.config_utils import (
    make_ffn_config,
    make_moe_config,
    make_routed_experts_config,
    make_router_config,
    make_token_dispatcher_config,
)
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.moe import RoutedExperts, TokenChoiceTopKRouter
from torchtitan.models.gpt_oss.moe import GptOssGroupedExperts, GptOssMoE
from torchtitan.protocols.module import Module

from helpers import assert_close_to_ref
from mixops.integrations.torchtitan import to_mixops

D, FFN, E = 32, 24, 8  # hidden, expert ffn, num_experts
SHARED_FFN = 40
# bf16 rounding moves a routing score by well under 0.01 at these scales (logits of std ~2).
BF16_MARGIN = 0.03


def _init(std, bias=False):
    out = {"weight": partial(nn.init.normal_, std=std)}
    if bias:
        out["bias"] = partial(nn.init.normal_, std=std)
    return out


def _experts_init():
    w = partial(nn.init.normal_, std=D**-0.5)
    return {"w1_EFD": w, "w3_EFD": w, "w2_EDF": partial(nn.init.normal_, std=FFN**-0.5)}


def moe_config(
    *,
    num_experts=E,
    top_k=2,
    score_func="softmax",
    route_norm=False,
    route_scale=1.0,
    groups=None,
    groups_kept=None,
    gate_bias=False,
    shared=False,
    load_balance_coeff=1e-3,
    force_balance=False,
):
    """torchtitan's ``MoE.Config`` from its config_utils (as deepseek_v3/qwen3 build theirs).
    The gate's logits have std ~2 so routing is decisive and the softmax not saturated."""
    router = make_router_config(
        dim=D,
        num_experts=num_experts,
        gate_param_init=_init(2 * D**-0.5, gate_bias),
        top_k=top_k,
        score_func=score_func,
        route_norm=route_norm,
        route_scale=route_scale,
        num_expert_groups=groups,
        num_limited_groups=groups_kept,
        bias=gate_bias,
    )
    router._debug_force_load_balance = force_balance
    routed = make_routed_experts_config(
        dim=D,
        hidden_dim=FFN,
        num_experts=num_experts,
        top_k=top_k,
        param_init=_experts_init(),
        comm_backend="standard",
    )
    shared_cfg = None
    if shared:
        shared_cfg = make_ffn_config(
            dim=D,
            hidden_dim=SHARED_FFN,
            w1_param_init=_init(D**-0.5),
            w2w3_param_init=_init(D**-0.5),
        )
    return make_moe_config(
        num_experts=num_experts,
        router=router,
        routed_experts=routed,
        shared_experts=shared_cfg,
        load_balance_coeff=load_balance_coeff,
    )


def gpt_oss_config(*, top_k=2, swiglu_limit=1.0):
    """``GptOssMoE.Config`` as torchtitan/models/gpt_oss/__init__.py builds it (biased gate,
    softmax with route norm, biased experts), small; ``swiglu_limit`` low enough to clamp."""
    w = partial(nn.init.normal_, std=D**-0.5)
    experts = GptOssGroupedExperts.Config(
        dim=D,
        hidden_dim=FFN,
        num_experts=E,
        swiglu_limit=swiglu_limit,
        param_init={
            "mlp1_weight_EGD": w,
            "mlp1_bias_EG": partial(nn.init.normal_, std=0.3),
            "mlp2_weight_EDF": partial(nn.init.normal_, std=FFN**-0.5),
            "mlp2_bias_ED": partial(nn.init.normal_, std=0.3),
        },
    )
    return GptOssMoE.Config(
        num_experts=E,
        load_balance_coeff=1e-3,
        routed_experts=RoutedExperts.Config(
            inner_experts=experts,
            token_dispatcher=make_token_dispatcher_config(
                num_experts=E, top_k=top_k, comm_backend="standard", hidden_dim=D
            ),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=E,
            score_func="softmax",
            route_norm=True,
            gate=Linear.Config(
                in_features=D, out_features=E, bias=True, param_init=_init(2 * D**-0.5, True)
            ),
            top_k=top_k,
        ),
    )


def expert_bias(seed=1):
    """A nonzero expert bias [E] of the size of the score gaps, so it changes choices."""
    return 0.2 * torch.randn(E, generator=torch.Generator().manual_seed(seed))


def build_pair(cfg, *, expert_dtype="bfloat16", expert_bias=None, dtype=torch.float32):
    """(torchtitan's layer, ours) built from ``cfg`` with the same weights, in ``dtype``."""
    tt = cfg.build()
    tt.init_states()
    if expert_bias is not None:
        with torch.no_grad():
            tt.expert_bias_E.copy_(expert_bias)
    ours = to_mixops(cfg, expert_dtype=expert_dtype).build()
    ours.load_state_dict(tt.state_dict())
    return tt.to(dtype), ours.to(dtype)


# The float64 reference of torchtitan's definition.


def ref_params(module, dtype=torch.float64):
    return {n: t.detach().to(dtype).requires_grad_() for n, t in module.named_parameters()}


def ref_bias(module, dtype=torch.float64):
    b = module.expert_bias_E
    return None if b is None else b.detach().to(dtype)


def _scores(r, p, x_TD):
    logits = x_TD @ p["router.gate.weight"].T
    if "router.gate.bias" in p:
        logits = logits + p["router.gate.bias"]
    return logits.sigmoid() if r.score_func == "sigmoid" else logits.softmax(-1)


def _choice(r, scores, bias):
    """Scores the choice is made on ([T, E]): + expert bias, other groups than the
    num_limited_groups best (by their two best experts' sum) at -inf; and the group scores."""
    choice = scores.detach() if bias is None else scores.detach() + bias
    if r.num_expert_groups is None:
        return choice, None
    grouped = choice.unflatten(-1, (r.num_expert_groups, -1))
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    kept = group_scores.topk(r.num_limited_groups, dim=-1).indices
    drop = torch.ones_like(group_scores, dtype=torch.bool).scatter(-1, kept, False)
    return grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(-2), group_scores


def ref_route(cfg, p, bias, x_TD):
    """(weights [T, K], expert ids [T, K]) of torchtitan's TokenChoiceTopKRouter."""
    r = cfg.router
    scores = _scores(r, p, x_TD)
    ids = _choice(r, scores, bias)[0].topk(r.top_k, dim=-1).indices
    if r._debug_force_load_balance:
        T = x_TD.shape[0]
        ids = torch.arange(T * r.top_k).reshape(T, r.top_k) % r.num_experts
    w = scores.gather(-1, ids)
    if r.route_norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * r.route_scale, ids


def _expert(cfg, p, e, x):
    pre = "routed_experts.inner_experts."
    if isinstance(cfg.routed_experts.inner_experts, GptOssGroupedExperts.Config):
        limit = cfg.routed_experts.inner_experts.swiglu_limit
        h = x @ p[pre + "mlp1_weight_EGD"][e].T + p[pre + "mlp1_bias_EG"][e]
        glu = h[:, 0::2].clamp(max=limit)
        lin = h[:, 1::2].clamp(min=-limit, max=limit)
        a = glu * torch.sigmoid(1.702 * glu) * (lin + 1)
        return a @ p[pre + "mlp2_weight_EDF"][e].T + p[pre + "mlp2_bias_ED"][e]
    a = F.silu(x @ p[pre + "w1_EFD"][e].T) * (x @ p[pre + "w3_EFD"][e].T)
    return a @ p[pre + "w2_EDF"][e].T


def ref_moe(cfg, p, bias, x_BLD):
    """torchtitan's MoE forward: route, per-expert loop, weighted sum, + shared experts."""
    x = x_BLD.reshape(-1, x_BLD.shape[-1])
    w, ids = ref_route(cfg, p, bias, x)
    y = torch.zeros_like(x)
    for e in range(cfg.num_experts):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel():
            y = y.index_add(0, tok, _expert(cfg, p, e, x[tok]) * w[tok, slot, None])
    if cfg.shared_experts is not None:
        s = "shared_experts."
        h = F.silu(x @ p[s + "w1.weight"].T) * (x @ p[s + "w3.weight"].T)
        y = y + h @ p[s + "w2.weight"].T
    return y.reshape(x_BLD.shape)


def _grads(x, params):
    out = {"x": x.grad}
    for n, t in params:
        out[n] = torch.zeros_like(t) if t.grad is None else t.grad
    return out


def run_ref(cfg, module, x, grad_out, dtype=torch.float64):
    """Output and gradients (``"x"`` and every parameter by name) of the reference on
    ``module``'s weights and buffers, computed in ``dtype`` (float64 unless a plain-torch
    low-precision baseline is wanted)."""
    p = ref_params(module, dtype)
    xr = x.detach().to(dtype).requires_grad_()
    y = ref_moe(cfg, p, ref_bias(module, dtype), xr)
    y.backward(grad_out.to(dtype))
    return y.detach(), _grads(xr, p.items())


def run_module(module, x, grad_out):
    """Output and gradients (as ``run_ref``) of ``module`` at ``x``'s dtype."""
    module.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    y = module(xi)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), _grads(xi, module.named_parameters())


def ref_ids(cfg, module, x):
    """The reference's chosen experts [T, K] (sorted) for ``module``'s weights."""
    x_TD = x.detach().double().reshape(-1, x.shape[-1])
    return ref_route(cfg, ref_params(module), ref_bias(module), x_TD)[1].sort(-1).values


def routing_margin(cfg, module, x_TD):
    """Per token, the narrowest gap the routing decision rests on, in float64: between the k-th
    and (k+1)-th choice score, and between the last kept group's score and the next one's
    (inf where nothing is decided)."""
    r = cfg.router
    T = x_TD.shape[0]
    margin = torch.full((T,), float("inf"), dtype=torch.float64)
    if r._debug_force_load_balance:
        return margin
    choice, group_scores = _choice(
        r, _scores(r, ref_params(module), x_TD.double()), ref_bias(module)
    )
    top = choice.topk(min(r.top_k + 1, r.num_experts), dim=-1).values
    if r.top_k < r.num_experts:
        # (inf where fewer than top_k + 1 experts are left in the kept groups)
        margin = torch.minimum(margin, top[:, r.top_k - 1] - top[:, r.top_k])
    if group_scores is not None and r.num_limited_groups < r.num_expert_groups:
        g = group_scores.topk(r.num_limited_groups + 1, dim=-1).values
        margin = torch.minimum(margin, g[:, -2] - g[:, -1])
    return margin


def comfortable_input(cfg, module, shape, dtype, margin=BF16_MARGIN, seed=0):
    """x of ``shape`` in ``dtype`` whose every token has a routing margin > ``margin`` under
    ``module``'s weights (computed from the ``dtype``-rounded values)."""
    gen = torch.Generator().manual_seed(seed)
    T = 1
    for s in shape[:-1]:
        T *= s
    pool = torch.randn(8 * T + 32, shape[-1], generator=gen).to(dtype)
    ok = pool[routing_margin(cfg, module, pool) > margin][:T]
    assert ok.shape[0] == T, f"only {ok.shape[0]} of {T} tokens have a routing margin > {margin}"
    return ok.reshape(shape)


def assert_fp64_close(ours, ref, what):
    """float64 against the float64 reference: summation order only (atol floor 1e-10)."""
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


def check_fp64(cfg, ours, x, what):
    """Ours in float64 against the reference: output and every gradient. Returns ours' grads."""
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    y, grads = run_module(ours, x, grad_out)
    y_ref, grads_ref = run_ref(cfg, ours, x, grad_out)
    assert_fp64_close(y, y_ref, f"{what}: output")
    assert grads.keys() == grads_ref.keys()
    for k, g in grads.items():
        assert_fp64_close(g, grads_ref[k], f"{what}: grad {k}")
    return grads


def check_vs_torchtitan(cfg, tt, ours, xs, what):
    """The tolerance rule, torchtitan's layer the low-precision baseline, over the outputs and
    gradients of the calls on ``xs`` (stacked: a call on one token is judged over many such
    calls, not on a handful of roundings); the per-expert counts equal torchtitan's."""
    runs = {"ours": [], "tt": [], "ref": []}
    for x in xs:
        grad_out = torch.randn(x.shape).to(x.dtype)
        results = {
            "ours": run_module(ours, x, grad_out),
            "tt": run_module(tt, x, grad_out),
            "ref": run_ref(cfg, tt, x, grad_out),
        }
        for key, (y, grads) in results.items():
            runs[key].append({"output": y, **grads})
    assert torch.equal(ours.tokens_per_expert_E, tt.tokens_per_expert_E), f"{what}: counts"
    stacked = {k: {n: torch.stack([r[n] for r in v]) for n in v[0]} for k, v in runs.items()}
    for n, t in stacked["ours"].items():
        assert t.dtype == stacked["tt"][n].dtype, f"{what}: {n} dtype"
        assert_close_to_ref(t, stacked["ref"][n], stacked["tt"][n], f"{what}: {n}")


# A small torchtitan model for the expert-parallel tests (test_torchtitan_ep.py).


class MathAttention(Module):
    """Causal softmax attention in plain torch (torchtitan's attention backends are flex, with no
    CPU backward, or varlen, CUDA only), with grouped-query heads and the log-sum-exp that
    GPT-OSS's sinks take (``out_transform``)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        pass

    def __init__(self, config):
        super().__init__()

    def forward(self, q, k, v, *, scale=None, out_transform=None, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, head_dim]
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
        s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        lse = s.logsumexp(-1)
        out = ((s - lse.unsqueeze(-1)).exp() @ v).transpose(1, 2)
        return out if out_transform is None else out_transform(out, lse.transpose(1, 2))


def ep_model_config(*, num_layers=3, num_experts=8, top_k=3, heads=2):
    """deepseek_v3's debug model (softmax top-3 of 8 experts, two shared experts, MLA), cut to
    ``num_layers`` (one dense, the rest MoE) and ``heads`` MLA heads, with torchtitan's sharding
    configs for expert parallelism (as its trainer sets them before applying overrides) and
    plain-torch attention."""
    from torchtitan.models.deepseek_v3 import model_registry
    from torchtitan.models.deepseek_v3.sharding import set_deepseek_v3_sharding_config

    cfg = model_registry("debugmodel", moe_comm_backend="standard").model
    cfg.layers = cfg.layers[:num_layers]
    for layer in cfg.layers:
        a = layer.attention  # MLA without q LoRA: wq, wkv_b, wo
        a.n_heads, a.wq.out_features = heads, heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        a.wkv_b.out_features = heads * (a.qk_nope_head_dim + a.v_head_dim)
        a.wo.in_features = heads * a.v_head_dim
        if layer.moe is not None:
            moe = layer.moe
            moe.num_experts = moe.router.num_experts = num_experts
            moe.router.gate.out_features = num_experts
            moe.routed_experts.inner_experts.num_experts = num_experts
            moe.routed_experts.token_dispatcher.num_experts = num_experts
            moe.router.top_k = moe.routed_experts.token_dispatcher.top_k = top_k
    set_deepseek_v3_sharding_config(cfg, enable_sp=False, enable_ep=True)
    for layer in cfg.layers:  # after the sharding configs: no local_map on it
        layer.attention.inner_attention = MathAttention.Config()
    return cfg
