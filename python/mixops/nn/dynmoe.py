"""DynMoE (Guo et al., "Dynamic Mixture of Experts: An Auto-Tuning Approach"; LINs-lab/DynMoE,
the DeepSpeed implementation its README recommends, ``DeepSpeed-0.9.5/deepspeed/moe/sharded_moe.py``
L434-552 and ``loss.py``): top-any gating with per-expert trainable thresholds, on mixops' ops.

* ``DynMoEGate``: ``z_te = cos(x_t, W_e) * scale`` (``sim_matrix`` W [hidden, E], orthogonal
  init; ``scale = exp(min(temperature, ln 100))``, 1 with their ``init_t = 1``), scores
  ``s_te = sigmoid(z_te)`` (``experts_mask`` m_e zeroes inactive experts), thresholds
  ``G_e = sigmoid(gates_e * scale)`` (``gates`` start at 0: G = 0.5). Math in fp32 (fp64 for an
  fp64 layer), as their ``fp32_gate=True``; ``layer.to(torch.bfloat16)`` leaves the gate fp32.
* ``DynMoE(MoE)``: expert e is chosen for token t iff ``s_te - G_e > 0`` (strict). The selection
  is ``router_topk(z, k, score_fn="sigmoid", bias=-G)`` (keys ``s + (-G)``, best first; inactive
  experts bias -inf), then the slots whose key is > 0 (the same addition the kernel makes, so the
  same bits): a prefix. Weights ``1 / K_t`` on the K_t chosen (their ``gates /= K``), trained
  straight through their sign: ``d w / d s_te = 1 / K_t`` and ``d w / d gates_e`` through
  ``-G_e``, on the chosen pairs only. Training: a token may take no expert (zero output); eval: such
  a token takes the expert of its largest score with weight 1 (L547-552).
* The bound ``top_k`` (default E: their top-any is unbounded) fixes the shapes; a token choosing
  more keeps its k largest margins and K_t counts those.
* ``aux_loss``: ``aux_loss_coef`` x (diverse + simple + load-balance + efficiency) as their
  ``topanygating_opt`` (L454-466) and ``diverse_and_simple_gate_loss``; their training scripts use
  0.01. Adding and removing experts (their ``MOELayer.add_experts`` / ``remove_experts``, which
  edit ``experts_mask``) is a training-loop step of theirs, not in this layer.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import router_topk
from .activations import GATED
from .experts import Experts
from .moe import MoE
from .moe_config import MoEParts, slot_capacity

__all__ = ["DynMoE", "DynMoEGate"]


class DynMoEGate(nn.Module):
    """DynMoE's gate (their ``GAMoEGateT``): ``forward(x)`` gives ``z = cos(x, W) * scale``
    [tokens, E]; ``thresholds()`` gives ``G = sigmoid(gates * scale)`` [E]."""

    def __init__(self, hidden_size, num_experts, init_t=1.0, device=None, dtype=None):
        super().__init__()
        fdt = torch.float64 if dtype == torch.float64 else torch.float32
        kw = dict(device=device, dtype=fdt)
        self.sim_matrix = nn.Parameter(torch.empty(hidden_size, num_experts, **kw))
        self.gates = nn.Parameter(torch.empty(num_experts, **kw))
        self.register_buffer("experts_mask", torch.empty(num_experts, **kw))
        self.register_buffer("temperature", torch.empty(1, **kw))
        self.init_t = float(init_t)
        self.clamp_max = math.log(1.0 / 0.01)
        self.reset_parameters()

    def reset_parameters(self):
        """``sim_matrix`` orthogonal (of [E, hidden], transposed), ``gates`` 0, every expert
        active, ``temperature = ln(1 / init_t)``."""
        with torch.no_grad():
            w = torch.empty(self.sim_matrix.shape[::-1], dtype=torch.float32)
            self.sim_matrix.copy_(nn.init.orthogonal_(w).T)
            self.gates.zero_()
            self.experts_mask.fill_(1.0)
            self.temperature.fill_(math.log(1.0 / self.init_t))

    def _apply(self, fn, recurse=True):
        # Their gate is fp32 (fp32_gate=True): module.to(bf16) moves it but keeps it fp32, and
        # unrounded (its fp32 originals are moved, not the rounded copies).
        # (Copies: module.to() may swap a parameter's contents in place.)
        before = {
            n: t.detach().clone() for n, t in [*self.named_parameters(), *self.named_buffers()]
        }
        out = super()._apply(fn, recurse)
        for n, old in before.items():
            new = getattr(self, n)
            if new.dtype in (torch.float32, torch.float64) or old.dtype == new.dtype:
                continue
            restored = old.to(new.device)
            if isinstance(new, nn.Parameter):
                new.data = restored
            else:
                setattr(self, n, restored)
        return out

    def scale(self):
        return torch.clamp(self.temperature, max=self.clamp_max).exp()

    def forward(self, x):
        x = x.to(self.sim_matrix.dtype)
        cos = F.normalize(x, dim=1) @ F.normalize(self.sim_matrix, dim=0)
        return cos * self.scale()

    def thresholds(self):
        return torch.sigmoid(self.gates * self.scale())


class DynMoE(MoE):
    """An MoE layer with DynMoE's top-any gating (module docstring). Experts and names as
    ``MoE``'s (``experts.gate_up_proj`` / ``down_proj``), the gate under ``gate``."""

    def __init__(self, hidden_size, ffn_size, num_experts, top_k=None, *, activation="swiglu",
                 capacity_factor=None, aux_loss_coef=0.0, init_t=1.0, device=None, dtype=None):  # fmt: skip
        gate = DynMoEGate(hidden_size, num_experts, init_t, device=device, dtype=dtype)
        gated = activation in GATED
        experts = Experts(hidden_size, ffn_size, num_experts, gated, device=device, dtype=dtype)
        super().__init__(
            hidden_size, ffn_size, num_experts, num_experts if top_k is None else top_k,
            parts=MoEParts(gate=gate, experts=experts), activation=activation,
            capacity_factor=capacity_factor, score_fn="sigmoid", renormalize=False,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.dynmoe_aux_loss_coef = float(aux_loss_coef)

    def _route(self, x2, token_mask, modality):
        gate = self.gate
        z = gate(x2)
        G = gate.thresholds()
        active = gate.experts_mask > 0
        bias = torch.where(active, -G.detach(), -math.inf)
        r = router_topk(z.detach(), self.top_k, score_fn="sigmoid", renormalize=False, bias=bias,
                        token_mask=token_mask, modality=modality)  # fmt: skip
        ids = r.ids.long()
        # The kernel ranked by s + bias; the same addition says which slots are chosen (a prefix).
        kept = (r.weights + bias[ids]) > 0
        K = kept.sum(-1, keepdim=True)
        s = torch.sigmoid(z)  # with autograd, as theirs: the sign passes d (s - G) straight through
        margin = s.gather(1, ids) - G[ids]
        sign = torch.where(kept, 1.0 + (margin - margin.detach()), 0.0)
        out_ids = torch.where(kept, ids, -1)
        if not self.training:  # a token with no expert takes its largest (masked) score
            first = torch.zeros_like(kept)
            first[:, 0] = K[:, 0] == 0  # slot 0 of the tokens with no expert
            best = (s * gate.experts_mask).argmax(-1, keepdim=True)
            out_ids = torch.where(first, best, out_ids)
            sign = torch.where(first, torch.ones_like(sign), sign)
            K = K.clamp(min=1)
        w = sign / K.clamp(min=1)
        E = self.num_experts
        valid = out_ids >= 0
        counted = valid if token_mask is None else valid & token_mask[:, None]
        counts = torch.zeros(E, dtype=torch.int32, device=z.device).scatter_add_(
            0, out_ids.clamp(min=0).flatten(), counted.flatten().int()
        )
        self.aux_loss = None
        if self.dynmoe_aux_loss_coef:
            self.aux_loss = self.dynmoe_aux_loss_coef * dynmoe_losses(
                gate, sign, out_ids.clamp(min=0), K, token_mask
            )
        capacity = slot_capacity(self._capacity, x2.shape[0], self.top_k, E)
        result = r._replace(weights=w.to(r.weights.dtype), ids=out_ids.int(), counts=counts)
        return result, capacity


def dynmoe_losses(gate, sign, ids, K, token_mask=None):
    """diverse + simple + load-balance + efficiency, as LINs-lab/DynMoE computes them
    (``loss.py`` L4-15; ``sharded_moe.py`` L454-466) from the straight-through signs of the chosen
    pairs (``sign`` [T, k], 0 elsewhere), their expert ids and K [T, 1]. Tokens outside
    ``token_mask`` are left out."""
    E = gate.sim_matrix.shape[1]
    if token_mask is not None:
        sign = sign * token_mask[:, None]
        K = torch.where(token_mask[:, None], K, 0)
    T = sign.shape[0] if token_mask is None else token_mask.sum().clamp(min=1)
    dense = torch.zeros(sign.shape[0], E, dtype=sign.dtype, device=sign.device)
    dense = dense.scatter_add(1, ids, sign)  # their gates [T, E]: the signs, straight through
    # diverse and simple (loss.py): the masked cosine Gram of W against I, and mean column norm.
    w = gate.sim_matrix
    wn = F.normalize(w, dim=0)
    m = gate.experts_mask
    sim_mask = m[:, None] * m[None, :]
    eye = torch.eye(E, dtype=w.dtype, device=w.device)
    diverse = torch.norm((wn.T @ wn) * sim_mask - eye * sim_mask)
    simple = torch.norm(w, dim=0).mean()
    # load balance over the tokens with an expert: E * sum_e mean(g / sum g) * mean(chosen); the
    # row sum (K in value) carries the signs' straight-through gradient, as their L457's does.
    some = (K[:, 0] > 0).to(dense.dtype)
    n = some.sum().clamp(min=1)
    row = dense.sum(-1, keepdim=True)
    row = torch.where(K > 0, row, torch.ones_like(row))
    me = (dense / row * some[:, None]).sum(0) / n
    ce = (dense.detach() > 0).to(dense.dtype).mul(some[:, None]).sum(0) / n
    balance = (me * ce).mean() * E * E
    efficiency = dense.sum() / (T * E)  # their torch.mean(gates) over [T, E]
    return diverse + simple + balance + efficiency
