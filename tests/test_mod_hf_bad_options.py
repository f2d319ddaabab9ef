"""add_mod with a bad option for any of its layers raises and leaves the model as it was: every
layer keeps its class, parameters, submodules and hooks, the config records no MoD layer, and the
logits are bit-equal to the untouched model's (a later valid add_mod then works)."""

import pytest
import torch

from helpers import TRANSFORMERS_MIN, TRANSFORMERS_REASON, skip_unsupported_transformers

pytest.importorskip("transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON)

from mixops.integrations.mod import add_mod
from test_mod_hf import batch, tiny

skip_unsupported_transformers()


def _snapshot(model):
    layers = model.model.layers
    return (
        [type(layer) for layer in layers],
        [sorted(dict(layer.named_modules())) for layer in layers],
        sorted(model.state_dict()),
        [len(layer._forward_pre_hooks) + len(layer._forward_hooks) for layer in layers],
        getattr(model.config, "mixops_mod", None),
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(capacities=[0.5, 0.5, 1]),  # the last layer's int 1 is refused after two converted
        dict(layers=[0, 2], capacity=0.5, causal_rule="no-such-rule"),
    ],
)
def test_a_bad_option_leaves_the_model_unchanged(kwargs):
    model = tiny()
    ids, mask = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    before = _snapshot(model)
    with pytest.raises((ValueError, TypeError)):
        add_mod(model, **kwargs)
    assert _snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)
    # The model can still be converted with valid options.
    assert len(add_mod(model, layers=[0, 2], capacity=0.5)) == 2
    assert sorted(model.config.mixops_mod["layers"]) == ["0", "2"]
