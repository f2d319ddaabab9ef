"""A dense [tokens, E] DynMoE layer for tests/test_dynmoe.py, written from the authors' code (not
from mixops): LINs-lab/DynMoE, the DeepSpeed implementation its README recommends, at
``DeepSpeed-0.9.5/deepspeed/moe/``:

* ``sharded_moe.py`` L485-495 ``GAMoEGateBackward`` (sign forward, identity backward);
* ``sharded_moe.py`` L519-552 ``GAMoEGateT.forward`` (cosine-sigmoid scores against trainable
  thresholds; training: 0..E experts; eval: a token with none takes its argmax with weight 1);
* ``sharded_moe.py`` L434-477 ``topanygating_opt`` (load-balance + efficiency losses, then
  ``gates /= clamp(K, 1)``; its capacity is the largest expert count, L441-444, so nothing drops);
* ``loss.py`` L4-15 ``diverse_and_simple_gate_loss``;
* ``sharded_moe.py`` L834-881 ``MOELayer.forward``: y = einsum("sec,ecm->sm", combine, experts).

Their top-any gate is unbounded; ``top_k`` < E (ours: mixops' bound) keeps, of a token's chosen
experts, the k with the largest margins ``s - G`` (applied to the gate's {0,1} output, before K is
counted). Everything runs in the inputs' dtype (float64 in the tests); differentiable, so the tests
take its autograd gradients.
"""

import math

import torch
import torch.nn.functional as F


class GAMoEGateBackward(torch.autograd.Function):
    """sharded_moe.py L485-495: ``torch.sign`` forward, the gradient passed through unchanged."""

    @staticmethod
    def forward(ctx, scores):
        return torch.sign(scores)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def gate(x, sim_matrix, gates, experts_mask, temperature, training, top_k=None):
    """GAMoEGateT.forward (L528-552): the {0,1} gate [T, E] (straight-through) and K [T] (int)."""
    logit_scale = torch.clamp(temperature, max=math.log(1.0 / 0.01)).exp()  # L509, L528
    logits = torch.sigmoid(
        torch.matmul(F.normalize(x, dim=1), F.normalize(sim_matrix, dim=0)) * logit_scale
    )  # L529-530
    logits = logits * experts_mask  # L531
    thresholds = torch.sigmoid(gates * logit_scale)  # L532
    new_logits = GAMoEGateBackward.apply(F.relu(logits - thresholds))  # L536-537 / L541-543
    if top_k is not None and top_k < logits.shape[1]:  # ours: keep the k largest margins
        margin = torch.where(new_logits > 0, logits - thresholds, -math.inf).detach()
        idx = margin.topk(top_k, dim=1).indices
        keep = torch.zeros_like(new_logits).scatter(1, idx, 1.0) * (new_logits.detach() > 0)
        new_logits = new_logits * keep
    top_k = torch.sum(new_logits > 0, dim=1).to(torch.int)  # L538 / L545
    if training:
        return new_logits, top_k
    # L547-552: rows with no expert take the argmax of the masked scores, K at least 1.
    E = logits.shape[1]
    mask = (torch.sum(new_logits, dim=1) == 0).to(torch.int).repeat(E).reshape(E, -1).T
    one_hot = F.one_hot(torch.argmax(logits, dim=1), num_classes=E)
    return mask * one_hot + new_logits, torch.clamp(top_k, min=1)


def diverse_and_simple_gate_loss(gates, expert_mask):
    """loss.py L4-15 (``gates`` is their sim_matrix [hidden, E])."""
    sims = torch.matmul(F.normalize(gates, dim=0).T, F.normalize(gates, dim=0))
    targets = torch.eye(sims.shape[0], dtype=sims.dtype)
    sim_mask = torch.matmul(expert_mask.unsqueeze(0).T, expert_mask.unsqueeze(0))
    sim_loss = torch.norm(sims * sim_mask - targets * sim_mask)
    simple_loss = torch.mean(torch.norm(gates, dim=0))
    return sim_loss + simple_loss


def topanygating_opt(gates, K, gate_tensor, expert_mask):
    """L437-474 (the expert_mask branch): l_aux and the combine weights [T, E] (their
    combine_weights summed over the capacity axis: each chosen pair has exactly one slot)."""
    mask = gates.int()
    num_experts = int(gates.shape[1])
    non_zero_mask = torch.sum(gates, dim=1) > 0
    if non_zero_mask.sum() != 0:
        normalized_gates = gates[non_zero_mask]
        normalized_gates = normalized_gates / (torch.sum(normalized_gates, dim=1, keepdim=True))
        me = torch.mean(normalized_gates, dim=0)
        ce = torch.mean(mask[non_zero_mask].to(gates.dtype), dim=0)
        load_balance_loss = torch.mean(me * ce) * num_experts * num_experts
    else:
        load_balance_loss = 0
    efficiency_loss = torch.mean(gates)
    l_aux = diverse_and_simple_gate_loss(gate_tensor, expert_mask) + load_balance_loss
    l_aux = l_aux + efficiency_loss
    return l_aux, gates / torch.clamp(K, min=1).unsqueeze(1).to(gates.dtype)  # L474


def swiglu(x, gate_up, down):
    """One expert, HF layout: gate_up [2F, H] (gate rows, then up), down [H, F]."""
    g, u = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(g) * u) @ down.T


def dynmoe_forward(x, p, training, top_k=None):
    """The layer's output [T, H], l_aux (unweighted) and K [T]. ``p``: the module's parameters and
    buffers by name (``gate.sim_matrix``, ``gate.gates``, ``gate.experts_mask``,
    ``gate.temperature``, ``experts.gate_up_proj`` [E, 2F, H], ``experts.down_proj`` [E, H, F])."""
    W, m = p["gate.sim_matrix"], p["gate.experts_mask"]
    g, K = gate(x, W, p["gate.gates"], m, p["gate.temperature"], training, top_k)
    l_aux, w = topanygating_opt(g, K, W, m)
    y = torch.zeros_like(x)
    for e in range(w.shape[1]):  # per expert, dense: unchosen tokens weigh exactly 0
        y = y + w[:, e : e + 1] * swiglu(x, p["experts.gate_up_proj"][e], p["experts.down_proj"][e])
    return y, l_aux, K
