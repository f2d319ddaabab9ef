"""MoE's training-loop API (TrainingLoopAPI, a mixin of MoE): ``reset_parameters`` and
``reset_buffers`` (initialise the layer again, e.g. after ``to_empty()``; zero the load counter)
and ``update_bias``, the auxiliary-loss-free balancing of DeepSeek-V3 from the load counter
``tokens_per_expert``."""

import torch


class TrainingLoopAPI:
    """The training-loop API of MoE. A mixin: the subclass holds the load counter
    ``tokens_per_expert`` and ``selection_bias``, and its router ``gate`` the bias
    ``e_score_correction_bias``."""

    def __getstate__(self):
        # aux_loss is the last call's result, with its autograd graph, not state: copies and
        # pickles leave it out (copy.deepcopy of a graph's non-leaf tensor raises).
        state = dict(super().__getstate__())
        if "aux_loss" in state:
            state["aux_loss"] = None
        return state

    def reset_parameters(self):
        """Initialise the layer again, as its constructor does: every submodule's own
        ``reset_parameters()`` (router, experts, shared experts; the selection bias to zero), and
        the load counter to zero. For a layer built on the meta device and materialised with
        ``to_empty()``. (HF models patched by ``patch_model`` use ``model.init_weights()``.)"""
        for m in self.modules():
            if m is not self and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self):
        """Zero the buffers the layer itself holds (the load counter ``tokens_per_expert``)."""
        self.tokens_per_expert.zero_()

    @torch.no_grad()
    def update_bias(self, rate: float, group=None) -> torch.Tensor:
        """Auxiliary-loss-free balancing (DeepSeek-V3): ``bias += rate * sign(mean_load - load)``,
        where ``load`` counts the tokens routed to each expert by the training forwards since the
        last call, summed over ``group`` (a torch.distributed process group) first when given.
        Resets the count and returns the load that was used."""
        if not self.selection_bias:
            raise RuntimeError(
                "MoE.update_bias: this layer has no selection bias "
                "(construct it with selection_bias=True)"
            )
        load = self.tokens_per_expert.to(torch.float32)
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(load, op=dist.ReduceOp.SUM, group=group)
        bias = self.gate.e_score_correction_bias
        bias.add_((rate * torch.sign(load.mean() - load)).to(bias.dtype))
        self.tokens_per_expert.zero_()
        return load
