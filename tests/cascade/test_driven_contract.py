"""Every driven layer meets the contract a Cascade relies on (lorasc_kernels.cascade.driven), as
tests/backends/test_backend_contract.py checks every backend: LoRASCLinear with a float weight and
with each fp8 format (storage and compute modes), and the PEFT adapter layer."""

import pytest
import torch
from torch import nn

from lorasc_kernels import LoRASCLinear
from lorasc_kernels.backends import BACKENDS
from lorasc_kernels.cascade.driven import DrivenLayer
from lorasc_kernels.cascade.merges import MergeRequest, merge_operands, prepare_merges
from lorasc_kernels.formats.registry import WEIGHT_FORMATS

IN, OUT, R = 12, 10, 2


def lorasc_layer(weight_format, compute=None):
    def build():
        layer = LoRASCLinear(
            IN, OUT, r=R, lora_alpha=4, weight_format=weight_format, compute=compute
        )
        return nn.Sequential(layer), "0", layer

    return build


def peft_layer():
    peft = pytest.importorskip("peft")
    from lorasc_kernels.integrations.peft import peft_lora_layers

    config = peft.LoraConfig(r=R, lora_alpha=4, target_modules=["0"])
    model = peft.get_peft_model(nn.Sequential(nn.Linear(IN, OUT)), config)
    ((name, layer),) = peft_lora_layers(model).items()
    return model, name, layer


LAYERS = {
    "lorasc-float": lorasc_layer(None),
    **{f"lorasc-{name}": lorasc_layer(name) for name in WEIGHT_FORMATS},
    **{f"lorasc-{name}-compute-fp8": lorasc_layer(name, "fp8") for name in WEIGHT_FORMATS},
    "peft": peft_layer,
}


@pytest.fixture(params=list(LAYERS))
def driven(request):
    torch.manual_seed(0)
    return LAYERS[request.param]()


def test_members_and_shapes(driven):
    model, name, layer = driven
    assert isinstance(layer, DrivenLayer)
    assert model.get_submodule(name) is layer.driven_module
    assert layer.weight.shape == (OUT, IN)
    assert layer.bias is None or layer.bias.shape == (OUT,)
    assert layer.lora_A.shape == (R, IN) and layer.lora_B.shape == (OUT, R)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert isinstance(layer.scaling, float) and layer.scaling == 2.0
    assert layer.backend in BACKENDS
    assert layer.weight_noise is None
    if layer.weight_format is None:
        assert layer.weight_scale is None and layer.weight.dtype.is_floating_point
    else:
        assert layer.weight_format in WEIGHT_FORMATS
        assert layer.weight_scale.shape == (OUT,) and layer.weight_scale.dtype == torch.float32
        assert isinstance(layer.dequantize_dtype, torch.dtype)
    layer.check_unchanged(name)  # a fresh layer can be driven


def test_reset_lora_draws_a_from_the_generator_and_zeroes_b(driven):
    _, _, layer = driven
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    layer.reset_lora(torch.Generator().manual_seed(3))
    first = layer.lora_A.detach().clone()
    assert torch.count_nonzero(layer.lora_B) == 0
    layer.reset_lora(torch.Generator().manual_seed(3))
    assert torch.equal(layer.lora_A, first) and torch.count_nonzero(first) > 0
    layer.reset_lora(torch.Generator().manual_seed(4))
    assert not torch.equal(layer.lora_A, first)


def test_a_boundary_merge_adds_the_update_to_weight(driven):
    """A merge request of the layer adds ``coeff · B A`` to its (dequantized) weight."""
    _, name, layer = driven
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    before = layer.to_linear().weight.detach().float().clone()
    update = layer.scaling * (layer.lora_B.detach().float() @ layer.lora_A.detach().float())
    weight, row_offset, lora_b, lora_a = merge_operands(layer)
    assert (tuple(weight.shape), row_offset) == ((OUT, IN), 0)
    assert torch.equal(lora_b, layer.lora_B) and torch.equal(lora_a, layer.lora_A)
    request = MergeRequest(name, layer, 5, layer.scaling, None, None)
    (merge,) = prepare_merges([request], "nearest", [layer])
    merge()
    after = layer.to_linear().weight.detach().float()
    # fp8: one rounding of each element in its row's scale (e5m2 keeps 3 significant bits)
    tolerance = 1e-5 if layer.weight_format is None else 0.13 * after.abs().max()
    assert (after - (before + update)).abs().max() <= tolerance


def test_to_linear_is_the_plain_linear_finalize_puts_back(driven):
    _, _, layer = driven
    linear = layer.to_linear()
    assert type(linear) is nn.Linear
    assert (linear.in_features, linear.out_features) == (IN, OUT)
    if layer.weight_format is None:  # shares the weight's storage
        assert linear.weight.data_ptr() == layer.weight.data_ptr()
    else:  # dequantized into the layer's dtype
        assert linear.weight.dtype == layer.dequantize_dtype
        expected = layer.weight.detach().float() * layer.weight_scale[:, None]
        assert torch.equal(linear.weight.float(), expected.to(layer.dequantize_dtype).float())
    assert not linear.weight.requires_grad
