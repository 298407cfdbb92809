"""The driven-layer contract: what a layer must offer for a :class:`~lorasc_kernels.Cascade`
to merge it, reset it, finalize it and export it.

Two layers meet it: :class:`~lorasc_kernels.LoRASCLinear` (float or fp8 weights) and the
PEFT adapter :class:`~lorasc_kernels.integrations.peft.PeftLoraLayer` (one ``lora.Linear``
of a ``get_peft_model`` model). A new kind of layer implements these members, is found by
:func:`driven_layers` through its library's entry in
:data:`~lorasc_kernels.integrations.DRIVEN_LAYER_FINDERS`, and passes the conformance test
(``tests/cascade/test_driven_contract.py``). The Cascade uses nothing else, except ``set_noise``
(``noise_mode="fused"``, float ``LoRASCLinear`` only) and ``dequantize_dtype`` (layers
with a ``weight_scale``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..inject import lorasc_layers
from ..integrations import DRIVEN_LAYER_FINDERS

__all__ = ["DrivenLayer", "driven_layers"]


@runtime_checkable
class DrivenLayer(Protocol):
    """A linear ``y = x Wᵀ + b + scaling · (x Aᵀ) Bᵀ`` whose fast LoRA a Cascade merges into
    ``W`` at each boundary (under FSDP2 each tensor may be a row-sharded ``DTensor``)."""

    weight: nn.Parameter  # W (N, K): float, or the fp8 codes of a scaled weight
    bias: nn.Parameter | None  # (N,)
    lora_A: nn.Parameter  # (r, K)
    lora_B: nn.Parameter  # (N, r)
    weight_scale: torch.Tensor | None  # (N,) float32 per-row scales of fp8 codes, else None
    weight_format: str | None  # the name of W's scaled format (formats registry), or None
    backend: str  # the merges' backend: "auto" | "torch" | "triton" | "cuda"
    weight_noise: tuple[int, float] | None  # (seed, scale) of the noise W carries, or None

    @property
    def scaling(self) -> float:
        """The LoRA scale ``s`` (a boundary merges ``slow_rate · s · B A``)."""

    @property
    def driven_module(self) -> nn.Module:
        """The module the model holds at the layer's path (what finalize() replaces)."""

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """A fresh fast LoRA: ``A`` drawn by ``generator`` (under FSDP2 the whole ``A`` drawn,
        each rank keeping its rows), ``B = 0``."""

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """The plain ``nn.Linear`` that finalize() puts back, holding every merge (under
        FSDP2 an fp8 weight dequantized by each rank for its own rows)."""

    def check_unchanged(self, name: str) -> None:
        """Raise ``RuntimeError`` naming ``name`` if the layer can no longer be merged as
        driven (flags only, no tensor read)."""


def driven_layers(model: nn.Module) -> dict:
    """The layers a Cascade drives, by module path: ``model``'s ``LoRASCLinear`` layers, or
    the LoRA layers of one library (:data:`~lorasc_kernels.integrations.DRIVEN_LAYER_FINDERS`:
    PEFT's, as :class:`~lorasc_kernels.integrations.peft.PeftLoraLayer`)."""
    layers = lorasc_layers(model)
    for library, find in DRIVEN_LAYER_FINDERS:
        found = find(model)
        if layers and found:
            raise ValueError(
                f"model has both LoRASCLinear and {library} LoRA layers: a Cascade drives "
                f"one kind (inject_lorasc refuses {library} models for this reason)"
            )
        layers = layers or found
    return layers
