"""``LoRASCLinear``: a drop-in ``nn.Linear`` with a fast LoRA and optional fused noise."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks as checks
from .backends import BACKENDS
from .distributed import init_rows, row_scales_as_held
from .formats import checks as format_checks
from .formats.quantize import format_dtype, quantize
from .formats.registry import SCALED_DTYPES
from .formats.scaled_weight import ScaledWeight
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

    ``weight_format`` (``"fp8_e4m3"``, ``"fp8_e5m2"``: a name of
    :data:`~lorasc_kernels.formats.registry.WEIGHT_FORMATS`) stores ``W`` as fp8 codes (``weight``)
    and one float32 scale per output row (the buffer ``weight_scale``, a state_dict key),
    quantized with per-row absmax scales; the calls get them as one
    :class:`~lorasc_kernels.formats.scaled_weight.ScaledWeight`. Inputs, bias and LoRA keep
    ``dtype``, and merges keep the format (``docs/fp8.md``). Such a layer runs on the torch
    and Triton backends, takes no fused noise, and must stay out of ``model.to(dtype)``
    (which would cast its fp8 weight).

    ``compute="fp8"`` (with a ``weight_format`` only) runs the forward's and the input
    gradient's GEMMs on fp8 operands: ``x`` and the output gradient quantized per row to
    e4m3 (``docs/fp8.md``, the compute mode); the weight, its merges and its state are the
    storage mode's. A plain attribute: setting it to None returns to the storage mode.
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
        weight_format: str | None = None,
        compute: str | None = None,
    ):
        in_features = checks.check_int("in_features", in_features, 1)
        out_features = checks.check_int("out_features", out_features, 1)
        r = checks.check_int("r", r, 1, min(in_features, out_features))
        lora_alpha = checks.check_float("lora_alpha", lora_alpha)
        lora_dropout = checks.check_probability("lora_dropout", lora_dropout)
        checks.check_choice("backend", backend, BACKENDS)
        checks.check_layer_dtype("dtype", dtype)
        checks.check_layer_dtype("lora_dtype", lora_dtype)
        self.check_compute(compute, weight_format, dtype)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_format = weight_format
        self.compute = compute
        # The dtype to_linear() dequantizes an fp8 weight to by default: the layer's own.
        self.dequantize_dtype = self.weight.dtype
        self.register_buffer("weight_scale", None)  # a state_dict key of fp8 layers only
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
        if weight_format is not None:
            self._take_scaled(self._quantized(self.weight, weight_format), weight_format)

    @staticmethod
    def _quantized(weight: torch.Tensor, weight_format: str) -> ScaledWeight:
        """``weight`` in ``weight_format`` (shapes only on the meta device); a non-finite
        weight is refused by :func:`quantize`."""
        if weight.is_meta:
            return ScaledWeight(
                torch.empty_like(weight, dtype=format_dtype(weight_format)),
                torch.ones(weight.shape[0], device="meta"),
            )
        return quantize(weight.detach(), format_dtype(weight_format))

    def _take_scaled(self, scaled: ScaledWeight, weight_format: str) -> None:
        """Hold ``scaled`` as the frozen ``weight`` (codes) and the buffer ``weight_scale``."""
        self.weight = nn.Parameter(scaled.codes, requires_grad=False)
        self.weight_scale = scaled.scale
        self.weight_format = weight_format

    @property
    def scaling(self) -> float:
        """The LoRA scale ``s = lora_alpha / r``."""
        return self.lora_alpha / self.r

    @property
    def driven_module(self) -> nn.Module:
        """The module a model holds for this layer: itself (the driven-layer contract)."""
        return self

    def check_unchanged(self, name: str) -> None:
        """Nothing to refuse: a LoRASCLinear has no adapter state to change (the driven-layer
        contract, :class:`~lorasc_kernels.cascade.driven.DrivenLayer`)."""

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        backend: str = "auto",
        lora_dtype: torch.dtype | None = None,
        weight_format: str | None = None,
        compute: str | None = None,
    ) -> LoRASCLinear:
        """A LoRASC layer sharing ``linear``'s weight and bias Parameters (same storage).

        Freezes them (``requires_grad=False``). Refuses a ``LoRASCLinear`` (its trained LoRA
        would be lost: finalize or ``merge_lowrank_`` it first) and non-float weights.
        With a ``weight_format`` the weight is quantized once into new storage
        (per-row absmax scales, round to nearest); the bias is still shared. ``compute``: as
        for the constructor (checked before anything changes).
        """
        cls.check_linear(linear, weight_format)
        cls.check_compute(compute, weight_format, linear.weight.dtype)
        weight = linear.weight
        scaled = None
        if weight_format is not None:  # before anything changes: a refusal leaves linear as is
            try:
                scaled = cls._quantized(weight, weight_format)
            except ValueError as error:
                raise ValueError(f"linear.{error} to weight_format={weight_format!r}") from None
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            backend=backend,
            device="meta",
            dtype=weight.dtype,
            lora_dtype=lora_dtype,
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
        if scaled is not None:
            layer._take_scaled(scaled, weight_format)
        layer.compute = compute
        return layer

    @staticmethod
    def check_compute(compute, weight_format: str | None, dtype: torch.dtype | None) -> None:
        """``compute`` is None or ``"fp8"``, the latter with a ``weight_format`` (a registered
        name); ``dtype``: the float weight's (None: not known yet), named when refused."""
        weight_dtype = dtype if weight_format is None else format_dtype(weight_format)
        try:
            format_checks.check_compute(compute, weight_dtype)
        except ValueError as error:
            raise ValueError(f"{error} (weight_format={weight_format!r})") from None

    @staticmethod
    def check_linear(linear, weight_format: str | None = None) -> None:
        """``linear`` can become a ``LoRASCLinear``: a plain ``nn.Linear`` with float weights
        (and ``weight_format`` a registered name). Reads no values: that its weight is finite,
        as quantizing needs, is checked by the quantization itself."""
        if weight_format is not None:
            format_dtype(weight_format)
        if isinstance(linear, LoRASCLinear):
            raise TypeError(
                "linear is a LoRASCLinear already: wrapping it again would drop its trained "
                "LoRA unmerged; finalize its Cascade (or merge_lowrank_ its LoRA) first"
            )
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        checks.check_layer_dtype("linear.weight's dtype", linear.weight.dtype)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Refuse, before this layer copies anything, a state of another weight format (codes
        into a float weight, float values into an fp8 one, codes without their scales) or of
        another shape (torch would copy the entries that fit, e.g. new scales beside the old
        codes, and raise afterwards)."""
        for name, own in (*self._parameters.items(), *self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if own is not None and isinstance(saved, torch.Tensor) and saved.shape != own.shape:
                raise ValueError(
                    f"{prefix}{name}: the state's shape {tuple(saved.shape)} is not this "
                    f"layer's {tuple(own.shape)}; nothing of the layer was loaded"
                )
        weight = state_dict.get(prefix + "weight")
        scale = state_dict.get(prefix + "weight_scale")
        if self.weight_format is None:
            if scale is not None or (weight is not None and weight.dtype in SCALED_DTYPES):
                raise ValueError(
                    f"{prefix}weight: the state holds a scaled weight "
                    f"({None if weight is None else weight.dtype} with weight_scale) but this "
                    f"layer is float ({self.weight.dtype}); build it with the state's "
                    "weight_format, or load a float state"
                )
        elif weight is not None or scale is not None:
            self._check_scaled_state(prefix, weight, scale)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_scaled_state(self, prefix: str, weight, scale) -> None:
        """A state for this fp8 layer: codes of its dtype with their (out_features,) scales."""
        expected = f"{self.weight.dtype} codes with weight_scale ({self.out_features},)"
        if weight is None or scale is None:
            raise ValueError(
                f"{prefix}weight and {prefix}weight_scale load together (codes "
                f"and their scales); the state holds only one of them"
            )
        if weight.dtype != self.weight.dtype:
            raise ValueError(
                f"{prefix}weight: this layer has weight_format={self.weight_format!r} and "
                f"takes {expected}, the state's weight is {weight.dtype}"
            )
        if tuple(scale.shape) != (self.out_features,) or not scale.is_floating_point():
            raise ValueError(
                f"{prefix}weight_scale must be a float tensor of shape "
                f"({self.out_features},), got {scale.dtype} {tuple(scale.shape)}"
            )
        try:
            format_checks.check_scale_values("weight_scale", scale.detach(), self.weight.dtype)
        except ValueError as error:
            raise ValueError(f"{prefix}{error}") from None

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """A fresh fast LoRA as PEFT initialises it: ``A`` Kaiming-uniform(a=√5), ``B = 0``.

        ``generator`` (on ``lora_A``'s device) draws ``A``; torch's default one if None.
        Under FSDP2 the whole ``A`` is drawn and each rank keeps its rows
        (:func:`~lorasc_kernels.distributed.init_rows`).
        """
        with torch.no_grad():
            init_rows(
                self.lora_A,
                lambda a: nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator),
            )
            nn.init.zeros_(self.lora_B)

    def set_noise(self, seed: int | None, scale: float = 0.0) -> None:
        """Fused noise for later forwards: ``scale · noise(seed)``, or none if ``seed`` is None."""
        if seed is None:
            self.noise_seed, self.noise_scale = None, 0.0
            return
        seed = checks.check_seed("seed", seed)
        self.noise_scale = checks.check_float("scale", scale, 0.0)
        self.noise_seed = seed

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's weight and bias storage (LoRA dropped).

        An fp8 layer's weight is dequantized (``weight_scale[row] · weight`` in float32) into
        ``dtype``, by default :attr:`dequantize_dtype` (the dtype it was built from). For a
        float layer a ``dtype`` other than the weight's gives a converted copy (the bias
        too). Under FSDP2 each rank dequantizes its own rows of an fp8 weight with their scales
        (the new weight a DTensor sharded as ``weight``; nothing gathered).
        """
        checks.check_layer_dtype("dtype", dtype)
        if self.weight_format is not None:
            scale = row_scales_as_held(self.weight_scale, self.weight)
            weight = ScaledWeight(self.weight.detach(), scale).dequantize(
                dtype or self.dequantize_dtype
            )
        else:
            weight = self.weight.data if dtype is None else self.weight.data.to(dtype)
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device="meta",
            dtype=weight.dtype,
        )
        linear.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = nn.Parameter(
                self.bias.data.to(weight.dtype), requires_grad=self.bias.requires_grad
            )
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout_p = self.lora_dropout if self.training else 0.0
        try:  # from the registries: nn.Module.__getattr__ costs about 0.5 µs a name, per call
            parameters = self._parameters
            weight, bias = parameters["weight"], parameters["bias"]
            lora_A, lora_B = parameters["lora_A"], parameters["lora_B"]
            weight_scale = self._buffers["weight_scale"]
        except KeyError:  # a name moved out of them (torch.nn.utils.parametrize): by attribute
            weight, bias, lora_A, lora_B = self.weight, self.bias, self.lora_A, self.lora_B
            weight_scale = self.weight_scale
        if weight_scale is not None:
            weight = ScaledWeight(weight, weight_scale)
        return lorasc_linear(
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            self.scaling,
            dropout_p=dropout_p,
            noise_seed=self.noise_seed,
            noise_scale=self.noise_scale,
            backend=self.backend,  # a dropout seed is drawn per call from torch's generator
            compute=self.compute,
        )

    def extra_repr(self) -> str:
        text = (
            f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, "
            f"lora_dropout={self.lora_dropout}, backend={self.backend!r}"
        )
        if self.weight_format is not None:
            text += f", weight_format={self.weight_format!r}"
        if self.compute is not None:
            text += f", compute={self.compute!r}"
        if self.noise_seed is not None:
            text += f", noise_scale={self.noise_scale:.3g}"
        return text
