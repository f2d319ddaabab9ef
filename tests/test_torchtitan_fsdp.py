"""The torchtitan override under FSDP2 (``fully_shard``, as torchtitan shards its blocks): two gloo
ranks over loopback train the mixops layer on different tokens, and the gradients FSDP reduces
equal those of the unsharded layer on all ranks' tokens (the mean of the ranks' losses), in
float64; the load counters stay per rank. A run past the harness deadline fails, never hangs."""

from helpers import require_torchtitan

require_torchtitan()

from functools import partial  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchtitan.models.common.config_utils import (  # noqa: E402
    make_ffn_config,
    make_moe_config,
    make_routed_experts_config,
    make_router_config,
)

from dist_harness import run_world  # noqa: E402
from mixops.integrations.torchtitan import MixopsMoE, to_mixops  # noqa: E402

E, K, D, F, T = 8, 2, 16, 24, 12


def _config():
    init = partial(nn.init.trunc_normal_, std=0.2)
    return make_moe_config(
        num_experts=E,
        router=make_router_config(
            dim=D,
            num_experts=E,
            gate_param_init={"weight": init},
            top_k=K,
            score_func="sigmoid",
            route_norm=True,
            route_scale=1.5,
            num_expert_groups=4,
            num_limited_groups=2,
        ),
        routed_experts=make_routed_experts_config(
            dim=D,
            hidden_dim=F,
            num_experts=E,
            top_k=K,
            comm_backend="standard",
            param_init={"w1_EFD": init, "w2_EDF": init, "w3_EFD": init},
        ),
        shared_experts=make_ffn_config(
            dim=D,
            hidden_dim=2 * F,
            w1_param_init={"weight": init},
            w2w3_param_init={"weight": init},
        ),
    )


def _layer():
    torch.manual_seed(0)
    m = to_mixops(_config(), expert_dtype=None).build()
    m.init_states()
    with torch.no_grad():
        m.expert_bias_E.copy_(torch.linspace(-0.05, 0.05, E))
    return m.double().train()


def _tokens(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(1, T, D, generator=g, dtype=torch.float64)


def _fsdp_equals_unsharded(rank, world):
    from torch.distributed.fsdp import fully_shard

    ref = _layer()
    xs = [_tokens(r) for r in range(world)]
    ref_loss = sum(ref(x).square().sum() for x in xs) / world
    ref_loss.backward()

    m = _layer()
    assert isinstance(m, MixopsMoE)
    fully_shard(m)
    m(xs[rank]).square().sum().backward()
    grads = {n: p.grad.full_tensor() for n, p in m.named_parameters()}
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    # The counters are per rank (torchtitan all-reduces them in its optimizer hook).
    ref_counts = torch.zeros(E, dtype=torch.float32)
    plain = _layer()
    plain(xs[rank])
    ref_counts += plain.tokens_per_expert_E
    assert torch.equal(m.tokens_per_expert_E, ref_counts)
    assert m.tokens_per_expert_E.sum().item() == T * K


def test_fsdp2_gradients_equal_the_unsharded_layer():
    run_world(_fsdp_equals_unsharded, 2)
