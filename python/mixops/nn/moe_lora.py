"""LoRA on an MoE layer's routed experts (issue 26): ``ExpertLoRA``, the adapter parameters of
every expert's projections, and ``MoELoRA``, the user API of ``mixops.nn.MoE`` (a mixin):
``add_lora``, ``remove_lora``, ``merge_lora``, ``unmerge_lora``, ``lora_state_dict`` and
``lora_adapters``, the seam every routed path reads.

The layer adds the adapters' terms on its permuted rows (nn/lora.py: two thin grouped GEMMs per
projection added to the base GEMM's output; experts.expert_mlp), never ``W + B A`` per expert.
``lora_adapters()`` returns what ``self.lora_provider()`` gives: ``add_lora`` sets it to the bound
method ``adapters`` of its own ``ExpertLoRA`` (a bound method, not a closure, so ``deepcopy`` and
pickle rebind it to the copy); PEFT's integration sets its own provider through the same
attribute.
"""

import math
from typing import Optional

import torch
from torch import nn

from .experts import local_tensor
from .lora import ProjectionAdapter

__all__ = ["ExpertLoRA", "MoELoRA"]

# The projections a layer's adapters may target: the first one (gate_up_proj for gated
# activations, up_proj otherwise; the adapter key "gate_up" either way) and down_proj.
_FIRST = ("gate_up_proj", "up_proj")


class ExpertLoRA(nn.Module):
    """Per-expert low-rank adapters of an MoE layer's projections. For each targeted projection
    ``<p>_proj`` with weights ``W`` [E, out, in] (``gate_up``, ``up`` or ``down``): Parameters
    ``<p>_A`` [E, r, in] and ``<p>_B`` [E, out, r]; expert e's projection becomes
    ``W_e x + scale * B_e A_e dropout(x)`` with ``scale = alpha / r`` (rsLoRA: ``alpha /
    sqrt(r)``). Initialised as PEFT does: A kaiming-uniform(a=sqrt(5)) per expert, B zero, so a
    fresh adapter leaves the layer's output unchanged.

    ``projections``: ``{adapter key ("gate_up" or "down"): (parameter prefix, (E, out, in))}``.
    ``merged``: the adapters are folded into the base weights (``MoE.merge_lora``) and
    ``adapters()`` gives none.
    """

    def __init__(self, projections, rank, alpha, dropout, rslora, device=None, dtype=None):
        super().__init__()
        self.rank, self.alpha, self.rslora = rank, float(alpha), bool(rslora)
        self.scale = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.prefixes = {key: prefix for key, (prefix, _) in projections.items()}
        for prefix, (E, out, inp) in projections.values():
            kw = dict(device=device, dtype=dtype)
            setattr(self, f"{prefix}_A", nn.Parameter(torch.empty(E, rank, inp, **kw)))
            setattr(self, f"{prefix}_B", nn.Parameter(torch.empty(E, out, rank, **kw)))
        # On the adapter's input only (PEFT's lora_dropout); an nn.Dropout follows train()/eval().
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False
        self.frozen = ()  # names of the layer's parameters add_lora froze (remove_lora thaws)
        self.reset_parameters()

    def pairs(self):
        """``{adapter key: (A, B)}`` as the Parameters (DTensors under expert parallelism)."""
        return {
            k: (getattr(self, f"{p}_A"), getattr(self, f"{p}_B")) for k, p in self.prefixes.items()
        }

    @torch.no_grad()
    def reset_parameters(self):
        # kaiming_uniform_(a=sqrt(5)) on each [r, in] slice: U(-b, b) with b = gain *
        # sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5)), so b = 1 / sqrt(in). One call on the whole
        # [E, r, in] tensor (nn.init's fan_in of a 3-D tensor would be r * in).
        for A, B in self.pairs().values():
            A = local_tensor(A)
            A.uniform_(-(A.shape[-1] ** -0.5), A.shape[-1] ** -0.5)
            local_tensor(B).zero_()
        self.merged = False

    def adapters(self) -> dict:
        """The layer's ``lora_provider``: ``{key: ProjectionAdapter}`` on the local shards
        (differentiable views), or ``{}`` while merged."""
        if self.merged:
            return {}
        return {
            k: ProjectionAdapter(local_tensor(A), local_tensor(B), self.scale, self.dropout)
            for k, (A, B) in self.pairs().items()
        }

    def delta_weights(self, key, like):
        """``scale * B_e A_e`` [E, out, in] for every expert, in ``like``'s dtype: computed in
        fp32 (fp64 for fp64) and rounded once, as PEFT's merge does for half precision on CPU."""
        A, B = (local_tensor(t) for t in self.pairs()[key])
        acc = torch.promote_types(torch.promote_types(like.dtype, A.dtype), torch.float32)
        return (torch.bmm(B.to(acc), A.to(acc)) * self.scale).to(like.dtype)

    def extra_repr(self):
        return (
            f"rank={self.rank}, alpha={self.alpha}, rslora={self.rslora}, scale={self.scale:g}, "
            f"targets={sorted(self.prefixes.values())}, merged={self.merged}"
        )


class MoELoRA:
    """The LoRA API of mixops.nn.MoE (a mixin). The subclass provides ``experts`` and
    ``_expert_weights``; ``_lora_placed(module)`` is a hook for the expert-parallel layer, which
    shards the adapters with their experts."""

    def lora_adapters(self) -> dict:
        """The low-rank adapters of the routed experts' projections for this call:
        ``{"gate_up": ProjectionAdapter or None, "down": ...}`` (nn/lora.py), added to the
        grouped GEMMs' outputs on the permuted rows; ``{}`` without adapters (or while merged)."""
        provider = getattr(self, "lora_provider", None)
        return {} if provider is None else provider()

    def add_lora(
        self,
        rank: int,
        alpha: Optional[float] = None,
        targets=("gate_up_proj", "down_proj"),
        dropout: float = 0.0,
        rslora: bool = False,
        freeze_base: bool = True,
        dtype: Optional[torch.dtype] = None,
    ) -> ExpertLoRA:
        """Add LoRA adapters to every routed expert's projections and return their module,
        registered as ``experts_lora`` (state dict names ``experts_lora.<p>_A`` [E, r, in] and
        ``experts_lora.<p>_B`` [E, out, r], ``<p>`` being ``gate_up``, ``up`` or ``down``).

        Args:
            rank: r >= 1.
            alpha: the scale's numerator (> 0; default r): ``scale = alpha / r``, or with
                ``rslora`` ``alpha / sqrt(r)`` (rank-stabilised LoRA).
            targets: among ``"gate_up_proj"`` (``"up_proj"`` for non-gated activations) and
                ``"down_proj"``; a string for one.
            dropout: the probability of dropping the adapter's input (training only; the base
                projection sees the full input, as in PEFT).
            freeze_base: ``requires_grad=False`` on every other parameter of the layer (router,
                experts, shared experts); ``remove_lora`` thaws them.
            dtype: the adapters' dtype (default the experts'). Their math runs in the dtype of the
                rows (the layer's, or the autocast dtype), through differentiable casts.
        """
        where = f"{type(self).__name__}.add_lora"
        if getattr(self, "ffn_sizes", None) is not None:
            raise ValueError(f"{where}: LoRA on experts of different widths (ffn_sizes) is not "
                             "supported yet")  # fmt: skip
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{where}: rank must be an int >= 1, got {rank!r}")
        alpha = float(rank) if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"{where}: alpha must be a number > 0 (or None: rank), got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise ValueError(f"{where}: dropout must be a probability in [0, 1], got {dropout!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{where}: dropout must be a probability in [0, 1], got {dropout!r}")
        if getattr(self, "experts_lora", None) is not None:
            raise RuntimeError(f"{where}: the layer has adapters already (remove_lora() first)")
        if getattr(self, "lora_provider", None) is not None:
            raise RuntimeError(
                f"{where}: the layer's lora_provider is set by someone else (PEFT's integration?); "
                "one source of adapters per layer"
            )
        w1, w2 = self._expert_weights(None)  # local shards, w1 cut to the computing experts
        first = "gate_up_proj" if hasattr(self.experts, "gate_up_proj") else "up_proj"
        names = (targets,) if isinstance(targets, str) else tuple(targets)
        bad = [t for t in names if t not in (first, "down_proj")]
        if bad or not names or len(set(names)) != len(names):
            raise ValueError(
                f"{where}: targets must be distinct names among {first!r}, 'down_proj' (this "
                f"layer's projections), got {targets!r}"
            )
        projections = {}
        if first in names:
            projections["gate_up"] = (first[: -len("_proj")], tuple(w1.shape))
        if "down_proj" in names:
            projections["down"] = ("down", tuple(w2.shape))
        module = ExpertLoRA(
            projections, rank, alpha, dropout, rslora, device=w2.device, dtype=dtype or w2.dtype
        )
        self._lora_placed(module)
        if freeze_base:
            module.frozen = tuple(n for n, p in self.named_parameters() if p.requires_grad)
            for p in self.parameters():
                p.requires_grad_(False)
        self.experts_lora = module
        self.lora_provider = module.adapters
        return module

    def _lora_placed(self, module):
        """Hook: place a new adapter module beside the experts (ExpertParallelMoE shards it)."""

    def _own_lora(self, what) -> ExpertLoRA:
        module = getattr(self, "experts_lora", None)
        if module is None:
            raise RuntimeError(f"{type(self).__name__}.{what}: the layer has no add_lora adapters")
        return module

    def _lora_bases(self, module):
        """``{adapter key: the base weight it adds to}`` as local tensors [E, out, in] (w1 cut to
        the computing experts: a view, so in-place updates reach the parameter)."""
        w1, w2 = self._expert_weights(None)
        return {k: w for k, w in (("gate_up", w1), ("down", w2)) if k in module.prefixes}

    @torch.no_grad()
    def merge_lora(self):
        """Fold ``scale * B_e A_e`` into each targeted base weight in place (PEFT's ``merge``);
        the adapter path is then skipped. Already merged: nothing to do."""
        module = self._own_lora("merge_lora")
        if not module.merged:
            for key, w in self._lora_bases(module).items():
                w.add_(module.delta_weights(key, w))
            module.merged = True

    @torch.no_grad()
    def unmerge_lora(self):
        """Subtract what ``merge_lora`` added (PEFT's ``unmerge``: the base weights back up to one
        rounding of the sum); the adapter path runs again. Not merged: nothing to do."""
        module = self._own_lora("unmerge_lora")
        if module.merged:
            for key, w in self._lora_bases(module).items():
                w.sub_(module.delta_weights(key, w))
            module.merged = False

    def merge(self):
        """``merge_lora`` under PEFT's name."""
        self.merge_lora()

    def unmerge(self):
        """``unmerge_lora`` under PEFT's name."""
        self.unmerge_lora()

    def remove_lora(self, merge: bool = False) -> ExpertLoRA:
        """Remove the adapters and return their module. ``merge=True`` folds them into the base
        weights first (PEFT's ``merge_and_unload``); otherwise a merged layer is unmerged, so the
        base weights are what they were. The parameters ``add_lora`` froze are thawed."""
        module = self._own_lora("remove_lora")
        if merge:
            self.merge_lora()
        else:
            self.unmerge_lora()
        del self.experts_lora
        self.__dict__.pop("lora_provider", None)
        params = dict(self.named_parameters())
        for name in module.frozen:
            if name in params:
                params[name].requires_grad_(True)
        module.frozen, module.merged = (), False
        return module

    def lora_state_dict(self) -> dict:
        """The adapters' entries of ``state_dict()`` (keys ``experts_lora.*``), to save apart from
        the base; load them with ``load_state_dict(sd, strict=False)`` after ``add_lora``."""
        module = self._own_lora("lora_state_dict")
        return {f"experts_lora.{k}": v for k, v in module.state_dict().items()}
