"""LoRA on the experts of ExpertParallelMoE (a mixin): the adapters are sharded with their
experts (``Shard(0)`` DTensors over the EP mesh, as shards.py does the experts), and each rank's
local experts run with their adapters inside the chunked exchange schedule, the adapters' A and B
passed as extra weights of ``experts_all`` so their gradients come back through ChunkedExperts'
backward like the experts'."""

from dataclasses import replace

from ..nn.experts import expert_mlp
from .shards import shard_experts

__all__ = ["ExpertParallelLoRA", "trainable_only"]


class ExpertParallelLoRA:
    """``add_lora`` and the experts' function of ExpertParallelMoE. A mixin placed before MoE:
    the subclass provides ``ep_mesh``, ``lora_adapters`` and ``_mark_expert_parameter``."""

    def add_lora(self, *args, **kwargs):
        """``mixops.nn.MoE.add_lora``; the adapters are sharded with their experts: DTensors
        ``Shard(0)`` of global shape [E, ...] over the EP mesh (state dicts and DCP see global
        tensors), marked as expert parameters (``expert_parameter_names``; DDP leaves them to
        ``allreduce_expert_grads``). Needs ``dtensor=True`` (the default)."""
        if self.ep_mesh is None:
            raise ValueError(
                "ExpertParallelMoE.add_lora: needs a layer built with dtensor=True (the default); "
                "with dtensor=False the state-dict helpers would not gather or slice the adapters"
            )
        return super().add_lora(*args, **kwargs)

    def _lora_placed(self, module):
        shard_experts(module, self.ep_mesh)
        for p in module.parameters():
            self._mark_expert_parameter(p)

    def _lora_experts(self, activation, stage):
        """``(experts, adapter_weights)``: ``experts(rows, offsets, w1, w2, *adapter_weights)``
        runs the local experts with their adapters; ``adapter_weights`` are the local A and B of
        each adapter (differentiable views of the shards)."""
        lora = self.lora_adapters()
        keys = [k for k in ("gate_up", "down") if lora.get(k) is not None]

        def experts(rows, offsets, w1, w2, *ab):
            ads = {k: replace(lora[k], A=ab[2 * i], B=ab[2 * i + 1]) for i, k in enumerate(keys)}
            with stage("experts", rows):
                return expert_mlp(rows, offsets, w1, w2, activation, ads)

        return experts, [t for k in keys for t in (lora[k].A, lora[k].B)]


def trainable_only(fn, weights):
    """``(fn', trainable)``: the weights that need a gradient, and ``fn(rows, offsets, *weights)``
    as a function of only those, the frozen ones (a frozen base under LoRA) filled in from
    ``weights``. ChunkedExperts differentiates with respect to every weight it is given, which
    autograd refuses for a tensor that does not require grad."""
    need = [w.requires_grad for w in weights]
    trainable = [w for w, n in zip(weights, need) if n]

    def fn_trainable(rows, offsets, *given):
        it = iter(given)
        return fn(rows, offsets, *(next(it) if n else w for w, n in zip(weights, need)))

    return fn_trainable, trainable
