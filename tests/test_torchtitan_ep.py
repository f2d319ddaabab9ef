"""The torchtitan override under torchtitan's expert parallelism: two gloo ranks over loopback
train a small deepseek_v3 (tests/torchtitan_cases.ep_model_config: one dense and two MoE layers)
with torchtitan's ParallelDims(dp_shard=2, ep=2), its parallelize_deepseekv3 (expert weights
sharded over ep, FSDP2 over the rest), its AdamW container and load-balancing hook, 20 steps on a
fixed batch per rank.

The mixops override (its chunked all-to-all schedule) is held to torchtitan's own EP path by the
tolerance rule (tests/helpers.py): both in float32, the reference torchtitan's EP path in float64,
max|mixops - ref| <= 2 * max|torchtitan - ref| + 1e-5 over the 20 losses. torchtitan's experts
cast to bfloat16 whatever the model dtype; here they compute in the model dtype (a per-expert
loop), and in float64 its combine keeps float64 (no float32 round trip), so the reference is
float64 throughout. The per-expert counts of the first step equal torchtitan's exactly on each
rank. A DCP checkpoint at step 10 reloaded into a fresh model and optimizer continues exactly as
the run that was not interrupted. The same two fp32 runs under torchtitan's default SPMD backend,
spmd_types (as its trainer runs it: the dense and sparse meshes registered around forward and
backward, the inputs annotated), are held to the same reference by the same rule, with the same
counts. ep_num_chunks 1 and 3 give the same outputs and gradients; tensor parallelism, and ep with
context parallelism or the full_dtensor backend, are refused.
"""

from helpers import require_torchtitan

require_torchtitan()

import contextlib  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import torchtitan_cases as tc  # noqa: E402
from dist_harness import run_world  # noqa: E402
from helpers import assert_close_to_ref  # noqa: E402
from mixops.integrations.torchtitan import MixopsMoE, to_mixops, use_mixops  # noqa: E402

STEPS, RESUME_AT = 20, 10
B, L = 2, 16  # tokens per rank and step: B * L
LR = 5e-4
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


def _dims(**degrees):
    from torchtitan.distributed import ParallelDims

    backend = degrees.pop("spmd_backend", "partial_dtensor")
    d = dict(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, ep=2, world_size=2)
    return ParallelDims(**(d | degrees), spmd_backend=backend)


_SPMD_DIMS = []


def _run_dims(backend):
    """The ParallelDims of a training run. Under spmd_types one per process, as in torchtitan's
    trainer: FSDP2 checks that the parameters' SPMD mesh is the very mesh object it is given."""
    if backend != "spmd_types":
        return _dims()
    if not _SPMD_DIMS:
        _SPMD_DIMS.append(_dims(spmd_backend=backend))
    return _SPMD_DIMS[0]


def _titan_experts(self, x_RD, counts_e):
    """torchtitan's GroupedExperts without its bfloat16 casts (the model's dtype): a per-expert
    loop over the local expert shards; rows past the counts (padding) give zeros."""
    w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in self.parameters())
    *parts, pad = x_RD.split(counts_e.tolist() + [len(x_RD) - int(counts_e.sum())])
    out = [(F.silu(x @ w1[e].T) * (x @ w3[e].T)) @ w2[e].T for e, x in enumerate(parts)]
    return torch.cat(out + [torch.zeros_like(pad)])


def _titan_combine_fp64(self, routed_output_RD, metadata, x_TD):
    """AllToAllTokenDispatcher.combine (partial_dtensor backend) without rounding the expert
    outputs to float32 before weighting them."""
    out = self._unpermute(routed_output_RD, metadata.input_shape, metadata.permuted_indices)
    pg = self.ep_mesh.get_group()
    out = self._combine_token_exchange(out, pg, metadata.input_splits, metadata.output_splits)
    y = out * metadata.topk_scores_experts_sorted_N.reshape(-1, 1)
    return torch.zeros_like(x_TD).index_add(0, metadata.token_indices_experts_sorted_N, y)


def _patch_titan(fp64):
    from torchtitan.models.common.moe import GroupedExperts
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    GroupedExperts.forward = _titan_experts
    if fp64:
        AllToAllTokenDispatcher.combine = _titan_combine_fp64


def _build(mixops, dtype, num_chunks=2, backend="partial_dtensor"):
    """(model, optimizers) as torchtitan's trainer builds them: config (overrides after the
    sharding configs), init, parallelize_deepseekv3, the AdamW container with the MoE
    load-balancing hook. The same seed gives every run the same initial weights."""
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.components.optimizer import default_adamw, register_moe_load_balancing_hook
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import utils
    from torchtitan.models.deepseek_v3 import parallelize_deepseekv3

    cfg = tc.ep_model_config()
    if mixops:
        use_mixops(cfg, expert_dtype=None, ep_num_chunks=num_chunks)
    torch.manual_seed(0)
    model = cfg.build()
    model.init_states()
    if dtype == torch.float64:
        model.double()  # floating-point tensors only: RoPE's complex table stays complex
    dims = _run_dims(backend)
    utils.set_spmd_backend(backend)  # the trainer's global, read by torchtitan's layers
    name = str(dtype).removeprefix("torch.")
    model = parallelize_deepseekv3(
        model,
        parallel_dims=dims,
        training=TrainingConfig(mixed_precision_param=name, mixed_precision_reduce=name),
        parallelism=ParallelismConfig(
            data_parallel_shard_degree=2, expert_parallel_degree=2, spmd_backend=backend
        ),
        compile_config=CompileConfig(),
        ac_config=None,
        dump_folder="",
    )
    for m in model.modules():  # gloo has no PREMUL_SUM: sum, as with symmetric memory
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
    moes = [m for m in model.modules() if isinstance(m, MixopsMoE)]
    assert len(moes) == (2 if mixops else 0)
    assert all(m._ep_group is not None for m in moes)
    model.train()
    opt = default_adamw(lr=LR, weight_decay=0.0).build(model_parts=[model])
    register_moe_load_balancing_hook(opt, [model], dims)
    return model, opt


def _batch(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randint(tc.ep_model_config().vocab_size, (B, L + 1), generator=g)


def _train(model, opt, tokens, steps, counts=None, backend="partial_dtensor"):
    """``steps`` optimizer steps on ``tokens``; the losses (mean over both ranks' tokens). Under
    spmd_types as torchtitan's trainer steps: the inputs annotated, forward and backward in its
    SPMD context (the dense and sparse meshes registered; no debug type checking), the
    backward without type checking."""
    import spmd_types as spmd
    from torchtitan.distributed import utils
    from torchtitan.distributed.spmd_types import annotate_input_spmd_types

    world, losses = dist.get_world_size(), []
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    context, no_check = contextlib.nullcontext, contextlib.nullcontext
    if backend == "spmd_types":
        dims = _run_dims(backend)
        inputs, labels, _ = annotate_input_spmd_types(dims, inputs, labels, {})
        context, no_check = utils.get_spmd_context(parallel_dims=dims), spmd.no_typecheck
    for step in range(steps):
        opt.zero_grad()
        with context():
            logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / (
                labels.numel() * world
            )
            with no_check():
                loss.backward()
        if counts is not None and step == 0:
            counts.extend(m.tokens_per_expert_E.clone() for m in _moe_layers(model))
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
    return losses


def _moe_layers(model):
    return [layer.moe for layer in model.layers.values() if layer.moe_enabled]


def _save(model, opt, path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=path)


def _load(model, opt, path):
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])


class _GlooDist:
    """torch.distributed for spmd_types, whose uneven all_to_all (torchtitan's token exchange
    under spmd_types) calls the list ``all_to_all``: gloo's takes equal sizes only, so it runs
    as the one ``all_to_all_single`` with splits (NCCL takes either)."""

    def __getattr__(self, name):
        return getattr(dist, name)

    @staticmethod
    def all_to_all(outputs, inputs, group=None, async_op=False):
        assert not async_op
        out = torch.cat(outputs)
        sizes = [len(o) for o in outputs]
        dist.all_to_all_single(out, torch.cat(inputs), sizes, [len(i) for i in inputs], group)
        for o, part in zip(outputs, out.split(sizes), strict=True):
            o.copy_(part)


def _setup():
    """What torchtitan's trainer sets up before building a model, on this CPU machine."""
    import spmd_types._dist
    import torchtitan.distributed.parallel_dims as pd
    from torchtitan.config import TORCH_DTYPE_MAP

    TORCH_DTYPE_MAP.setdefault("float64", torch.float64)  # FSDP's dtypes for the fp64 reference
    pd.device_type = "cpu"  # torchtitan falls back to "cuda" on a machine without one
    spmd_types._dist.set_dist(_GlooDist())
    warnings.filterwarnings("ignore", "In CPU autocast")  # torchtitan's float32 gate on CPU


def _curves(rank, world, out):
    _setup()
    tokens = _batch(rank)
    curves, counts = {}, {}
    for name, mixops, dtype in [("titan", False, torch.float32), ("mixops", True, torch.float32)]:
        _patch_titan(fp64=False)
        model, opt = _build(mixops, dtype)
        counts[name] = []
        if mixops:  # interrupted at RESUME_AT: a checkpoint, then the rest
            curves[name] = _train(model, opt, tokens, RESUME_AT, counts[name])
            _save(model, opt, f"{out}/ckpt")
            curves[name] += _train(model, opt, tokens, STEPS - RESUME_AT)
            model, opt = _build(mixops, dtype)
            _load(model, opt, f"{out}/ckpt")
            curves["mixops resumed"] = curves[name][:RESUME_AT] + _train(
                model, opt, tokens, STEPS - RESUME_AT
            )
        else:
            curves[name] = _train(model, opt, tokens, STEPS, counts[name])
    _patch_titan(fp64=True)
    curves["titan fp64"] = _train(*_build(False, torch.float64), tokens, STEPS)
    _patch_titan(fp64=False)
    for name, mixops in [("titan spmd_types", False), ("mixops spmd_types", True)]:
        model, opt = _build(mixops, torch.float32, backend="spmd_types")
        counts[name] = []
        curves[name] = _train(model, opt, tokens, STEPS, counts[name], backend="spmd_types")
    for ours, theirs in [("mixops", "titan"), ("mixops spmd_types", "titan spmd_types")]:
        for a, b in zip(counts[ours], counts[theirs], strict=True):
            assert torch.equal(a, b), f"rank {rank}: {ours} counts {a} != torchtitan's {b}"
            assert a.sum().item() == B * L * 3  # this rank's tokens, top-3, over all experts
    if rank == 0:
        with open(f"{out}/curves.json", "w") as f:
            json.dump(curves, f)


def test_ep_training_matches_torchtitan_and_resumes(tmp_path):
    run_world(_curves, 2, str(tmp_path), deadline=240)
    curves = {
        k: torch.tensor(v, dtype=torch.float64)
        for k, v in json.loads((tmp_path / "curves.json").read_text()).items()
    }
    print("\nstep  torchtitan-EP-fp32  mixops-EP-fp32  mixops-resumed@10  torchtitan-EP-fp64")
    for s in range(STEPS):
        row = [curves[k][s].item() for k in ("titan", "mixops", "mixops resumed", "titan fp64")]
        print(f"{s + 1:4d}  " + "  ".join(f"{v:.10f}" for v in row))
    ours, titan, ref = curves["mixops"], curves["titan"], curves["titan fp64"]
    assert ours[-1] < ours[0] - 0.5, "the model did not learn the batch"
    assert_close_to_ref(ours.float(), ref, titan.float(), "20-step losses")
    assert torch.equal(curves["mixops resumed"], ours), "resumed run differs"
    # torchtitan's default backend: the same model and steps, the collectives and the sharding
    # expressed on plain tensors; held to the same float64 reference.
    spmd_ours, spmd_titan = curves["mixops spmd_types"], curves["titan spmd_types"]
    print("step  torchtitan-EP-spmd_types  mixops-EP-spmd_types")
    for s in range(STEPS):
        print(f"{s + 1:4d}  {spmd_titan[s].item():.10f}  {spmd_ours[s].item():.10f}")
    assert_close_to_ref(spmd_titan.float(), ref, titan.float(), "torchtitan spmd_types losses")
    assert_close_to_ref(spmd_ours.float(), ref, spmd_titan.float(), "spmd_types 20-step losses")


def _chunks(rank, world):
    """One step of the mixops model in float64 with ep_num_chunks 1 and 3: the same logits,
    loss gradients (this rank's expert shards; FSDP's reduced shards of the rest) and counts."""
    _setup()
    tokens = _batch(rank)
    runs = []
    for n in (1, 3):
        model, _ = _build(True, torch.float64, num_chunks=n)
        assert all(m.ep_num_chunks == n for m in _moe_layers(model))
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads = {k: p.grad.to_local() for k, p in model.named_parameters()}
        counts = [m.tokens_per_expert_E.clone() for m in _moe_layers(model)]
        runs.append((logits.detach(), grads, counts))
    (y1, g1, c1), (y3, g3, c3) = runs
    assert_close_to_ref(y3, y1, y1, f"rank {rank}: logits")
    for k, g in g1.items():
        assert_close_to_ref(g3[k], g, g, f"rank {rank}: grad {k}")
    assert all(torch.equal(a, b) for a, b in zip(c1, c3, strict=True))


def test_ep_num_chunks_give_the_same_step():
    run_world(_chunks, 2, deadline=120)


@pytest.mark.parametrize(
    "degrees, match",
    [
        (dict(dp_shard=1, tp=2, ep=1), "tp degree 2 > 1 .tensor parallelism"),
        (dict(dp_shard=1, tp=2, ep=2), "tp degree 2 > 1"),
        (dict(dp_shard=1, cp=2, ep=2), "ep degree 2 > 1 with context parallelism"),
        (dict(spmd_backend="full_dtensor"), "spmd_backend='full_dtensor' .supported: 'partial"),
    ],
)
def test_parallelize_refuses(degrees, match):
    """What the layer cannot do is refused before torchtitan distributes anything (no process
    group needed), naming the option."""
    cfg = tc.moe_config()
    moe = use_mixops_layer(cfg)
    with pytest.raises(NotImplementedError, match=match):
        moe.parallelize(_dims(**degrees))


def test_ep_num_chunks_option():
    assert use_mixops_layer(tc.moe_config(), ep_num_chunks=3).ep_num_chunks == 3
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="ep_num_chunks must be an int >= 1"):
            use_mixops_layer(tc.moe_config(), ep_num_chunks=bad)


def use_mixops_layer(cfg, **kwargs):
    return to_mixops(cfg, **kwargs).build()
