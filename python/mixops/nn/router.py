"""The router of the mixture layers: ``RouterConfig`` (how tokens choose experts: every option of
``mixops.ops.router_topk`` plus how the logits are made, checked once) and ``TopKRouter`` (the
projection that makes the logits). MoE uses both; MoA will use the same config for its heads.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RouterConfig", "TopKRouter"]

_SCORE_FNS = ("softmax", "sigmoid", "none", "relu")
_RULES = ("topk", "top_p", "cum_threshold")
_GROUP_SCORES = ("top2_sum", "max")
_POSITIVE_INTS = ("num_experts", "top_k", "num_groups", "groups_kept", "num_modalities")
_FLAGS = ("topk_then_score", "renormalize", "selection_bias", "router_fp32")


@dataclass(frozen=True)
class RouterConfig:
    """How tokens choose their experts. Every invalid value or combination raises ValueError
    naming the argument when the config is made, so the layers and converters using it do not
    check again.

    Args:
        num_experts, top_k: choose ``top_k`` of ``num_experts`` experts per token.
        score_fn, topk_then_score, renormalize, renorm_eps, scaling, num_groups, groups_kept,
            group_score, num_modalities: ``mixops.ops.router_topk``'s options (see there).
        selection_bias: the router holds a bias ``e_score_correction_bias`` [num_experts] added
            to the scores for choosing only (auxiliary-loss-free balancing, DeepSeek-V3).
        router_fp32: compute the logits in fp32 (DeepSeek-V3); otherwise in the input's dtype.
        rule, threshold: a variable number of experts per token, at most ``top_k`` (the bound,
            which fixes every shape): ``"top_p"`` (Huang et al. 2024) or ``"cum_threshold"``
            (XMoE) with ``threshold`` = p; ``score_fn="relu"`` (ReMoE) keeps the experts whose
            logit is > 0. Unchosen slots get id -1 and weight 0 (router_topk's docstring;
            mixops.nn.dynamic_routing has the rules' losses and counters).

    ``op_kwargs()`` gives the keyword arguments of ``router_topk`` (``k`` included).
    """

    num_experts: int
    top_k: int
    score_fn: str = "softmax"
    topk_then_score: bool = False
    renormalize: bool = True
    renorm_eps: float = 0.0
    scaling: float = 1.0
    num_groups: int = 1
    groups_kept: int = 1
    group_score: str = "top2_sum"
    num_modalities: int = 1
    selection_bias: bool = False
    router_fp32: bool = False
    rule: str = "topk"
    threshold: float = 0.0

    def __post_init__(self):
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"RouterConfig: {name} must be a positive int, got {v!r}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"RouterConfig: {name} must be a bool, got {getattr(self, name)!r}"
                )
        for name, low in (("renorm_eps", 0.0), ("scaling", -math.inf)):
            v = getattr(self, name)
            if (
                not isinstance(v, (int, float))
                or isinstance(v, bool)
                or not math.isfinite(v)
                or v < low
            ):
                raise ValueError(
                    f"RouterConfig: {name} must be a finite number"
                    f"{' >= 0' if low == 0 else ''}, got {v!r}"
                )
            object.__setattr__(self, name, float(v))  # the op takes doubles
        if self.score_fn not in _SCORE_FNS:
            raise ValueError(
                f"RouterConfig: score_fn must be 'softmax', 'sigmoid', 'none' or 'relu', "
                f"got {self.score_fn!r}"
            )
        self._check_rule()
        if self.group_score not in _GROUP_SCORES:
            raise ValueError(
                f"RouterConfig: group_score must be 'top2_sum' or 'max', got {self.group_score!r}"
            )
        E = self.num_experts
        if E % self.num_groups:
            raise ValueError(
                f"RouterConfig: num_groups ({self.num_groups}) must divide num_experts ({E})"
            )
        if self.groups_kept > self.num_groups:
            raise ValueError(
                f"RouterConfig: groups_kept ({self.groups_kept}) must be <= "
                f"num_groups ({self.num_groups})"
            )
        if E % self.num_modalities:
            raise ValueError(
                f"RouterConfig: num_modalities ({self.num_modalities}) must divide "
                f"num_experts ({E})"
            )
        if self.num_groups > 1 and self.num_modalities > 1:
            raise ValueError(
                "RouterConfig: num_groups > 1 and num_modalities > 1 cannot be combined"
            )
        if self.group_score == "top2_sum" and self.num_groups > 1 and E // self.num_groups < 2:
            raise ValueError(
                "RouterConfig: group_score='top2_sum' needs at least 2 experts per group"
            )
        if self.top_k > self.eligible:
            raise ValueError(
                f"RouterConfig: top_k ({self.top_k}) must be <= the experts a token "
                f"can choose from ({self.eligible}: num_experts={E}, "
                f"num_groups={self.num_groups}, groups_kept={self.groups_kept}, "
                f"num_modalities={self.num_modalities})"
            )

    def _check_rule(self):
        """rule and threshold, and the options they combine with (router_topk's rules)."""
        if self.rule not in _RULES:
            raise ValueError(
                f"RouterConfig: rule must be 'topk', 'top_p' or 'cum_threshold', got {self.rule!r}"
            )
        t = self.threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
            raise ValueError(f"RouterConfig: threshold must be a finite number, got {t!r}")
        object.__setattr__(self, "threshold", float(t))
        if self.rule == "topk" and t != 0:
            raise ValueError(
                f"RouterConfig: threshold ({t}) is the p of rule 'top_p' or 'cum_threshold'; "
                "rule is 'topk'"
            )
        if self.rule != "topk" and self.score_fn != "softmax":
            raise ValueError(
                f"RouterConfig: rule {self.rule!r} compares cumulative softmax probabilities; "
                f"score_fn must be 'softmax', got {self.score_fn!r}"
            )
        if self.rule == "topk" and self.score_fn != "relu":
            return
        what = f"rule {self.rule!r}" if self.rule != "topk" else "score_fn 'relu'"
        for name, bad in (
            ("topk_then_score", self.topk_then_score),
            ("selection_bias", self.selection_bias),
            ("num_groups > 1", self.num_groups > 1),
        ):
            if bad:
                raise ValueError(f"RouterConfig: {what} cannot be combined with {name}")

    @property
    def eligible(self) -> int:
        """How many experts one token can choose from (its modality's, or its kept groups')."""
        if self.num_groups > 1:
            return self.groups_kept * (self.num_experts // self.num_groups)
        return self.num_experts // self.num_modalities

    def op_kwargs(self) -> dict:
        """The keyword arguments of ``mixops.ops.router_topk`` (``k`` and every option; the
        per-call tensors ``bias``, ``modality`` and ``token_mask`` are the caller's)."""
        return dict(
            k=self.top_k,
            score_fn=self.score_fn,
            topk_then_score=self.topk_then_score,
            renormalize=self.renormalize,
            renorm_eps=self.renorm_eps,
            scaling=self.scaling,
            num_groups=self.num_groups,
            groups_kept=self.groups_kept,
            group_score=self.group_score,
            num_modalities=self.num_modalities,
            rule=self.rule,
            threshold=self.threshold,
        )

    @classmethod
    def option_names(cls) -> frozenset:
        """The field names, which the layers also accept as keyword arguments."""
        return frozenset(f.name for f in fields(cls))


class TopKRouter(nn.Module):
    """The router's projection: ``logits = x @ weight.T`` ([tokens, E]). With a selection bias it
    also holds ``e_score_correction_bias`` [E] (fp32 buffer, saved in the state dict)."""

    def __init__(self, hidden_size, num_experts, selection_bias=False, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, device=device, dtype=dtype)
        )
        if selection_bias:
            self.register_buffer(
                "e_score_correction_bias",
                torch.empty(num_experts, device=device, dtype=torch.float32),
            )
        self.reset_parameters()

    def reset_parameters(self):
        """``weight`` ~ N(0, 1/hidden); the selection bias zero."""
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)
        if hasattr(self, "e_score_correction_bias"):
            nn.init.zeros_(self.e_score_correction_bias)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))  # (a no-op cast unless under autocast)

    def _apply(self, fn, recurse=True):
        # module.to(bf16) must not round the selection bias (its updates are ~1e-3 steps): it
        # follows device moves only and stays fp32.
        bias = getattr(self, "e_score_correction_bias", None)
        out = super()._apply(fn, recurse)
        if bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return out
