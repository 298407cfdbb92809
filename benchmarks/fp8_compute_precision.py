"""Precision of the fp8 compute mode (``compute="fp8"``, docs/fp8.md) against the storage mode,
on the same fp8 layer: the output ``y`` and the input gradient ``dx``.

Each layer runs forward and backward twice on the same ``x`` and output gradient ``dy``
(entries N(0, 1)), in the storage mode (``compute=None``: ``x`` and ``dy`` in their own dtype)
and in the compute mode (``x`` and ``dy ⊙ s_W`` quantized per row to e4m3). Columns:
``rel_y = ‖y_compute − y_storage‖ / ‖y_storage‖``, ``rel_dx`` the same for ``dx``, and each
mode's error against float64 math on the dequantized weight (``*_vs_exact``: the layer the
fp8 weight stands for). Layers:

* ``random``: ``nn.Linear(1024, 1024)`` (torch's initialization) quantized to each format,
  a LoRA with ``B ~ 0.01·N(0, 1)``, ``x`` (256, 1024) in bf16 and float32;
* ``digits``: the 12 adapted linears of the digits example (``examples/finetune_digits.py``,
  few-shot, seed 0, ``lorasc`` on fp8 e4m3 weights, trained in the storage mode, then
  finalized and quantized back into the same codes, with a fresh LoRA as above), each on
  the inputs it receives from the clean test images, float32.

The torch backend (the reference the Triton kernels match: codes and scales bit for bit,
GEMMs within float32's summation order). Rows go to ``fp8_compute_precision_<device>.csv``.

Usage: ``python -m benchmarks.fp8_compute_precision [--quick]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (
    EXAMPLES,
    append_csv,
    device_name,
    example_module,
    family_main,
    significant,
)
from lorasc_kernels import LoRASCConfig, LoRASCLinear, ScaledWeight, inject_lorasc
from lorasc_kernels.formats.registry import WEIGHT_FORMATS


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


def layer_errors(layer: LoRASCLinear, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """The columns of the module docstring for one fp8 layer on ``x`` (M, K), ``dy`` (M, N)."""
    results = {}
    for mode in (None, "fp8"):
        layer.compute = mode
        inputs = x.detach().clone().requires_grad_(True)
        output = layer(inputs)
        output.backward(dy)
        results[mode] = (output.detach(), inputs.grad)
    layer.compute = None
    weight = ScaledWeight(layer.weight.detach(), layer.weight_scale).dequantize(torch.float64)
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    x64, dy64 = x.double(), dy.double()
    y64 = x64 @ weight.t() + layer.scaling * (x64 @ A.t()) @ B.t()
    if layer.bias is not None:
        y64 = y64 + layer.bias.double()
    dx64 = dy64 @ weight + layer.scaling * (dy64 @ B) @ A
    (y_storage, dx_storage), (y_compute, dx_compute) = results[None], results["fp8"]
    return {
        "rel_y": _relative(y_compute, y_storage),
        "rel_dx": _relative(dx_compute, dx_storage),
        "y_storage_vs_exact": _relative(y_storage, y64),
        "y_compute_vs_exact": _relative(y_compute, y64),
        "dx_storage_vs_exact": _relative(dx_storage, dx64),
        "dx_compute_vs_exact": _relative(dx_compute, dx64),
    }


def random_rows(size: int, rows: int) -> list[dict]:
    """The ``random`` layers: every format, bf16 and float32 inputs."""
    found = []
    for weight_format in WEIGHT_FORMATS:
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(0)
            linear = nn.Linear(size, size).to(dtype)
            layer = LoRASCLinear.from_linear(
                linear, r=16, backend="torch", weight_format=weight_format
            )
            nn.init.normal_(layer.lora_B, std=0.01)
            x = torch.randn(rows, size).to(dtype)
            dy = torch.randn(rows, size).to(dtype)
            found.append(
                {"layer": f"random {size}x{size}", "format": weight_format}
                | layer_errors(layer, x, dy)
                | {"dtype": str(dtype).removeprefix("torch.")}
            )
    return found


def digits_rows(quick: bool) -> list[dict]:
    """The ``digits`` layers: the example's fine-tuned model (``quick``: 2 epochs), whose
    finalized float32 linears (the trained fp8 weights dequantized, the LoRA merged) are
    quantized back to e4m3 (the same codes and scales: each row's peak is a code) and given
    a LoRA with ``B ~ 0.01·N(0, 1)``."""
    digits = example_module("finetune_digits")
    device = torch.device("cpu")
    settings = digits.PretrainSettings()
    finetune = digits.dataclasses.replace(
        digits.FEWSHOT, weight_format="fp8_e4m3", backend="torch", epochs=2 if quick else 40
    )
    pretrained = digits.pretrain(settings, EXAMPLES / ".cache", device)
    pool, test = digits.load_split(digits.FINETUNE_CLASSES)
    sets = digits.evaluation_sets(test, device)
    train = digits.few_shots(pool, finetune.shots, 0)
    start = digits.without_head(pretrained)
    _, model = digits.finetune("lorasc", 0, start, train, sets, finetune, settings.shape, device)
    config = LoRASCConfig(
        r=finetune.rank,
        target_modules=digits.TARGET_MODULES,
        backend="torch",
        weight_format="fp8_e4m3",
    )
    layers = inject_lorasc(model, config)
    inputs = {}
    hooks = [
        layer.register_forward_hook(
            lambda module, args, output, name=name: inputs.__setitem__(name, args[0].detach())
        )
        for name, layer in layers.items()
    ]
    torch.manual_seed(0)
    for layer in layers.values():
        nn.init.normal_(layer.lora_B, std=0.01)
    with torch.no_grad():
        model(sets["test"][0])
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(0)
    found = []
    for name, layer in layers.items():
        x = inputs[name].reshape(-1, layer.in_features)
        dy = torch.randn(x.shape[0], layer.out_features, generator=generator)
        found.append(
            {"layer": f"digits {name}", "format": "fp8_e4m3"}
            | layer_errors(layer, x, dy)
            | {"dtype": "float32"}
        )
    return found


def run(quick: bool, device: str, out_dir: Path) -> list[dict]:
    """Every row of the module docstring (``quick``: a 256² random layer, 2 epochs)."""
    if device != "cpu":
        raise ValueError("the precision of the compute mode is measured on the CPU (torch)")
    size, rows = (256, 64) if quick else (1024, 256)
    found = random_rows(size, rows) + digits_rows(quick)
    table = [
        {
            key: significant(value, 3) if isinstance(value, float) else value
            for key, value in row.items()
        }
        for row in found
    ]
    append_csv(table, Path(out_dir) / f"fp8_compute_precision_{device_name(device)}.csv")
    return table


if __name__ == "__main__":
    family_main(run, __doc__.split("\n")[0], "a 256² random layer, 2 epochs of the example")
