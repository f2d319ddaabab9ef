"""Shortcut-connected MoE: the routed experts take an earlier representation (the shortcut), so
their dispatch starts before the layer's dense work and the exchanges travel while it runs
(ScMoE, Cai et al. 2024, "Shortcut-connected Expert Parallelism"; LongCat-Flash).

- ``ScMoEBlock``: ``h = dense(x)``; ``out = h + routed(shortcut) + shared(norm(h))``, or
  ``h + output_norm(routed + shared)``; the shortcut (by default x, the preceding layer's output)
  can be normalised first (``shortcut_norm``), as Megatron-Core's shortcut MoE does.
- ``ShortcutDecoderLayer``: LongCat-Flash's layer (two attention and two dense MLP sublayers, the
  MoE fed from the first MLP's input), computed exactly as HF transformers'
  ``LongcatFlashDecoderLayer``; ``dual_sublayer_forward`` is its schedule, which
  ``mixops.integrations`` also gives HF's own layers.

Both run the MoE through its staged API: ``dispatch_start`` as soon as the shortcut exists, the
dense sublayers, ``run_experts``, more dense work, ``combine_finish`` last. With
``mixops.parallel.ExpertParallelMoE`` the all-to-alls overlap the dense work, forward and backward
(GPU: the communication stream; CPU: gloo's async work); with ``mixops.nn.MoE`` on one process the
same code runs in order with the same results. The dense work is recorded as "dense" compute in
the delay harness (``mixops.parallel.slow_link``).
"""

from torch import nn

from .._trace import traced_call

__all__ = ["ScMoEBlock", "ShortcutDecoderLayer", "dual_sublayer_forward"]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _dense(fn, *args):
    """``fn(*args)``, traced as "dense" compute in the delay harness (forward and backward)."""
    return traced_call("dense", fn, *args)


def _check_staged(moe, what):
    for stage in ("dispatch_start", "run_experts", "combine_finish"):
        if not callable(getattr(moe, stage, None)):
            raise TypeError(
                f"{what}: moe must have the staged API (dispatch_start, run_experts, "
                f"combine_finish): a mixops.nn.MoE or mixops.parallel.ExpertParallelMoE, "
                f"got {type(moe).__name__}"
            )


class ScMoEBlock(nn.Module):
    """One layer of the ScMoE form: ``[..., hidden] -> [..., hidden]``.

    Args:
        dense: the layer's dense sublayers, residual included (``h = dense(x, **kwargs)``; e.g. a
            pre-norm attention block returning ``x + attn(norm(x))``); a tuple result's first
            item is used.
        moe: a ``mixops.nn.MoE`` or ``mixops.parallel.ExpertParallelMoE`` (token choice). Its
            routed experts take the shortcut; its shared experts (if any) take ``norm(h)``, the
            current representation.
        norm: the pre-norm of the shared experts' input (None: h as is).
        shortcut_norm: normalise the shortcut before routing (None: as is).
        output_norm: ``out = h + output_norm(routed + shared)`` instead of ``h + routed + shared``.

    forward(x, shortcut=None, token_mask=None, **dense_kwargs): ``shortcut`` is the preceding
    sublayer's output (default: x itself, the preceding layer's output), same shape as x;
    ``token_mask`` leaves padding out of the router's losses and load counts.
    """

    def __init__(self, dense, moe, norm=None, shortcut_norm=None, output_norm=None):
        super().__init__()
        _check_staged(moe, "ScMoEBlock")
        self.dense, self.moe, self.norm = dense, moe, norm
        self.shortcut_norm, self.output_norm = shortcut_norm, output_norm

    def forward(self, x, shortcut=None, token_mask=None, **dense_kwargs):
        s = x if shortcut is None else shortcut
        if s.shape != x.shape:
            raise ValueError(
                f"ScMoEBlock: shortcut must have x's shape {tuple(x.shape)}, got {tuple(s.shape)}"
            )
        if self.shortcut_norm is not None:
            s = self.shortcut_norm(s)
        handle = self.moe.dispatch_start(s, token_mask)  # the exchange starts now
        h = _dense(lambda x: _first(self.dense(x, **dense_kwargs)), x)
        self.moe.run_experts(handle)
        u = h if self.norm is None else _dense(self.norm, h)
        # The shared experts run on u while the combine travels.
        m = self.moe.combine_finish(handle, shared_input=u)
        if self.output_norm is not None:
            m = self.output_norm(m)
        return h + m


def dual_sublayer_forward(layer, hidden_states, **attn_kwargs):
    """LongCat-Flash's layer schedule on any module with HF's attribute names (``self_attn``,
    ``mlps``, ``input_layernorm``, ``post_attention_layernorm``: pairs; ``mlp``: the MoE with the
    staged API)::

        h1 = x + attn0(ln_in0(x));  u = ln_post0(h1)     then the MoE's dispatch starts on u
        h3 = (h1 + mlp0(u)) + attn1(ln_in1(h1 + mlp0(u)))   then the experts run
        out = (h3 + mlp1(ln_post1(h3))) + MoE(u)            the combine finishes last

    which is HF's arithmetic in HF's order. ``attn_kwargs`` go to both attention sublayers."""
    attn, mlps = layer.self_attn, layer.mlps
    ln_in, ln_post = layer.input_layernorm, layer.post_attention_layernorm
    h1 = hidden_states + _first(attn[0](ln_in[0](hidden_states), **attn_kwargs))
    u = ln_post[0](h1)
    handle = layer.mlp.dispatch_start(u)

    def first_dense(h1, u):
        h2 = h1 + mlps[0](u)
        return h2 + _first(attn[1](ln_in[1](h2), **attn_kwargs))

    h3 = _dense(first_dense, h1, u)
    layer.mlp.run_experts(handle)
    d = _dense(lambda h3: mlps[1](ln_post[1](h3)), h3)
    return h3 + d + layer.mlp.combine_finish(handle)


class ShortcutDecoderLayer(nn.Module):
    """LongCat-Flash's decoder layer built from any modules: ``[batch, seq, hidden]`` in and out.

    Args:
        moe: ``mixops.nn.MoE`` or ``ExpertParallelMoE`` (stored as ``mlp``, HF's name).
        self_attn: two attention modules, ``attn(x, **kwargs)`` -> output or (output, ...).
        mlps: two dense MLPs (no norm, no residual).
        input_layernorm, post_attention_layernorm: two norms each.

    The attribute names are HF's, so state-dict keys match ``LongcatFlashDecoderLayer``'s.
    forward(hidden_states, **attn_kwargs): see ``dual_sublayer_forward``."""

    def __init__(self, moe, self_attn, mlps, input_layernorm, post_attention_layernorm):
        super().__init__()
        _check_staged(moe, "ShortcutDecoderLayer")
        for name, pair in (
            ("self_attn", self_attn),
            ("mlps", mlps),
            ("input_layernorm", input_layernorm),
            ("post_attention_layernorm", post_attention_layernorm),
        ):
            if len(pair) != 2:
                raise ValueError(f"ShortcutDecoderLayer: {name} must hold 2 modules")
            setattr(self, name, nn.ModuleList(pair))
        self.mlp = moe

    def forward(self, hidden_states, **attn_kwargs):
        return dual_sublayer_forward(self, hidden_states, **attn_kwargs)
