"""``Fp8Linear``: an inference ``nn.Linear`` on fp8 e4m3 weights with per-row scales, through
``torch._scaled_mm``.

``y = (s_x[m] · q_x[m, :]) · (s_w[n] · q_w[n, :])ᵀ + b`` for ``x`` (..., K), weight
``q_w`` (N, K) in ``torch.float8_e4m3fn`` with ``weight_scale`` ``s_w`` (N,) float32 (the
format of :mod:`lorasc_kernels.quantize`) and ``x`` quantized per row on each call
(``s_x = max |x[m, :]| / 448``, round to nearest): both operands are fp8, the product
accumulates in float32 with the scales applied to the result (``torch._scaled_mm`` with
row-wise scales: fp8 tensor cores on Hopper, torch's own kernel on the CPU). Quantizing the
input costs precision (e4m3 keeps 4 significant bits): for training, and for outputs
closer to the weights' own values, use ``LoRASCLinear`` or the dequantized ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from .dtypes import SCALED_WEIGHT_DTYPES
from .quantize import quantize, row_scales

__all__ = ["Fp8Linear"]

_E4M3 = torch.float8_e4m3fn


class Fp8Linear(nn.Module):
    """Frozen fp8 e4m3 linear for inference; ``weight`` (N, K), ``weight_scale`` (N,) and
    ``bias`` (N,) are its state_dict keys, as in an fp8 ``LoRASCLinear``."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype != _E4M3 or weight.dim() != 2:
            raise TypeError(f"weight must be a 2-D {_E4M3} tensor, got {weight.dtype} with "
                            f"shape {tuple(weight.shape)}")
        if weight_scale.dtype != torch.float32 or weight_scale.shape != weight.shape[:1]:
            raise ValueError(f"weight_scale must be float32 of shape {tuple(weight.shape[:1])}, "
                             f"got {weight_scale.dtype} of shape {tuple(weight_scale.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantize a float ``nn.Linear`` (per-row absmax scales, round to nearest), or share
        the fp8 weight and scales of a ``LoRASCLinear`` built with ``weight_format`` (its
        LoRA is left out: merge it first, as ``Cascade`` does at each boundary)."""
        weight_scale = getattr(linear, "weight_scale", None)
        if weight_scale is not None:
            return cls(linear.weight.detach(), weight_scale, linear.bias)
        q, scale = quantize(linear.weight.detach(), _E4M3)
        return cls(q, scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).float()
        x_scale = row_scales(rows, SCALED_WEIGHT_DTYPES[_E4M3].max_value)
        x_q = (rows / x_scale[:, None]).to(_E4M3)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = torch._scaled_mm(x_q, self.weight.t(), scale_a=x_scale[:, None],
                             scale_b=self.weight_scale[None, :], bias=bias, out_dtype=x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")
