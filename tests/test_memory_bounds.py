"""Memory that stays bounded as the model grows: fp8 conversion in row blocks, one original
layer alive at a time while ``inject_lorasc`` converts. Counted on the CPU, not timed."""

import weakref

import pytest
import torch
from torch import nn

from benchmarks.bench_scaling import PeakOutputs
from lorasc_kernels import LoRASCConfig, LoRASCLinear, inject_lorasc
from lorasc_kernels.formats import quantize as quantize_module
from lorasc_kernels.formats.quantize import quantize, row_scales
from lorasc_kernels.formats.rounding import round_to_scaled

FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", FORMATS)
def test_quantize_in_blocks_gives_the_bits_of_one_go(monkeypatch, dtype):
    torch.manual_seed(0)
    weight = (torch.randn(37, 24) * torch.logspace(-3, 3, 37)[:, None]).bfloat16()
    values = weight.float()
    scale = row_scales(values, dtype)
    expected = round_to_scaled(values / scale[:, None], dtype, "nearest")
    monkeypatch.setattr(quantize_module, "QUANTIZE_BLOCK_ELEMENTS", 5 * 24)  # 8 blocks
    got = quantize(weight, dtype)
    assert torch.equal(got.scale, scale)
    assert torch.equal(got.codes.view(torch.uint8), expected.view(torch.uint8))
    weight[30, 3] = float("nan")  # a non-finite value in the last block is still refused
    with pytest.raises(ValueError, match="non-finite values"):
        quantize(weight, dtype)


def test_quantize_temporaries_stay_one_block(monkeypatch):
    """About 100 bytes of float32 temporaries per element of one block, whatever the
    weight's size; in one go they were ~96 bytes per element of the whole weight."""
    block = 64 * 64
    monkeypatch.setattr(quantize_module, "QUANTIZE_BLOCK_ELEMENTS", block)
    weight = torch.randn(64 * 16, 64).bfloat16()  # 16 blocks
    with PeakOutputs() as memory:
        quantize(weight, torch.float8_e4m3fn)
    outputs = weight.numel() + 4 * weight.shape[0]  # the codes and the scales
    assert memory.peak <= outputs + 128 * block, memory.peak
    assert memory.peak < 8 * weight.numel()  # far below the whole weight's ~96 B/element


def test_inject_holds_one_original_layer_at_a_time(monkeypatch):
    """Converting to fp8, each original bf16 weight is released once its layer is
    converted: none of the earlier ones is alive when the next conversion starts."""
    model = nn.Sequential(*[nn.Linear(32, 32).bfloat16() for _ in range(4)])
    originals = [weakref.ref(linear.weight) for linear in model]
    alive_at_each = []
    from_linear = LoRASCLinear.from_linear.__func__

    def watched(cls, linear, *args, **kwargs):
        alive_at_each.append(sum(ref() is not None for ref in originals))
        return from_linear(cls, linear, *args, **kwargs)

    monkeypatch.setattr(LoRASCLinear, "from_linear", classmethod(watched))
    inject_lorasc(model, LoRASCConfig(r=2, weight_format="fp8_e4m3"))
    assert alive_at_each == [4, 3, 2, 1]  # the current one, and those not converted yet
    assert all(ref() is None for ref in originals)
