"""router_losses: a layer's weighted load-balancing loss and router z-loss, shared by MoE (token
and expert choice) and MoA (imported from moe.py)."""

import torch


def router_losses(r, num_tokens, token_mask, num_experts, aux_loss_coef, z_loss_coef):
    """``aux_loss_coef`` x the load-balancing loss (HF transformers' ``load_balancing_loss_func``
    for one layer) + ``z_loss_coef`` x the ST-MoE router z-loss, over the tokens of ``token_mask``
    (all when None): a 0-dim fp32 tensor with autograd, or None when both coefficients are 0.
    Shared by MoE and MoA."""
    if not (aux_loss_coef or z_loss_coef):
        return None
    loss = r.lse.new_zeros(())
    if token_mask is None:
        n = float(max(num_tokens, 1)) if isinstance(num_tokens, int) else num_tokens
    else:
        n = token_mask.sum().clamp(min=1).to(r.lse.dtype)
    if aux_loss_coef:
        f = r.counts.to(r.score_sum.dtype) / n
        p = r.score_sum / n
        loss = loss + aux_loss_coef * num_experts * (f * p).sum()
    if z_loss_coef:
        z = r.lse.square()
        if token_mask is not None:
            z = torch.where(token_mask, z, z.new_zeros(()))
        loss = loss + z_loss_coef * z.sum() / n
    return loss
