"""PEFT's LoRA on fused expert weights (``LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"])``) on mixops' adapter path: the base grouped GEMMs on the unmodified
expert weights plus each adapter as two thin grouped GEMMs per projection (nn/lora.py), where PEFT
itself would fold ``W + scale * B A`` for every expert on every forward (twice: once more for
``register_parametrization``'s consistency check).

What PEFT 0.21 builds (peft/tuners/lora/layer.py, ``ParamWrapper``): ``mlp.experts`` becomes a
``lora.ParamWrapper`` per targeted parameter, nested (``experts.base_layer`` is the next wrapper,
the innermost ``base_layer`` the HF experts module). For a weight of E experts, rank r, ``in`` and
``out`` features (HF's [E, out, in], or [E, in, out] when ``is_transposed``):
``lora_A[name].weight`` [r*E, in], row ``e*r + j``; ``lora_B[name].weight`` [out, r*E], column
``j*E + e``; expert e's delta ``scaling[name] * B_e A_e`` (``scaling``: alpha / r, rsLoRA alpha /
sqrt(r)). Its forward: disabled adapters -> the base (unmerging first if merged); merged -> the
base; else the active adapters that the wrapper holds, summed. Dropout, DoRA and ``lora_bias``
are refused by PEFT itself.

Two ways in, both keeping PEFT's modules, names, state dict and adapter files:

- ``experts_implementation="mixops"`` (HF's block calls its experts module): ``install()``
  replaces ``ParamWrapper._activate_lora`` so that, for an experts module running mixops'
  implementation, the wrapper records its active adapters for the call instead of parametrizing
  the weight; ``mixops_experts_forward`` reads them (``call_adapters``). Other modules, other
  implementations and other parameters keep PEFT's own path.
- ``patch_model`` (before or after ``get_peft_model``): the patched layer keeps PEFT's wrapper as
  its ``experts``; ``adopt`` gives the outer wrapper a subclass that also shows the wrapped
  projections (the base weights) and sets the layer's ``lora_provider`` to ``PeftAdapters``, which
  follows the wrapper's forward's rules above.

Tested with PEFT 0.21 (``PEFT_TESTED``); outside it mixops leaves PEFT's expert LoRA to PEFT.
"""

import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.metadata import version

import torch

try:
    from peft.tuners.lora.layer import ParamWrapper
except ImportError as e:  # pragma: no cover - exercised only without peft
    raise ImportError(
        "mixops.integrations.peft needs PEFT: pip install -r requirements-peft.txt"
    ) from e

from ..nn.lora import ProjectionAdapter

__all__ = ["PEFT_TESTED", "PeftAdapters", "adopt", "call_adapters", "install"]

# The PEFT versions this integration is tested with, [min, below).
PEFT_TESTED = ("0.21", "0.22")

# Targeted parameter -> mixops' adapter key (the first projection is "gate_up" either way).
_KEYS = {"gate_up_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}

# (experts module, wrapper, active adapter names) of every wrapper whose forward is running around
# an experts module that mixops computes (a ContextVar: per thread, and no state on the modules).
_CALLS = ContextVar("mixops_peft_calls", default=())

_peft_activate_lora = ParamWrapper._activate_lora


def tested() -> bool:
    """The installed PEFT is in ``PEFT_TESTED``."""
    from packaging.version import Version

    lo, below = PEFT_TESTED
    return Version(lo) <= Version(version("peft")) < Version(below)


def install() -> bool:
    """Route PEFT's expert LoRA through mixops where mixops computes the experts (idempotent).
    False, with a warning, when the installed PEFT is outside ``PEFT_TESTED``."""
    if not tested():
        warnings.warn(
            f"mixops: peft {version('peft')} is outside the tested range "
            f">={PEFT_TESTED[0]},<{PEFT_TESTED[1]}: PEFT's LoRA on experts runs PEFT's own path "
            "(W + B A per expert) and patch_model leaves PEFT-wrapped blocks as they are",
            UserWarning,
            stacklevel=3,
        )
        return False
    if not hasattr(ParamWrapper._activate_lora, "peft"):
        ParamWrapper._activate_lora = _activate_lora
    return True


def _ours(wrapper) -> bool:
    """A 3-D expert projection that mixops' adapter path can take."""
    return wrapper.parameter_name in _KEYS and getattr(wrapper, "_param_ndim", 0) == 3


@contextmanager
def _activate_lora(self, active_adapters):
    """``ParamWrapper._activate_lora``: PEFT's, except around an HF experts module that runs
    mixops' experts implementation, where it records the call's adapters instead."""
    base = self.get_base_layer()
    config = getattr(base, "config", None)
    # has_gate: set by HF's use_experts_implementation, whose forward dispatches on the config.
    if not (
        getattr(config, "_experts_implementation", None) == "mixops"
        and hasattr(base, "has_gate")
        and _ours(self)
    ):
        with _peft_activate_lora(self, active_adapters):
            yield
        return
    token = _CALLS.set(_CALLS.get() + ((base, self, tuple(active_adapters)),))
    try:
        yield
    finally:
        _CALLS.reset(token)


_activate_lora.peft = _peft_activate_lora  # install() replaces PEFT's once per process


def call_adapters(experts) -> dict:
    """``{"gate_up"/"down": ProjectionAdapter}`` of the PEFT wrappers running around ``experts``
    in this call (``mixops_experts_forward``); ``{}`` without any."""
    out = {}
    for base, wrapper, names in _CALLS.get():
        if base is experts:
            ad = projection_adapter(wrapper, names)
            if ad is not None:
                out[_KEYS[wrapper.parameter_name]] = ad
    return out


def projection_adapter(wrapper, names):
    """The sum of ``wrapper``'s adapters ``names`` (those it holds) as one ProjectionAdapter of
    views of PEFT's factors (several: concatenated along the rank, each B scaled), or None."""
    E = wrapper.num_experts
    parts = []
    for name in names:
        if name not in wrapper.lora_A:
            continue
        A = wrapper.lora_A[name].weight  # [r*E, in], row e*r + j
        B = wrapper.lora_B[name].weight  # [out, r*E], column j*E + e
        r = A.shape[0] // E
        A = A.reshape(E, r, A.shape[1])  # [E, r, in]
        B = B.reshape(B.shape[0], r, E).permute(2, 0, 1)  # [E, out, r]
        parts.append((A, B, wrapper.scaling[name]))
    if len(parts) <= 1:
        return ProjectionAdapter(*parts[0]) if parts else None
    A = torch.cat([A for A, _, _ in parts], dim=1)
    B = torch.cat([B * scale for _, B, scale in parts], dim=2)
    return ProjectionAdapter(A, B, 1.0)


def _wrappers(module):
    """The ParamWrappers around an experts module, outermost first."""
    out = []
    while isinstance(module, ParamWrapper):
        out.append(module)
        module = module.base_layer
    return out


class ExpertsParamWrapper(ParamWrapper):
    """PEFT's ParamWrapper as the ``experts`` of a mixops layer (its class swapped in place, as
    patch_model does with HF's routers: the same object, state and PEFT behaviour). It also shows
    the wrapped experts' projections (``gate_up_proj``, ``up_proj``, ``down_proj``: the base
    weights, without adapters, as PEFT's wrapped parameters always read) for the layer to read."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _KEYS:
                return getattr(self.get_base_layer(), name)
            raise


class PeftAdapters:
    """The ``lora_provider`` of a mixops layer whose ``experts`` PEFT wraps: the adapters of each
    wrapper by the rules of ``ParamWrapper.forward`` (disabled: none, unmerging first as PEFT
    does; merged: none; else the active adapters, summed). Holds the layer, not the wrappers, so
    ``merge_and_unload`` or a new ``get_peft_model`` is followed."""

    def __init__(self, moe):
        self.moe = moe

    def __call__(self) -> dict:
        out = {}
        for wrapper in _wrappers(self.moe._modules["experts"]):
            if not _ours(wrapper):
                raise NotImplementedError(
                    f"mixops: PEFT's LoRA on experts.{wrapper.parameter_name} is not supported "
                    f"by mixops' layer (targets: {', '.join(_KEYS)})"
                )
            if wrapper.disable_adapters:
                if wrapper.merged:
                    wrapper.unmerge()
                continue
            if wrapper.merged:
                continue
            ad = projection_adapter(wrapper, wrapper.active_adapters)
            if ad is not None:
                out[_KEYS[wrapper.parameter_name]] = ad
        return out


def adopt(moe) -> None:
    """Make the mixops layer ``moe`` read the adapters of PEFT's wrappers around its experts, if
    any (patch_model, and each forward of its layers: get_peft_model may come after). Cheap when
    already done or without PEFT."""
    outer = moe._modules["experts"]
    if not isinstance(outer, ParamWrapper):
        return
    if type(outer) is ParamWrapper:
        outer.__class__ = ExpertsParamWrapper
    provider = moe.__dict__.get("lora_provider")
    if isinstance(provider, PeftAdapters):
        return
    if provider is not None:
        raise RuntimeError(
            "mixops: this layer has its own adapters (MoE.add_lora) and PEFT wraps its experts; "
            "use one of the two (remove_lora(), or PEFT alone)"
        )
    moe.lora_provider = PeftAdapters(moe)
