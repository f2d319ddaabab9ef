"""The cases of the LoRA benchmark (lora.py, `python -m mixops.bench lora`).

Section 1, LoRA on an MoE layer's experts (frozen base, adapters on ``gate_up_proj`` and
``down_proj``): mixops.nn.MoE with its adapters (``add_lora``, or a ``lora_provider`` of
``ProjectionAdapter``s where the layer has no ``add_lora``), PEFT's ``LoraConfig(
target_parameters=...)`` on HF's MixtralSparseMoeBlock with its "grouped_mm" experts (PEFT's
``ParamWrapper``: ``W + scale * B A`` folded per expert on every forward), and the frozen mixops
layer without adapters. Section 2, LoRAMoE's adapter path (a mixture of LoRA experts on a frozen
Linear): mixops' ops (router_topk -> permute -> lora_delta -> unpermute) against MixLoRA's
per-expert loop. Every impl of a case holds the same values (drawn from fixed seeds in mixops'
layout: A [E, r, in], B [E, out, r]), so routing is identical.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .moe_cases import build as build_moe
from .moe_cases import init_weights

IMPLS = ("mixops", "PEFT grouped_mm", "mixops no LoRA")
TARGETS = {"fine-64x8": 3.0, "coarse-8x2": 1.8}  # PEFT / mixops at fwd+bwd (issue 26)
MOE_TARGET = 3.0  # loop / mixops on LoRAMoE's adapter path
TOL = dict(rtol=1e-4, atol=1e-5)


@dataclass(frozen=True)
class MoLConfig:  # a mixture of LoRA experts on a dense Linear
    name: str
    tokens: int
    hidden: int  # in = out
    experts: int
    topk: int
    rank: int


MOL_FULL = MoLConfig("E8-k2-r16", 2048, 1024, 8, 2, 16)
MOL_QUICK = MoLConfig("E8-k2-r8", 128, 128, 8, 2, 8)


def draw_adapters(shapes, rank, device, seed=3):
    """``{key: (A [E, r, in], B [E, out, r])}`` in fp32 for ``shapes`` ``{key: (E, out, in)}``:
    A as PEFT draws it (U(-1/sqrt(in), 1/sqrt(in))), B small and random (PEFT's zero B would
    leave A's gradient zero)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key, (E, o, i) in sorted(shapes.items()):
        a = (torch.rand(E, rank, i, generator=g, device=device) * 2 - 1) * i**-0.5
        out[key] = (a, torch.randn(E, o, rank, generator=g, device=device) * 0.02)
    return out


def _alpha(rank):
    return 2.0 * rank  # scale alpha / r = 2


class _Adapters(nn.Module):
    """A hand-made ``lora_provider`` for a layer without ``add_lora``: ``{"gate_up": ..., "down":
    ...}`` ProjectionAdapters over its own Parameters."""

    def __init__(self, pairs, scale):
        super().__init__()
        self.scale = scale
        self.pairs = nn.ParameterDict({f"{k}_{n}": t for k, (a, b) in pairs.items()
                                       for n, t in (("A", a), ("B", b))})  # fmt: skip

    def forward(self):
        from mixops.nn.lora import ProjectionAdapter

        p = self.pairs
        keys = ("gate_up", "down")
        return {k: ProjectionAdapter(p[f"{k}_A"], p[f"{k}_B"], self.scale) for k in keys}


def build(cfg, impl, rank, device, dtype):
    """The module of ``impl`` (IMPLS) for ``cfg`` (moe_cases.Config) with rank ``rank``
    adapters: base weights from moe_cases.init_weights (seed 0), adapters from draw_adapters."""
    base = "HF grouped_mm" if impl.startswith("PEFT") else "mixops"
    module = init_weights(build_moe(cfg, base, device, dtype))
    module.requires_grad_(False)
    if impl == "mixops no LoRA":
        return module
    shapes = {"gate_up": module.experts.gate_up_proj.shape, "down": module.experts.down_proj.shape}
    pairs = draw_adapters(shapes, rank, device)
    if impl == "mixops":
        if hasattr(module, "add_lora"):
            lora = module.add_lora(rank, alpha=_alpha(rank))
            with torch.no_grad():
                for key, ab in lora.pairs().items():
                    for t, src in zip(ab, pairs[key]):
                        t.copy_(src)
        else:
            params = {k: tuple(nn.Parameter(t.to(dtype)) for t in ab) for k, ab in pairs.items()}
            module.lora_provider = _Adapters(params, _alpha(rank) / rank)
        return module
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper

    conf = LoraConfig(r=rank, lora_alpha=_alpha(rank),
                      target_parameters=["experts.gate_up_proj", "experts.down_proj"])  # fmt: skip
    model = get_peft_model(module, conf)
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert sorted(w.parameter_name for w in wrappers) == ["down_proj", "gate_up_proj"], wrappers
    with torch.no_grad():
        for w in wrappers:  # PEFT's layout: A [E*r, in] row e*r+j, B [out, r*E] column j*E+e
            a, b = pairs[w.parameter_name[: -len("_proj")]]
            E, o, _ = b.shape
            w.lora_A["default"].weight.copy_(a.reshape(E * rank, -1))
            w.lora_B["default"].weight.copy_(b.permute(1, 2, 0).reshape(o, rank * E))
    return model


def _same(a, b, where):
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{where}\n{m}")


def check_same(cfg, rank, device):
    """fp32: mixops' output and input gradient must equal PEFT's (rtol 1e-4, atol 1e-5)."""
    out = {}
    for impl in IMPLS[:2]:
        m = build(cfg, impl, rank, device, torch.float32)
        x = torch.randn(1, cfg.tokens, cfg.hidden, generator=torch.Generator().manual_seed(1))
        x = x.to(device).requires_grad_(True)
        y = m(x)
        y.backward(torch.ones_like(y))
        out[impl] = (y.detach(), x.grad)
    for i, what in enumerate(("output", "input gradient")):
        where = f"{cfg.name} r={rank} float32: mixops {what} differs from PEFT's"
        _same(out["mixops"][i], out["PEFT grouped_mm"][i], where)


# -- section 2: LoRAMoE's adapter path ----------------------------------------------------------
class MoL(nn.Module):
    """The mixture-of-LoRA-experts parameters (mixops.nn.LoRAMoE's where it exists): a frozen
    ``weight`` [out, in], the router ``gate.weight`` [E, in], ``lora_A`` [E, r, in], ``lora_B``
    [E, out, r], and ``scale``; ``layer(x)`` is base + adapters (LoRAMoE.forward if any)."""

    def __init__(self, c, device, dtype, seed=4):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(seed)
        D, E, r = c.hidden, c.experts, c.rank

        def draw(*shape, std):
            return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

        base = nn.Linear(D, D, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(draw(D, D, std=D**-0.5))
        params = dict(gate=draw(E, D, std=D**-0.5), A=draw(E, r, D, std=D**-0.5),
                      B=draw(E, D, r, std=0.02))  # fmt: skip
        try:
            from mixops.nn import LoRAMoE
        except ImportError:
            LoRAMoE = None
        if LoRAMoE is not None:
            self.layer = LoRAMoE(base, E, c.topk, r, alpha=2.0 * r)
            with torch.no_grad():
                self.layer.gate.weight.copy_(params["gate"])
                self.layer.lora_A.copy_(params["A"])
                self.layer.lora_B.copy_(params["B"])
            self.weight, self.gate_w = self.layer.weight, self.layer.gate.weight
            self.A, self.B, self.scale = self.layer.lora_A, self.layer.lora_B, self.layer.scale
        else:
            self.weight = base.weight.requires_grad_(False)
            self.gate_w, self.A, self.B = (nn.Parameter(params[k]) for k in ("gate", "A", "B"))
            self.scale, self.layer = 2.0, None
        self.topk = c.topk

    def base(self, x):
        return F.linear(x, self.weight)

    def mixops(self, x):
        """router logits -> router_topk -> permute -> lora_delta -> unpermute."""
        from mixops.nn.lora import ProjectionAdapter, lora_delta
        from mixops.ops import permute, router_topk, unpermute

        x2 = x.reshape(-1, x.shape[-1])
        r = router_topk(F.linear(x2, self.gate_w), k=self.topk)
        p = permute(x2, r.ids, self.A.shape[0])
        rows = lora_delta(p.x_sorted, p.offsets, ProjectionAdapter(self.A, self.B, self.scale))
        return unpermute(rows, p.row_map, r.weights).view(*x.shape[:-1], -1)

    def loop(self, x):
        """MixLoRA's per-expert loop: softmax top-k routing, then for each expert the tokens
        routed to it, ``x_e A_e^T B_e^T * scale * w``, index_add into the output."""
        x2 = x.reshape(-1, x.shape[-1])
        probs = F.softmax(F.linear(x2, self.gate_w), dim=1, dtype=torch.float)
        w, sel = torch.topk(probs, self.topk, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros(x2.shape[0], self.B.shape[1], dtype=x.dtype, device=x.device)
        mask = F.one_hot(sel, num_classes=self.A.shape[0]).permute(2, 1, 0)
        for e in range(self.A.shape[0]):
            idx, top = torch.where(mask[e])
            xe = x2[top]
            ye = (xe @ self.A[e].t()) @ self.B[e].t() * self.scale
            out.index_add_(0, top, ye * w[top, idx, None])
        return out.view(*x.shape[:-1], -1)

    def mixops_layer(self, x):
        return self.layer(x) if self.layer is not None else self.base(x) + self.mixops(x)

    def loop_layer(self, x):
        return self.base(x) + self.loop(x)


MOL_IMPLS = {  # (table name, MoL method): the adapter path, then the whole layer
    "mixops": "mixops",
    "per-expert loop": "loop",
    "base Linear": "base",
    "mixops layer": "mixops_layer",
    "base + loop": "loop_layer",
}


def mol_check(c, device):
    """fp32: mixops' adapter path == the loop's; the layer == base + loop (output, input grad)."""
    m = MoL(c, device, torch.float32)
    for ours, ref in (("mixops", "loop"), ("mixops_layer", "loop_layer")):
        out = []
        for name in (ours, ref):
            x = torch.randn(c.tokens, c.hidden, generator=torch.Generator().manual_seed(5))
            x = x.to(device).requires_grad_(True)
            y = getattr(m, name)(x)
            y.backward(torch.ones_like(y))
            out.append((y.detach(), x.grad))
        for i, what in enumerate(("output", "input gradient")):
            _same(out[0][i], out[1][i], f"{c.name} float32: {ours} {what} differs from the loop's")
