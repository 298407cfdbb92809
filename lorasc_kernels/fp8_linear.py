"""``Fp8Linear``: an inference ``nn.Linear`` on an fp8 weight with per-row scales (a
:class:`~lorasc_kernels.formats.scaled_weight.ScaledWeight` of any registered format), through
``torch._scaled_mm``.

``y = (s_x[m] · q_x[m, :]) · (s_w[n] · q_w[n, :])ᵀ + b`` for ``x`` (..., K), weight codes
``q_w`` (N, K) with ``weight_scale`` ``s_w`` (N,) float32 (:mod:`lorasc_kernels.formats.quantize`)
and ``x`` quantized per row on each call into :data:`INPUT_FORMAT` (``s_x = max |x[m, :]| /
max_value``, round to nearest): both operands are fp8, the product accumulates in float32
with the scales applied to the result (``torch._scaled_mm`` with row-wise scales: fp8 tensor
cores on Hopper, torch's own kernel on the CPU). Quantizing the input costs precision (e4m3
keeps 4 significant bits): for training, and for outputs closer to the weights' own values,
use ``LoRASCLinear`` or the dequantized ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _checks as checks
from .formats import checks as format_checks
from .formats.quantize import format_dtype, quantize, quantize_rows
from .formats.registry import ACTIVATION_FORMAT, KERNEL_DTYPES, dtype_names
from .formats.scaled_weight import ScaledWeight
from .layer import LoRASCLinear

__all__ = ["INPUT_FORMAT", "Fp8Linear"]

# The format inputs are quantized to, whatever the weight's (the registry's reason).
INPUT_FORMAT = ACTIVATION_FORMAT


class Fp8Linear(nn.Module):
    """Frozen fp8 linear for inference on a :class:`ScaledWeight` ``weight`` (N, K); its
    codes ``weight`` (N, K), scales ``weight_scale`` (N,) and ``bias`` (N,) are its state_dict
    keys, as in an fp8 ``LoRASCLinear``. The scales must be finite and at least the format's
    ``min_scale``, the bias a float (N,) tensor on the weight's device; ``x`` (..., K)
    float32, float16 or bfloat16."""

    def __init__(self, weight: ScaledWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, ScaledWeight):
            raise TypeError(
                f"weight must be a ScaledWeight (fp8 codes with per-row scales), "
                f"got {type(weight).__name__}"
            )
        format_checks.check_scale_values("weight.scale", weight.scale, weight.dtype)
        if bias is not None:
            checks.check_tensor("bias", bias, dims=1)
            checks.check_shape("bias", bias, tuple(weight.shape[:1]), "out_features")
        checks.check_same_device(weight=weight, bias=bias)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.codes, requires_grad=False)
        self.register_buffer("weight_scale", weight.scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_format: str = "fp8_e4m3") -> Fp8Linear:
        """Quantize a float ``nn.Linear`` into ``weight_format`` (per-row absmax scales, round
        to nearest), or share the fp8 weight and scales of a ``LoRASCLinear`` built with a
        ``weight_format`` (its own format). Refuses a ``LoRASCLinear`` whose LoRA is trained
        (nonzero ``lora_B``) or whose weight carries a Cascade's in-place noise: serving
        would drop the LoRA or keep the noise; finalize its Cascade (or ``merge_lowrank_``
        its LoRA) first."""
        if isinstance(linear, LoRASCLinear) and (
            bool(linear.lora_B.detach().any()) or linear.weight_noise is not None
        ):
            raise TypeError(
                "linear is a LoRASCLinear with a trained LoRA (nonzero lora_B) or in-place "
                "noise: serving its weight alone would drop the LoRA unmerged; finalize its "
                "Cascade (or merge_lowrank_ its LoRA) first"
            )
        weight_scale = getattr(linear, "weight_scale", None)
        if weight_scale is not None:
            return cls(ScaledWeight(linear.weight.detach(), weight_scale), linear.bias)
        return cls(quantize(linear.weight.detach(), format_dtype(weight_format)), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"x must be a tensor with a dtype in {dtype_names(KERNEL_DTYPES)}, "
                f"got {getattr(x, 'dtype', type(x).__name__)}"
            )
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have in_features={self.in_features} as its last dim, "
                f"got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        rows = quantize_rows(x.reshape(-1, self.in_features).float())
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = torch._scaled_mm(
            rows.codes,
            self.weight.t(),
            scale_a=rows.scale[:, None],
            scale_b=self.weight_scale[None, :],
            bias=bias,
            out_dtype=x.dtype,
        )
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
