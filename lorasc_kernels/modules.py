"""``LoRASCLinear``: a drop-in ``nn.Linear`` with a fast LoRA and optional fused noise."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks as checks
from .backends import BACKENDS
from .functional import lorasc_linear

__all__ = ["LoRASCLinear"]


class LoRASCLinear(nn.Linear):
    """``y = x Wᵀ + b + (lora_alpha / r) · (drop(x) Aᵀ) Bᵀ`` with ``W`` and ``b`` frozen.

    Subclasses ``nn.Linear`` so ``weight``/``bias`` keep their state_dict keys; adds
    ``lora_A`` (r × in_features) and ``lora_B`` (out_features × r), PEFT's shapes.
    ``lora_dtype`` lets the LoRA parameters be e.g. float32 over a bf16 weight.

    ``noise_seed``/``noise_scale`` (set by :class:`~lorasc_kernels.Cascade` in
    ``noise_mode="fused"``) make each forward use ``W + noise_scale · noise(noise_seed)``
    without writing ``W``. ``weight_noise`` is the ``(seed, scale)`` of the noise a Cascade
    in ``"inplace"`` mode wrote into ``W`` (None while ``W`` is clean): a second Cascade
    refuses such a layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
        lora_dtype: torch.dtype | None = None,
    ):
        in_features = checks.check_int("in_features", in_features, 1)
        out_features = checks.check_int("out_features", out_features, 1)
        r = checks.check_int("r", r, 1, min(in_features, out_features))
        lora_alpha = checks.check_float("lora_alpha", lora_alpha)
        lora_dropout = checks.check_probability("lora_dropout", lora_dropout)
        checks.check_choice("backend", backend, BACKENDS)
        checks.check_layer_dtype("dtype", dtype)
        checks.check_layer_dtype("lora_dtype", lora_dtype)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.backend = backend
        self.noise_seed: int | None = None
        self.noise_scale = 0.0
        # (seed, scale) of the noise a Cascade in "inplace" mode wrote into W, else None.
        self.weight_noise: tuple[int, float] | None = None
        lora_kwargs = {"device": self.weight.device, "dtype": lora_dtype or self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **lora_kwargs))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **lora_kwargs))
        self.reset_lora()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @property
    def scaling(self) -> float:
        """The LoRA scale ``s = lora_alpha / r``."""
        return self.lora_alpha / self.r

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        backend: str = "auto",
        lora_dtype: torch.dtype | None = None,
    ) -> LoRASCLinear:
        """A LoRASC layer sharing ``linear``'s weight and bias Parameters (same storage).

        Freezes them (``requires_grad=False``). Refuses a ``LoRASCLinear`` (its trained LoRA
        would be lost: finalize or ``merge_lowrank_`` it first) and non-float weights.
        """
        cls.check_linear(linear)
        weight = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, r=r,
            lora_alpha=lora_alpha, lora_dropout=lora_dropout, backend=backend,
            device="meta", dtype=weight.dtype, lora_dtype=lora_dtype,
        )
        layer.weight = weight
        layer.bias = linear.bias
        lora_kwargs = {"device": weight.device, "dtype": lora_dtype or weight.dtype}
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, **lora_kwargs))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, **lora_kwargs))
        layer.reset_lora()
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        return layer

    @staticmethod
    def check_linear(linear) -> None:
        """``linear`` can become a ``LoRASCLinear``: a plain ``nn.Linear`` with float weights."""
        if isinstance(linear, LoRASCLinear):
            raise TypeError(
                "linear is a LoRASCLinear already: wrapping it again would drop its trained "
                "LoRA unmerged; finalize its Cascade (or merge_lowrank_ its LoRA) first"
            )
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        checks.check_layer_dtype("linear.weight's dtype", linear.weight.dtype)

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """A fresh fast LoRA as PEFT initialises it: ``A`` Kaiming-uniform(a=√5), ``B = 0``.

        ``generator`` (on ``lora_A``'s device) draws ``A``; torch's default one if None.
        """
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B)

    def set_noise(self, seed: int | None, scale: float = 0.0) -> None:
        """Fused noise for later forwards: ``scale · noise(seed)``, or none if ``seed`` is None."""
        if seed is None:
            self.noise_seed, self.noise_scale = None, 0.0
            return
        seed = checks.check_seed("seed", seed)
        self.noise_scale = checks.check_float("scale", scale, 0.0)
        self.noise_seed = seed

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's weight and bias storage (LoRA dropped)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        linear.weight = nn.Parameter(self.weight.data, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.data, requires_grad=self.bias.requires_grad)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout_p = self.lora_dropout if self.training else 0.0
        return lorasc_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
            dropout_p=dropout_p, noise_seed=self.noise_seed, noise_scale=self.noise_scale,
            backend=self.backend,  # a dropout seed is drawn per call from torch's generator
        )

    def extra_repr(self) -> str:
        text = (f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}, backend={self.backend!r}")
        if self.noise_seed is not None:
            text += f", noise_scale={self.noise_scale:.3g}"
        return text
