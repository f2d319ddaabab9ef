"""MoA-layer benchmark (`python -m mixops.bench moa`): mixops.nn.MoA (JetMoE routing: top-k, then
softmax over the k) beside HF transformers' JetMoeAttention with its "eager" attention (as HF ships
JetMoE), and the floor: a dense attention block with the same active FLOPs and no routing (query
projection hidden -> k * Hkv * d, the same kv projection, RoPE, causal SDPA with enable_gqa, output
projection back). Forward and forward+backward, fp32 and bf16, all timed in one interleaved run per
case (moe.time_case); prints a median-ms table per pass with "x HF" and "x floor".

Both MoA implementations get the same weights (mixops' parameters loaded into HF's, the names are
HF's), inputs and position embeddings (HF's rotary embedding); HF gets the 4-D additive causal mask
its model builds for eager attention, mixops its own causal attention. In fp32 mixops' output and
input gradient must equal HF's before anything is timed.
"""

import argparse
import gc
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.moa import MoA
from ..nn.moa_attention import rope
from .grouped_mm import native_lowp_matmul
from .moe import FLOOR, PASSES, fwd_bwd_step, fwd_step, time_case
from .timing import selected_dtypes, where


@dataclass(frozen=True)
class Config:
    name: str
    batch: int
    seq: int
    hidden: int
    head_dim: int
    experts: int
    topk: int
    kv_heads: int


FULL = (
    Config("E16-k4", 4, 1024, 1024, 64, 16, 4, 2),
    Config("E64-k4", 4, 1024, 1024, 64, 64, 4, 2),
)
QUICK = (Config("E16-k4", 2, 64, 64, 16, 16, 4, 2), Config("E64-k4", 2, 64, 64, 16, 64, 4, 2))
IMPLS = ("mixops", "HF JetMoE")
TOL = dict(rtol=1e-4, atol=1e-4)


class Bound(nn.Module):
    """``inner(x, **kwargs)`` as a one-argument module (what moe's steps call); a tuple output
    (HF's ``(attn_output, attn_weights, router_logits)``) gives its first element."""

    def __init__(self, inner, **kwargs):
        super().__init__()
        self.inner, self.kwargs = inner, kwargs

    def forward(self, x):
        y = self.inner(x, **self.kwargs)
        return y[0] if isinstance(y, tuple) else y


class DenseAttention(nn.Module):
    """The floor: MoA's active FLOPs as dense GEMMs and one causal GQA SDPA, no routing."""

    def __init__(self, cfg, device, dtype):
        super().__init__()
        q, kv = cfg.topk * cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        kw = dict(device=device, dtype=dtype)
        self.head_dim, self.kv_heads = cfg.head_dim, cfg.kv_heads
        self.q_proj = nn.Linear(cfg.hidden, q, bias=False, **kw)
        self.kv_proj = nn.Linear(cfg.hidden, 2 * kv, bias=False, **kw)
        self.o_proj = nn.Linear(q, cfg.hidden, bias=True, **kw)

    def forward(self, x, position_embeddings):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        kv = self.kv_proj(x).view(B, S, 2, self.kv_heads, self.head_dim)
        key, value = kv.permute(2, 0, 3, 1, 4).unbind(0)
        cos, sin = position_embeddings
        q, key = rope(q, cos, sin), rope(key, cos, sin)
        o = F.scaled_dot_product_attention(q, key, value, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


def hf_config(cfg):
    from transformers import JetMoeConfig

    return JetMoeConfig(
        hidden_size=cfg.hidden,
        kv_channels=cfg.head_dim,
        num_key_value_heads=cfg.kv_heads,
        num_local_experts=cfg.experts,
        num_experts_per_tok=cfg.topk,
        max_position_embeddings=cfg.seq,
        attn_implementation="eager",
    )


def build_all(cfg, device, dtype, seed=0):
    """({impl: one-argument module}, x [B, S, hidden] (requires grad), grad_output, position
    embeddings); HF's JetMoeAttention holds a copy of mixops' weights (bias drawn too)."""
    from transformers.masking_utils import create_causal_mask
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeAttention, JetMoeRotaryEmbedding

    torch.manual_seed(seed)
    moa = MoA(
        cfg.hidden, cfg.experts, cfg.topk, cfg.head_dim, cfg.kv_heads,
        topk_then_score=True, device=device, dtype=dtype,
    )  # fmt: skip
    with torch.no_grad():
        moa.experts.bias.normal_(0.0, 0.1)
    hcfg = hf_config(cfg)
    with torch.device("meta"):
        hf = JetMoeAttention(hcfg, layer_idx=0)
    hf = hf.to(dtype).to_empty(device=device)
    hf.load_state_dict(moa.state_dict())
    g = torch.Generator(device=device).manual_seed(seed + 1)
    shape = (cfg.batch, cfg.seq, cfg.hidden)
    x = torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_(True)
    gy = torch.randn(*shape, generator=g, device=device, dtype=dtype)
    pos = torch.arange(cfg.seq, device=device).expand(cfg.batch, cfg.seq)
    rot = JetMoeRotaryEmbedding(hcfg).to(device)(x, pos)
    mask = create_causal_mask(
        config=hcfg, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos
    )
    mods = {
        "mixops": Bound(moa, position_embeddings=rot),
        "HF JetMoE": Bound(hf, attention_mask=mask, position_embeddings=rot),
    }
    return mods, x, gy, rot


def check_same(cfg, device):
    """fp32: mixops' output and input gradient must equal HF's (TOL), else stop."""
    mods, x, gy, _ = build_all(cfg, device, torch.float32)
    out = {}
    for name in IMPLS:
        xi = x.detach().clone().requires_grad_(True)
        y = mods[name](xi)
        y.backward(gy)
        out[name] = (y.detach(), xi.grad)
    for i, what in enumerate(("output", "input gradient")):
        try:
            torch.testing.assert_close(out["mixops"][i], out["HF JetMoE"][i], **TOL)
        except AssertionError as e:
            sys.exit(f"error: {cfg.name} float32: mixops' {what} differs from HF JetMoE's\n{e}")


def floor_steps(cfg, device, dtype, rot):
    """The floor's (fwd, fwd+bwd) steps, gradients into its input and all its weights."""
    mod = DenseAttention(cfg, device, dtype)
    g = torch.Generator(device=device).manual_seed(2)
    shape = (cfg.batch, cfg.seq, cfg.hidden)
    x = torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_(True)
    gy = torch.randn(*shape, generator=g, device=device, dtype=dtype)
    mod = Bound(mod, position_embeddings=tuple(t.to(dtype) for t in rot))
    return fwd_step(mod, x, FLOOR), fwd_bwd_step(mod, x, gy, FLOOR)


def ratio(a, b):
    return f"{a / b:.2f}x"


def print_tables(results, lowp_note):
    for pas in PASSES:
        print(f"\n{pas}: median ms; x HF = HF ms / mixops ms (speedup), x floor = mixops / floor")
        head = (
            f"{'config':<8} {'dtype':<9} {'mixops':>10} {'HF JetMoE':>10} {'floor':>10} "
            f"{'x HF':>7} {'x floor':>8}"
        )
        print(head)
        print("-" * len(head))
        for (name, dt, p), ms in results:
            if p != pas:
                continue
            floor = f"{ms[FLOOR]:.3f}" + ("*" if lowp_note.get(dt) else "")
            print(
                f"{name:<8} {dt:<9} {ms['mixops']:>10.3f} {ms['HF JetMoE']:>10.3f} {floor:>10} "
                f"{ratio(ms['HF JetMoE'], ms['mixops']):>7} "
                f"{ratio(ms['mixops'], ms[FLOOR]):>8}"
            )
    if any(lowp_note.values()):
        print("* floor GEMMs in float32: this CPU has no native bf16 GEMM")


def run(args):
    import transformers

    device = args.device
    configs = [c for c in (QUICK if args.quick else FULL) if args.experts in (0, c.experts)]
    dtypes = selected_dtypes(args)
    print(
        f"mixops MoA-layer benchmark on {device} ({where(device)}), CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, bf16 GEMM native: "
        f"{native_lowp_matmul(torch.bfloat16, device)}; median ms of {args.reps} reps"
    )
    print(
        "impls: mixops.nn.MoA (topk_then_score), HF JetMoeAttention (eager attention, HF's "
        "causal mask); floor = dense q/kv/o projections + causal GQA SDPA, same active FLOPs"
    )
    print(
        "configs: "
        + "; ".join(
            f"{c.name} batch {c.batch} x seq {c.seq}, hidden {c.hidden}, head_dim {c.head_dim}, "
            f"E {c.experts}, k {c.topk}, kv heads {c.kv_heads}"
            for c in configs
        )
    )
    lowp_note = {str(d)[6:]: not native_lowp_matmul(d, device) for d in dtypes}
    for cfg in configs:
        check_same(cfg, device)
    print(
        f"checked: mixops output and input gradient == HF JetMoE's in float32 "
        f"(rtol {TOL['rtol']}, atol {TOL['atol']}) for {', '.join(c.name for c in configs)}",
        flush=True,
    )
    results = []
    total = len(configs) * len(dtypes) * len(PASSES)
    for cfg in configs:
        for dtype in dtypes:
            dt = str(dtype)[6:]
            mods, x, gy, rot = build_all(cfg, device, dtype)
            floor_dtype = torch.float32 if lowp_note[dt] else dtype
            floor = floor_steps(cfg, device, floor_dtype, rot)
            for pas in PASSES:
                case = (cfg.name, dt, pas)
                ms = time_case(mods, x, gy, floor, pas, device, args.reps, " ".join(case))
                results.append((case, ms))
                print(
                    f"[{len(results)}/{total}] {' '.join(case)}: mixops {ms['mixops']:.2f} ms, "
                    f"{ratio(ms['HF JetMoE'], ms['mixops'])} vs HF, "
                    f"{ratio(ms['mixops'], ms[FLOOR])} floor",
                    file=sys.stderr,
                    flush=True,
                )
            del mods, x, gy, rot, floor
            gc.collect()
    print_tables(results, lowp_note)
    return results


def add_args(p: argparse.ArgumentParser):
    """moa has no options of its own (--device, --quick, --reps, --dtype, --experts are shared)."""
