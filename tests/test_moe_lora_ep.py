"""LoRA on ExpertParallelMoE (2 gloo ranks) against the single-process MoE with the same full
weights and adapters: outputs and gradients (the base frozen: none on it; each rank's adapter
gradients its experts' slice of the single-process ones; or the base trained too) in the dropless
chunked schedule and in capacity mode, compiled capacity mode; the adapters sharded with their
experts (Shard(0) DTensors of global shape, expert parameters, full state dicts); merge and
unmerge on the local shards; dtensor=False refused. One world for all (each spawn costs seconds)."""

import torch

from dist_harness import run_world, single_process_reference

H, F, E, K, R = 16, 12, 4, 2, 3
F64 = dict(dtype=torch.float64)
TOL = dict(rtol=1e-10, atol=1e-12)


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _pair(cap=None, num_chunks=1, freeze_base=True, **kw):
    """The single-process layer with adapters (random B) and the EP layer loaded from it."""
    from mixops.nn import MoE
    from mixops.parallel import ExpertParallelMoE

    torch.manual_seed(0)
    ref = MoE(H, F, E, K, capacity_factor=cap, **kw, **F64)
    ep = ExpertParallelMoE(H, F, E, K, capacity_factor=cap, num_chunks=num_chunks, **kw, **F64)
    for m in (ref, ep):
        m.add_lora(R, alpha=6, dropout=0.0, freeze_base=freeze_base)
    with torch.no_grad():
        ref.experts_lora.gate_up_B.normal_()
        ref.experts_lora.down_B.normal_()
    ep.load_full_state_dict(ref.state_dict())
    return ref, ep


def _run(rank, world, ref, ep, cap, xs, model=None):
    """Forward and backward of sum(y^2) on both layers; compares the outputs, x's gradients and
    every parameter's (experts and adapters: this rank's slice; others: none when frozen)."""
    from torch.distributed.tensor import DTensor

    x = xs[rank].clone().requires_grad_(True)
    y = (ep if model is None else model)(x)
    y.square().sum().backward()
    want, gx = single_process_reference(ref, xs, rank, dropless=cap is None)
    torch.testing.assert_close(y, want, **TOL)
    torch.testing.assert_close(x.grad, gx, **TOL)
    sl = slice(rank * E // world, (rank + 1) * E // world)
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        want_g = ref_params[name].grad
        if not p.requires_grad:
            assert p.grad is None and want_g is None, f"rank {rank}: a gradient on frozen {name}"
            continue
        if name.startswith(("experts.", "experts_lora.")):
            assert isinstance(p, DTensor), name
            torch.testing.assert_close(_local(p.grad), want_g[sl], **TOL, msg=name)
            assert want_g[sl].abs().sum() > 0, name
    ref.zero_grad(set_to_none=True)
    ep.zero_grad(set_to_none=True)


def _cases(rank, world):
    from torch.distributed.tensor import DTensor, Shard

    from mixops.parallel import ExpertParallelMoE, expert_parameter_names

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(10, H, generator=g, **F64) for _ in range(world)]

    # dropless, two chunks, frozen base, zero and shared experts
    ref, ep = _pair(None, num_chunks=2, zero_experts=1, shared_ffn_size=8)
    _run(rank, world, ref, ep, None, xs)
    A = ep.experts_lora.down_A
    assert isinstance(A, DTensor) and A.placements == (Shard(0),) and A.shape == (E, R, F)
    assert _local(A).shape == (E // world, R, F)
    names = expert_parameter_names(ep)
    assert [n for n in names if "lora" in n] == [
        "experts_lora.gate_up_A", "experts_lora.gate_up_B", "experts_lora.down_A",
        "experts_lora.down_B",
    ]  # fmt: skip
    full = ep.full_state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=0, atol=0, msg=k)

    # merged on the local shards: the same output; unmerged: the weights back
    x = xs[rank]
    with torch.no_grad():
        y = ep(x)
        w = _local(ep.experts.gate_up_proj).clone()
        ep.merge_lora()
        torch.testing.assert_close(ep(x), y, **TOL)
        ep.unmerge_lora()
        torch.testing.assert_close(_local(ep.experts.gate_up_proj), w, rtol=0, atol=1e-15)

    # capacity mode, base trained too (every weight through the chunked schedule)
    ref, ep = _pair(0.75, freeze_base=False)
    _run(rank, world, ref, ep, 0.75, xs)

    # capacity mode compiled (functional collectives)
    ref, ep = _pair(1.0, num_chunks=2)
    _run(
        rank, world, ref, ep, 1.0, xs, model=torch.compile(ep, fullgraph=True, backend="aot_eager")
    )

    plain = ExpertParallelMoE(H, F, E, K, dtensor=False, **F64)
    try:
        plain.add_lora(2)
    except ValueError as e:
        assert "ExpertParallelMoE.add_lora: needs a layer built with dtensor=True" in str(e)
    else:
        raise AssertionError("dtensor=False add_lora did not raise")


def test_expert_parallel_lora_equals_single_process():
    run_world(_cases, 2)
