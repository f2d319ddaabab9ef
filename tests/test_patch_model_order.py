"""patch_model keeps the order of HF's parameters, state-dict keys and buffers, for every family it
supports: an optimizer state saved before patching and loaded by position (torch.optim's
state_dict holds parameter indices, not names) must map each moment onto the same tensor after.
The reference is the unpatched model itself; buffers mixops adds (each MoE's non-persistent
``tokens_per_expert`` load counter) are left out of the comparison, everything else must be equal
in order and identity."""

import pytest
import torch

from helpers import TRANSFORMERS_MIN, TRANSFORMERS_REASON, skip_unsupported_transformers

transformers = pytest.importorskip(
    "transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON
)

from hf_moe_models import tiny_moe_families  # noqa: E402
from mixops.integrations.transformers import patch_model  # noqa: E402

skip_unsupported_transformers()

# DeepSeek-V3 with a dense layer first: HF's layer order around it is kept.
MODELS = tiny_moe_families(deepseek_dense_first=True)

# What mixops adds: MoE's load counter (non-persistent, so never in a state dict).
_ADDED_BUFFERS = ("tokens_per_expert",)


def _orders(model):
    return (
        [(n, id(p)) for n, p in model.named_parameters()],
        list(model.state_dict()),
        [
            (n, id(b))
            for n, b in model.named_buffers()
            if n.rpartition(".")[2] not in _ADDED_BUFFERS
        ],
    )


@pytest.mark.parametrize("family", list(MODELS))
def test_patch_model_keeps_hf_parameter_key_and_buffer_order(family):
    torch.manual_seed(0)
    model = MODELS[family]()
    params, keys, buffers = _orders(model)
    assert patch_model(model)  # something was patched
    after_params, after_keys, after_buffers = _orders(model)
    assert [n for n, _ in after_params] == [n for n, _ in params]
    assert after_params == params  # the same Parameter objects at the same positions
    assert after_keys == keys
    assert after_buffers == buffers


def test_optimizer_state_saved_before_patching_loads_onto_the_same_tensors():
    # The failure mode this order protects: Adam's moments are stored by parameter index.
    torch.manual_seed(0)
    model = MODELS["qwen3_moe"]()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(ids, labels=ids).loss.backward()
    opt.step()
    saved = opt.state_dict()
    by_name = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    patch_model(model)
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt2.load_state_dict(saved)
    for n, p in model.named_parameters():
        assert torch.equal(opt2.state[p]["exp_avg"], by_name[n]), n
