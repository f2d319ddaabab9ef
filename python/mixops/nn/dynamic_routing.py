"""A variable number of experts per token: the rules' training signals and counters, attached to a
model's ``mixops.nn.MoE`` layers as forward hooks on their routers (``layer.gate``, whose output is
the logits), so the layers themselves need nothing more. The rules are ``router_topk``'s
(``rule="top_p"``, ``rule="cum_threshold"``, ``score_fn="relu"``; RouterConfig).

* ``bound_hits(logits, config)``: per token, whether the rule wanted more than the bound k.
* ``BoundHitCounter(model)``: per layer, a device-side count of the tokens that hit the bound.
* ``TopPEntropyLoss(model, coef)``: the dynamic (entropy) loss of "Harder Tasks Need More Experts"
  (Huang et al. 2024), ``mean_t(-sum_e P_te log P_te)`` per layer, summed over layers.
* ``ReMoEController(model, k)``: ReMoE's L1 regulariser (thu-ml/ReMoE) and its adaptive
  coefficient, stepped once per training iteration.

Nothing here reads a value back to the host: counts, losses and the coefficient stay on the
device. The hooks see the router's logits of every token the layer was given, padding included
(the gate does not see ``token_mask``).
"""

import torch
import torch.nn.functional as F

__all__ = ["BoundHitCounter", "ReMoEController", "TopPEntropyLoss", "bound_hits"]


def _layers(model, want, who):
    """The mixops MoE layers of ``model`` (itself included) whose router config passes ``want``."""
    from .moe import MoE

    found = [m for m in model.modules() if isinstance(m, MoE) and not m.expert_choice]
    layers = [m for m in found if want(m.router_config)]
    if not layers:
        raise ValueError(f"{who}: the model has no mixops MoE layer it applies to")
    return layers


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


def _slot_sum(values):
    """The sum of values [T, k] over the slots in slot order, as the kernel adds them (one
    rounding per addition, in values' dtype)."""
    c = torch.zeros_like(values[:, 0])
    for j in range(values.shape[1]):
        c = c + values[:, j]
    return c


def bound_hits(logits, config):
    """bool [T]: the tokens whose rule would take more than ``config.top_k`` experts (router_topk
    keeps their k best). top_p: the k best softmax scores sum to <= p; cum_threshold: to < p;
    relu: more than k logits are > 0; plain top-k: never. The scores are torch's softmax in fp32
    and the sums run in slot order as the kernel's do, so a sum within an ulp of p may be judged
    differently from the kernel's. Modalities: each token over its own group is not modelled
    (refused)."""
    if config.num_modalities > 1:
        raise ValueError("bound_hits: modality groups are not supported")
    x = _logits(logits).detach()
    k, E = config.top_k, x.shape[-1]
    x = x.reshape(-1, E)
    if config.score_fn == "relu":
        return (x > 0).sum(-1) > k
    if config.rule == "topk" or k >= E:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    top = torch.softmax(x.to(acc), -1).topk(k, -1).values
    c = _slot_sum(top)
    p = config.threshold
    return c <= p if config.rule == "top_p" else c < p


class _RouterHooks:
    """Forward hooks on the routers of the chosen layers; ``remove()`` detaches them."""

    def __init__(self, model, want, who):
        self.layers = _layers(model, want, who)
        self._handles = [
            m.gate.register_forward_hook(self._hook_for(i)) for i, m in enumerate(self.layers)
        ]

    def _hook_for(self, i):
        def hook(module, args, out):
            self._observe(i, self.layers[i], _logits(out))

        return hook

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


class BoundHitCounter(_RouterHooks):
    """Per layer, the tokens whose rule hit the bound k since the last ``reset()``:
    ``hits[i]`` (int64 0-dim device tensors, in ``layers`` order; no sync)."""

    def __init__(self, model):
        super().__init__(
            model, lambda c: c.rule != "topk" or c.score_fn == "relu", "BoundHitCounter"
        )
        self.hits = [None] * len(self.layers)

    def _observe(self, i, layer, logits):
        n = bound_hits(logits, layer.router_config).sum()
        self.hits[i] = n if self.hits[i] is None else self.hits[i] + n

    def reset(self):
        self.hits = [None] * len(self.layers)


class TopPEntropyLoss(_RouterHooks):
    """Huang et al.'s dynamic loss on every top-p layer: ``coef * sum_layers mean_t(-sum_e P_te
    log P_te)``, P the router's softmax in fp32 (minimising it makes the router confident, so
    top-p takes fewer experts). ``loss()`` returns the sum since its last call (a 0-dim tensor with
    autograd; 0 when no layer ran) and starts over. The paper's coefficient is 1e-4 (from the
    paper's text; the authors released inference code only)."""

    def __init__(self, model, coef=1e-4):
        super().__init__(model, lambda c: c.rule in ("top_p", "cum_threshold"), "TopPEntropyLoss")
        self.coef = float(coef)
        self._terms = []

    def _observe(self, i, layer, logits):
        if not torch.is_grad_enabled():
            return
        x = logits.reshape(-1, logits.shape[-1])
        logp = torch.log_softmax(x.double() if x.dtype == torch.float64 else x.float(), -1)
        self._terms.append(-(logp.exp() * logp).sum(-1).mean())

    def loss(self):
        terms, self._terms = self._terms, []
        if not terms:
            return torch.zeros(())
        return self.coef * torch.stack(terms).sum()


class ReMoEController(_RouterHooks):
    """ReMoE's regulariser and its controller (thu-ml/ReMoE, router.py L353-404, moe_utils.py
    L46-55, training.py L1493-1506) on every ``score_fn="relu"`` layer.

    Per layer and forward (training, grad enabled): ``L1 = lam * E / (k * T^2) * sum_e (sum_t
    relu(x_te)) * n_e`` with ``n_e = sum_t [x_te > 0]`` (no gradient), summed over layers;
    ``loss()`` returns it (0-dim, autograd) and starts over. The measured sparsity, each forward's
    share of logits <= 0 averaged over the layers' forwards (as ReMoE averages over layers and
    micro-batches), drives ``step()``, called once per training
    iteration after the optimizer step: ``lam *= multiplier`` while it is below the target
    ``1 - k / E``, else ``lam /= multiplier``. ``lam`` (fp32 device tensor) and the accumulators
    never leave the device. ``k``: the target number of active experts per token (ReMoE's
    ``moe_router_topk``; it may be below the layers' bound)."""

    def __init__(self, model, k, lam=1e-8, multiplier=1.2):
        super().__init__(model, lambda c: c.score_fn == "relu", "ReMoEController")
        Es = {m.num_experts for m in self.layers}
        if len(Es) != 1:
            raise ValueError(f"ReMoEController: the relu layers have different E: {sorted(Es)}")
        (self.num_experts,) = Es
        if not (isinstance(k, (int, float)) and 0 < k <= self.num_experts):
            raise ValueError(
                f"ReMoEController: k must be in (0, E = {self.num_experts}], got {k!r}"
            )
        if not multiplier > 1:
            raise ValueError(f"ReMoEController: multiplier must be > 1, got {multiplier!r}")
        self.k, self.multiplier = k, float(multiplier)
        self.target = 1 - k / self.num_experts
        device = self.layers[0].gate.weight.device
        self.lam = torch.tensor(float(lam), dtype=torch.float32, device=device)
        self._sparsity = torch.zeros((), device=device)  # sum over forwards
        self._seen = torch.zeros((), device=device)  # forwards
        self._terms = []

    def _observe(self, i, layer, logits):
        if not (layer.training and torch.is_grad_enabled()):
            return
        x = logits.reshape(-1, logits.shape[-1])
        T, E = x.shape
        active = x.detach() > 0
        n = active.sum(0).to(torch.float32)
        mass = F.relu(x.float()).sum(0)
        self._terms.append(self.lam * (E / (self.k * T * T)) * (mass * n).sum())
        self._sparsity += 1 - active.sum() / max(active.numel(), 1)
        self._seen += 1

    def loss(self):
        terms, self._terms = self._terms, []
        if not terms:
            return torch.zeros((), device=self.lam.device)
        return torch.stack(terms).sum()

    @torch.no_grad()
    def step(self):
        """One update of ``lam`` from the sparsity measured since the last step (no update when
        no training forward ran)."""
        sparsity = self._sparsity / self._seen.clamp(min=1)
        up = torch.tensor(self.multiplier, device=self.lam.device)
        factor = torch.where(sparsity < self.target, up, 1 / up)
        self.lam.mul_(torch.where(self._seen > 0, factor, torch.ones_like(factor)))
        self.last_sparsity = sparsity
        self._sparsity.zero_()
        self._seen.zero_()
