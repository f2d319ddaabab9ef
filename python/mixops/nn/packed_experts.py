"""Experts of different widths in one layer (HMoE, AutoMoE; ``MoE(..., ffn_sizes=[...])``):
``PackedExperts``, their weights packed without padding, and ``packed_expert_mlp``, their
computation on rows grouped by expert through ``mixops.ops.grouped_mm_packed``.

Layout (E experts of widths F_e, ``P_e = F_0 + .. + F_{e-1}``, ``S = sum F_e``, ``Fm = max F_e``):

* ``gate_up_proj`` [2S, hidden] (gated activations): expert e owns rows [2P_e, 2P_e + 2F_e),
  gate and up rows *interleaved*: g_0, u_0, g_1, u_1, ... (GPT-OSS's convention, not HF's
  gate-first ``chunk(2)``). ``up_proj`` [S, hidden] without a gate: expert e owns [P_e, P_e + F_e).
* ``down_proj`` [hidden, S]: expert e owns the columns [P_e, P_e + F_e).
* The intermediate activations of N rows: one [N, 2Fm] buffer; a row of expert e holds
  g_0, u_0, ..., g_{F_e-1}, u_{F_e-1} in its first 2F_e columns and zeros after. Shapes depend on
  N, Fm and S only, never on the routing (static shapes, no host sync), and because gate and up of
  one expert are adjacent every one of the six GEMMs (forward and backward) is a single grouped
  launch with E groups.

``to_padded`` / ``from_padded`` convert to and from HF transformers' v5 padded 3-D tensors
(gate-first, zero padding), for checkpoints that pad every expert to the largest.
"""

import contextlib
import itertools
from typing import NamedTuple

import torch
from torch import nn

from .. import ops
from .activations import GATED, act_fn, fused_activation_name
from .experts import Experts, local_tensor

__all__ = [
    "PackedExperts",
    "PackedSpec",
    "check_ffn_sizes",
    "make_experts",
    "packed_expert_mlp",
    "size_weights",
]


def check_ffn_sizes(ffn_sizes, who="MoE"):
    """``ffn_sizes`` as a tuple of ints >= 1 (a clear ValueError otherwise)."""
    try:
        sizes = tuple(ffn_sizes)
    except TypeError:
        raise ValueError(
            f"{who}: ffn_sizes must be a sequence of ints, got {ffn_sizes!r}"
        ) from None
    if not sizes:
        raise ValueError(f"{who}: ffn_sizes must name at least one expert, got {ffn_sizes!r}")
    for e, f in enumerate(sizes):
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise ValueError(f"{who}: ffn_sizes[{e}] must be an int >= 1, got {f!r}")
    return sizes


class PackedSpec(NamedTuple):
    """What ``packed_expert_mlp`` needs besides the weights (``PackedExperts.spec()``)."""

    ends_first: torch.Tensor  # [E] int32 cumulative ends of w1's rows per expert (2F_e or F_e)
    ends_down: torch.Tensor  # [E] int32 cumulative ends of the widths F_e (down_proj's columns)
    ffn_max: int  # Fm
    ffn_total: int  # S
    gated: bool


class PackedExperts(nn.Module):
    """E experts of widths ``ffn_sizes`` with packed weights (layout: module docstring):
    ``gate_up_proj`` [2S, hidden] (interleaved per expert) or ``up_proj`` [S, hidden], and
    ``down_proj`` [hidden, S]; the HF names, so state-dict keys read ``experts.gate_up_proj`` etc.
    The non-persistent int32 buffer ``ffn_ends`` [2, E] (row 0: the first projection's cumulative
    row ends, row 1: the cumulative widths) is rebuilt by ``reset_parameters`` and by every
    ``to_empty``/``to`` (meta-device init + ``to_empty()`` needs nothing more for it)."""

    def __init__(self, hidden_size, ffn_sizes, gated=True, device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.ffn_sizes = check_ffn_sizes(ffn_sizes, "PackedExperts")
        self.gated = bool(gated)
        S = sum(self.ffn_sizes)
        kw = dict(device=device, dtype=dtype)
        w1 = nn.Parameter(torch.empty(2 * S if gated else S, hidden_size, **kw))
        if gated:
            self.gate_up_proj = w1
        else:
            self.up_proj = w1
        self.down_proj = nn.Parameter(torch.empty(hidden_size, S, **kw))
        E = len(self.ffn_sizes)
        ends = torch.empty(2, E, dtype=torch.int32, device=device)
        self.register_buffer("ffn_ends", ends, persistent=False)
        self.reset_parameters()

    @property
    def num_experts(self):
        return len(self.ffn_sizes)

    def _first(self):
        return self.gate_up_proj if self.gated else self.up_proj

    def _ends_values(self):
        ends = list(itertools.accumulate(self.ffn_sizes))
        first = [2 * v for v in ends] if self.gated else ends
        return [first, ends]

    @torch.no_grad()
    def _fill_ends(self):
        if self.ffn_ends.device.type != "meta":
            self.ffn_ends.copy_(torch.tensor(self._ends_values(), dtype=torch.int32))

    def _apply(self, fn, *args, **kwargs):
        # to_empty() (and .to(), .cuda()) go through _apply: the buffer is rebuilt after them, so
        # a layer built on the meta device and materialised has valid ends before any
        # reset_parameters() or load_state_dict().
        out = super()._apply(fn, *args, **kwargs)
        self._fill_ends()
        return out

    def reset_parameters(self):
        """Each expert's projections ~ N(0, 1/fan_in) as in ``Experts``: the first projection
        std ``hidden**-0.5``, expert e's down columns std ``F_e**-0.5``; rebuilds ``ffn_ends``."""
        nn.init.normal_(self._first(), std=self.hidden_size**-0.5)
        with torch.no_grad():
            for p, f in zip(self._starts(), self.ffn_sizes):
                nn.init.normal_(self.down_proj[:, p : p + f], std=f**-0.5)
        self._fill_ends()

    def _starts(self):
        return [0, *self._ends_values()[1][:-1]]

    def spec(self) -> PackedSpec:
        return PackedSpec(
            self.ffn_ends[0], self.ffn_ends[1], max(self.ffn_sizes), sum(self.ffn_sizes), self.gated
        )

    def weights(self):
        """``(w1, w2)``: the first projection and ``down_proj``, plain tensors (as ``Experts``)."""
        return local_tensor(self._first()), local_tensor(self.down_proj)

    def forward(self, fn, *args):
        """``fn(w1, w2, *args)`` on ``weights()``, as this module's call (see ``Experts``)."""
        w1, w2 = self.weights()
        return fn(w1, w2, *args)

    def expert_weights(self, e):
        """Expert e's weights as views (no copy), in HF's per-expert shapes: ``{"gate_proj":
        [F_e, hidden], "up_proj": [F_e, hidden], "down_proj": [hidden, F_e]}`` (no
        ``gate_proj`` without a gate)."""
        if not -self.num_experts <= e < self.num_experts:
            raise IndexError(f"PackedExperts.expert_weights: expert {e} of {self.num_experts}")
        e %= self.num_experts
        p, f = self._starts()[e], self.ffn_sizes[e]
        out = {}
        if self.gated:
            rows = self.gate_up_proj[2 * p : 2 * p + 2 * f]
            out["gate_proj"], out["up_proj"] = rows[0::2], rows[1::2]
        else:
            out["up_proj"] = self.up_proj[p : p + f]
        out["down_proj"] = self.down_proj[:, p : p + f]
        return out

    @torch.no_grad()
    def to_padded(self):
        """HF v5 padded tensors: ``(gate_up [E, 2*Fm, hidden] gate-first, down [E, hidden, Fm])``
        (``up`` [E, Fm, hidden] without a gate); expert e's gate in rows [0, F_e), its up in
        [Fm, Fm + F_e), its down columns [0, F_e), zeros elsewhere. A uniform layer of width Fm
        with these weights computes the same function (padding contributes act(0) * 0 = 0)."""
        E, Fm, H = self.num_experts, max(self.ffn_sizes), self.hidden_size
        w1, w2 = self._first(), self.down_proj
        first = w1.new_zeros(E, 2 * Fm if self.gated else Fm, H)
        down = w2.new_zeros(E, H, Fm)
        for e, f in enumerate(self.ffn_sizes):
            w = self.expert_weights(e)
            if self.gated:
                first[e, :f] = w["gate_proj"]
                first[e, Fm : Fm + f] = w["up_proj"]
            else:
                first[e, :f] = w["up_proj"]
            down[e, :, :f] = w["down_proj"]
        return first, down

    @classmethod
    def from_padded(cls, gate_up, down, ffn_sizes):
        """The packed experts of HF v5 padded tensors ``gate_up`` [E, 2*Fp, hidden] (gate-first;
        or ``up`` [E, Fp, hidden] without a gate) and ``down`` [E, hidden, Fp], keeping expert
        e's first F_e gate/up rows and down columns (Fp >= max ffn_sizes). The dropped padding
        must be zero (a ValueError names the first expert and tensor where it is not). On
        ``gate_up``'s device and dtype; no autograd link to the inputs."""
        sizes = check_ffn_sizes(ffn_sizes, "PackedExperts.from_padded")
        who = "PackedExperts.from_padded"
        if gate_up.dim() != 3 or down.dim() != 3:
            raise ValueError(
                f"{who}: gate_up and down must be 3-D ([E, 2*F or F, hidden], [E, hidden, F]), "
                f"got shapes {tuple(gate_up.shape)} and {tuple(down.shape)}"
            )
        E, H, Fp = down.shape
        if E != len(sizes) or gate_up.shape[0] != E or gate_up.shape[2] != H:
            raise ValueError(
                f"{who}: shapes {tuple(gate_up.shape)} and {tuple(down.shape)} do not fit "
                f"{len(sizes)} experts (len(ffn_sizes)) of one hidden size"
            )
        if gate_up.shape[1] not in (Fp, 2 * Fp):
            raise ValueError(
                f"{who}: gate_up's dim 1 must be 2*F (gated) or F with F = down.shape[2] = {Fp}, "
                f"got {gate_up.shape[1]}"
            )
        if max(sizes) > Fp:
            raise ValueError(f"{who}: ffn_sizes {sizes} exceed the padded width {Fp}")
        gated = gate_up.shape[1] == 2 * Fp
        halves = (("gate", 0), ("up", Fp)) if gated else (("up", 0),)
        for e, f in enumerate(sizes):
            for name, start in halves:
                if f < Fp and bool((gate_up[e, start + f : start + Fp] != 0).any()):
                    raise ValueError(
                        f"{who}: expert {e} (ffn_sizes[{e}] = {f}) has non-zero {name} rows in "
                        f"its padding [{f}, {Fp}) of gate_up: they would be dropped"
                    )
            if f < Fp and bool((down[e, :, f:] != 0).any()):
                raise ValueError(
                    f"{who}: expert {e} (ffn_sizes[{e}] = {f}) has non-zero down columns in its "
                    f"padding [{f}, {Fp}): they would be dropped"
                )
        mod = cls(H, sizes, gated, device="meta", dtype=gate_up.dtype)
        mod.to_empty(device=gate_up.device)
        with torch.no_grad():
            for e, f in enumerate(sizes):
                w = mod.expert_weights(e)
                if gated:
                    w["gate_proj"].copy_(gate_up[e, :f])
                    w["up_proj"].copy_(gate_up[e, Fp : Fp + f])
                else:
                    w["up_proj"].copy_(gate_up[e, :f])
                w["down_proj"].copy_(down[e, :, :f])
        return mod

    def extra_repr(self):
        sizes = ", ".join(map(str, self.ffn_sizes))
        return f"hidden={self.hidden_size}, ffn_sizes=[{sizes}], gated={self.gated}"


def packed_expert_mlp(rows, offsets, spec, w1, w2, activation, stage=None):
    """The experts of widths F_e on ``rows`` [N, hidden] grouped by expert (``offsets`` [E] int32
    ends): [N, hidden]. ``spec``: ``PackedExperts.spec()``; ``w1`` [2S or S, hidden] and ``w2``
    [hidden, S] the packed weights (used through transposed views, whose gradients the op writes
    in the parameters' own layout); ``stage(name, x)``: a context manager around each stage.

    gate_up: ``grouped_mm_packed(rows, w1.t(), offsets, ends_first, "mn", 2*Fm, 2S)`` -> h [N,
    2Fm], row of expert e = g_0, u_0, ..., zeros after 2F_e; the interleaved gated activation;
    down: ``grouped_mm_packed(a, w2.t(), offsets, ends_down, "mk", Fm, S)`` reads each row's first
    F_e columns only."""
    Fm, S = spec.ffn_max, spec.ffn_total
    gated = activation in GATED
    if gated != spec.gated:
        raise ValueError(
            f"MoE: activation {activation!r} needs {'gated' if gated else 'ungated'} experts, "
            f"the packed experts are {'gated' if spec.gated else 'not gated'}"
        )
    stage = stage or _no_stage
    with stage("gate_up_gemm", rows):
        n = 2 if gated else 1  # gate/up pairs, or up rows alone
        h = ops.grouped_mm_packed(rows, w1.t(), offsets, spec.ends_first, "mn", n * Fm, n * S)
    with stage("activation", rows):
        if gated:
            # The interleaved form reads h's pairs in place and writes d h in h's layout (no
            # copies); a row's padding (zeros) gives act(0) * 0 = 0 and zero gradients.
            a = ops.gated_activation(h, fused_activation_name(activation), interleaved=True)
        else:
            a = act_fn(activation)(h)  # act(0) = 0: the padding stays zero (and is never read)
    with stage("down_gemm", rows):
        return ops.grouped_mm_packed(a, w2.t(), offsets, spec.ends_down, "mk", Fm, S)


def _no_stage(name, x):
    return contextlib.nullcontext()


def size_weights(ffn_ends, num_zero_experts=0):
    """[E + Z] float32: each expert's width over the mean width (``F_e / mean F``; 0 for the
    zero-computation experts), from the cumulative widths ``ffn_ends`` [E] (device, no sync)."""
    w = torch.diff(ffn_ends, prepend=ffn_ends.new_zeros(1)).float()
    w = w / w.mean()
    if num_zero_experts:
        w = torch.cat([w, w.new_zeros(num_zero_experts)])
    return w


def make_experts(hidden_size, ffn_size, ffn_sizes, num_experts, gated, device=None, dtype=None):
    """MoE's routed experts: ``PackedExperts`` of widths ``ffn_sizes`` when given, else
    ``Experts`` of width ``ffn_size``."""
    if ffn_sizes is not None:
        return PackedExperts(hidden_size, ffn_sizes, gated, device=device, dtype=dtype)
    return Experts(hidden_size, ffn_size, num_experts, gated, device=device, dtype=dtype)
