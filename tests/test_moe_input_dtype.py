"""An MoE fed an input of another dtype than its weights (outside autocast) names the layer and
both dtypes and says how to fix it, instead of a grouped_mm dtype error from deep inside; under
autocast the input is cast as before."""

import pytest
import torch

from mixops.nn import MoE


@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float32),
    ],
)
def test_an_input_of_another_dtype_names_the_layer(x_dtype, w_dtype):
    torch.manual_seed(0)
    moe = MoE(32, 48, 4, 2, dtype=w_dtype)
    x = torch.randn(2, 5, 32, dtype=x_dtype)
    with pytest.raises(
        ValueError, match=rf"MoE: x is {x_dtype} but the layer's weights are {w_dtype}"
    ):
        moe(x)
    assert moe.to(x_dtype)(x).dtype == x_dtype


def test_autocast_still_casts():
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert MoE(32, 48, 4, 2)(torch.randn(2, 5, 32)).dtype == torch.bfloat16
