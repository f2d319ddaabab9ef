"""The cases of the MoE-layer benchmark (moe.py, `python -m mixops.bench moe`): the shapes, the
modules timed (mixops.nn.MoE and HF's MixtralSparseMoeBlock with its "eager" and "grouped_mm"
experts) with the same weights, their inputs and timed steps, the dense floor, and the fp32 check
that mixops equals HF eager before anything is timed. The MoA and MoD benchmarks reuse the steps
(imported from moe.py)."""

from dataclasses import dataclass

import torch

from .timing import nvtx_range


@dataclass(frozen=True)
class Config:
    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    topk: int


FULL = (Config("coarse-8x2", 2048, 1024, 2048, 8, 2), Config("fine-64x8", 2048, 1024, 256, 64, 8))
QUICK = (Config("coarse-8x2", 128, 128, 128, 8, 2), Config("fine-64x8", 128, 128, 32, 64, 8))
IMPLS = ("mixops", "HF eager", "HF grouped_mm")
PEERS = IMPLS[1:]
FLOOR = "floor"
PASSES = ("fwd", "fwd+bwd")  # the passes moa.py and mod.py time (imported through moe.py)
# fwd+bwd with fresh gradients (every .grad None before each step, so autograd allocates them) and
# with accumulating ones (.grad kept, so backward adds into it, as between optimizer steps).
ACCUM = "fwd+bwd+accum"
MOE_PASSES = (*PASSES, ACCUM)


# -- modules and inputs ------------------------------------------------------------------------
def build(cfg, impl, device, dtype):
    """mixops.nn.MoE, or MixtralSparseMoeBlock with experts_implementation "eager"/"grouped_mm";
    parameters uninitialised for HF (built on meta, then materialised: no fp32 transient)."""
    if impl == "mixops":
        import mixops.nn

        return mixops.nn.MoE(cfg.hidden, cfg.ffn, cfg.experts, cfg.topk, device=device, dtype=dtype)
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_cfg = MixtralConfig(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.ffn,
        num_local_experts=cfg.experts,
        num_experts_per_tok=cfg.topk,
        router_jitter_noise=0.0,
        experts_implementation=impl[3:],
    )
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(hf_cfg)
    return block.to(dtype).to_empty(device=device)


def init_weights(module, seed=0):
    """Draw gate.weight, experts.gate_up_proj, experts.down_proj in place (std fan_in ** -0.5),
    the same values for the same seed/dtype whichever implementation holds them."""
    params = dict(module.named_parameters())
    assert sorted(params) == ["experts.down_proj", "experts.gate_up_proj", "gate.weight"], params
    g = torch.Generator(device=params["gate.weight"].device).manual_seed(seed)
    with torch.no_grad():
        for name in sorted(params):
            params[name].normal_(0.0, params[name].shape[-1] ** -0.5, generator=g)
    return module


def inputs(cfg, device, dtype, seed=1):
    """x [1, tokens, hidden] (a leaf with requires_grad) and the fixed grad_output of the same shape."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, cfg.tokens, cfg.hidden, generator=g, device=device, dtype=dtype)
    gy = torch.randn(1, cfg.tokens, cfg.hidden, generator=g, device=device, dtype=dtype)
    return x.requires_grad_(True), gy


def fwd_step(module, x, name):
    def step():
        with nvtx_range(name):
            return module(x)

    return step


def keep_grads(leaves):
    """Give every leaf without a .grad a zero one, so that an accumulating step adds into an
    existing .grad from its first call on (the warm-up call too, whose time is the one kept for
    peers slower than 7 s)."""
    for t in leaves:
        if t.grad is None:
            t.grad = torch.zeros_like(t)


def fwd_bwd_step(module, x, gy, name, accumulate=False):
    """One forward+backward into x and every parameter: x.grad is reset before each step; the
    parameters' .grad too (fresh), or kept so that backward adds into it (``accumulate``)."""
    params = list(module.parameters())
    if accumulate:
        keep_grads(params)

    def step():
        with nvtx_range(name):
            x.grad = None
            if not accumulate:
                for p in params:
                    p.grad = None
            module(x).backward(gy)

    return step


def peer(step):
    """A peer's step whose failure (any exception) reads as RuntimeError, which the timing and
    the memory measurement report as NaN instead of stopping the run."""

    def call():
        try:
            return step()
        except RuntimeError:
            raise
        except Exception as e:
            raise RuntimeError(f"{type(e).__name__}: {e}") from e

    return call


def floor_steps(cfg, device, dtype):
    """The floor's (fwd, fwd+bwd, fwd+bwd+accum): xr [T*k, hidden] @ w1 [hidden, 2*ffn] and
    a [T*k, ffn] @ w2 [ffn, hidden], and backward of both into all four leaves: exactly 2 / 6 / 6
    GEMMs. The accumulating step keeps the weights' (w1, w2) .grad and resets the activations'
    (xr, a), as the layers' step keeps their parameters' and resets x's."""
    g = torch.Generator(device=device).manual_seed(2)
    rows = cfg.tokens * cfg.topk

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    leaves = [
        r(rows, cfg.hidden),
        r(cfg.hidden, 2 * cfg.ffn) * cfg.hidden**-0.5,
        r(rows, cfg.ffn),
        r(cfg.ffn, cfg.hidden) * cfg.ffn**-0.5,
    ]
    xr, w1, a, w2 = [t.requires_grad_(True) for t in leaves]
    gh, go = r(rows, 2 * cfg.ffn), r(rows, cfg.hidden)

    def fwd():
        with nvtx_range(FLOOR):
            return xr @ w1, a @ w2

    def fwd_bwd():
        with nvtx_range(FLOOR):
            for t in (xr, w1, a, w2):
                t.grad = None
            torch.autograd.backward([xr @ w1, a @ w2], [gh, go])

    def fwd_bwd_accum():
        keep_grads([w1, w2])  # (after a fresh step they are there already)
        with nvtx_range(FLOOR):
            xr.grad = a.grad = None
            torch.autograd.backward([xr @ w1, a @ w2], [gh, go])

    return fwd, fwd_bwd, fwd_bwd_accum


def build_all(cfg, device, dtype):
    """{impl: module} with the mixops weights copied into both HF blocks, plus x and grad_output."""
    mods = {"mixops": init_weights(build(cfg, "mixops", device, dtype))}
    for name in PEERS:
        mods[name] = build(cfg, name, device, dtype)
        mods[name].load_state_dict(mods["mixops"].state_dict())
    return mods, *inputs(cfg, device, dtype)


def check_same(cfg, device):
    """fp32: mixops' output and input gradient must equal HF eager's (rtol 1e-4, atol 1e-5)."""
    mods, x, gy = build_all(cfg, device, torch.float32)
    out = {}
    for name in IMPLS:
        xi = x.detach().clone().requires_grad_(True)
        try:
            y = mods[name](xi)
            y.backward(gy)
        except Exception:
            if name == "HF grouped_mm":
                continue
            raise
        out[name] = (y.detach(), xi.grad)
    for i, what in enumerate(("output", "input gradient")):
        torch.testing.assert_close(
            out["mixops"][i],
            out["HF eager"][i],
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m, what=what: (
                f"{cfg.name} float32: mixops {what} differs from HF eager's\n{m}"
            ),
        )
        if "HF grouped_mm" in out and not torch.allclose(
            out["HF grouped_mm"][i], out["HF eager"][i], rtol=1e-4, atol=1e-5
        ):
            print(f"note: {cfg.name}: HF grouped_mm's {what} differs from HF eager's")
