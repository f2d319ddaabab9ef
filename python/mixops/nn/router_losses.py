"""router_losses: a layer's weighted load-balancing loss and router z-loss, shared by MoE (token
and expert choice) and MoA (imported from moe.py), with HMoE's size-aware options for experts of
different widths."""

import torch


def router_losses(
    r,
    num_tokens,
    token_mask,
    num_experts,
    aux_loss_coef,
    z_loss_coef,
    size_weights=None,
    size_aware=False,
    param_loss_coef=0.0,
):
    """``aux_loss_coef`` x the load-balancing loss (HF transformers' ``load_balancing_loss_func``
    for one layer: ``E * sum_e f_e p_e``, f_e the fraction of the tokens that chose e (summing
    to k over the experts), p_e the mean balancing probability of e) + ``z_loss_coef`` x the ST-MoE router z-loss,
    over the tokens of ``token_mask`` (all when None): a 0-dim fp32 tensor with autograd, or None
    when every coefficient is 0. Shared by MoE and MoA.

    Experts of different widths (``MoE(ffn_sizes=...)``; HMoE, Wang et al. 2024, arXiv
    2408.10681): ``size_weights`` [E] holds ``w_e = F_e / mean(F)`` over the computing experts
    (0 for zero-computation experts). With ``size_aware`` the load-balancing loss is
    ``E * sum_e w_e f_e p_e``: HMoE's parameter-penalty ("P-Penalty") form of the balancing
    loss, each expert's share of the tokens charged in proportion to its size, so the router
    learns to send tokens to small experts unless a large one pays off (equal widths: exactly
    the plain loss; normalising by the largest width instead, as some reimplementations do,
    only rescales the coefficient by mean/max). ``param_loss_coef`` x ``sum_e w_e p_e`` adds the
    parameter penalty on its own (this term is ours, not the paper's: the router's mean
    probability mass weighted by the experts' relative sizes, the expected relative width of an
    expert drawn from the router's distribution; constant, 1 for softmax scores, when the widths
    are equal), which lowers the activated parameters without the balancing term's pull towards
    equal token counts."""
    if not (aux_loss_coef or z_loss_coef or param_loss_coef):
        return None
    loss = r.lse.new_zeros(())
    if token_mask is None:
        n = float(max(num_tokens, 1)) if isinstance(num_tokens, int) else num_tokens
    else:
        n = token_mask.sum().clamp(min=1).to(r.lse.dtype)
    if aux_loss_coef or param_loss_coef:
        p = r.score_sum / n
    if aux_loss_coef:
        f = r.counts.to(r.score_sum.dtype) / n
        if size_aware:
            f = f * size_weights.to(f.dtype)
        loss = loss + aux_loss_coef * num_experts * (f * p).sum()
    if param_loss_coef:
        loss = loss + param_loss_coef * (size_weights.to(p.dtype) * p).sum()
    if z_loss_coef:
        z = r.lse.square()
        if token_mask is not None:
            z = torch.where(token_mask, z, z.new_zeros(()))
        loss = loss + z_loss_coef * z.sum() / n
    return loss
