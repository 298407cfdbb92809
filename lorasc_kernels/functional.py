"""Functional API: argument validation, autocast handling and backend dispatch.

Shapes: ``x`` (..., K), ``weight`` (N, K), ``bias`` (N,), ``lora_A`` (r, K),
``lora_B`` (N, r); for a merge, ``weight`` may be a block of rows of a larger matrix.
``weight`` is a float tensor or a :class:`~lorasc_kernels.formats.scaled_weight.ScaledWeight` (fp8
codes with per-row scales, ``docs/fp8.md``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _checks as checks
from . import ops
from .backends import backend_module, resolve_backend_name
from .backends.specs import LinearSpec
from .formats import checks as format_checks
from .formats.registry import SCALED_DTYPES, dtype_names
from .formats.scaled_weight import ScaledWeight

__all__ = ["lorasc_linear", "draw_seed"]


_DRAW_SEED_UNDER_COMPILE = (
    "dropout_p > 0 (a layer's lora_dropout) without a dropout_seed draws a fresh seed on the "
    "host at every call, which torch.compile(fullgraph=True) cannot trace: compile without "
    "fullgraph (one graph break per layer), set lora_dropout=0, or pass dropout_seed"
)

try:  # torch >= 2.8 puts the reason in fullgraph's error
    _never_traced = torch.compiler.disable(reason=_DRAW_SEED_UNDER_COMPILE)
except TypeError:
    _never_traced = torch.compiler.disable


@_never_traced
def draw_seed() -> int:
    """A fresh 62-bit seed from torch's default CPU generator (follows ``torch.manual_seed``).

    Never traced: under ``torch.compile`` it is a graph break, and under ``fullgraph=True``
    Dynamo's error carries :data:`_DRAW_SEED_UNDER_COMPILE`.
    """
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


# Scale tensors whose values passed the check, with their version counter then: a layer's
# scales are checked again only after something wrote them (a merge bumps the version), so
# a forward does not wait on the GPU (one host read) at every call.
_CHECKED_SCALES = WeakIdKeyDictionary()  # by identity: tensors compare elementwise


def _check_scale_values_once(weight: ScaledWeight) -> None:
    """`format_checks.check_scale_values` of ``weight.scale``, skipped while the same tensor
    is unchanged since it last passed."""
    scale = weight.scale
    if _CHECKED_SCALES.get(scale) == scale._version:
        return
    format_checks.check_scale_values("weight.scale", scale, weight.dtype)
    _CHECKED_SCALES[scale] = scale._version


def check_lowrank(weight, lora_A, lora_B, row_block: bool = False):
    """Check ``lora_A`` (r, K) and ``lora_B`` (N, r) against ``weight`` (N, K); return r.

    ``r`` must be at most ``min(N, K)``, or at most ``K`` when ``weight`` is a block of rows
    of a larger matrix (``row_block``: a shard may hold fewer rows than ``r``).
    """
    checks.check_tensor("lora_A", lora_A, dims=2)
    checks.check_tensor("lora_B", lora_B, dims=2)
    rows, cols = weight.shape
    r = lora_A.shape[0]
    largest = cols if row_block else min(rows, cols)
    if not 1 <= r <= largest:
        bound = "in_features" if row_block else "min(out, in)"
        raise ValueError(
            f"lora_A must have r rows with 1 <= r <= {bound} = {largest}, "
            f"got shape {tuple(lora_A.shape)}"
        )
    checks.check_shape("lora_A", lora_A, (r, cols), "r × in_features")
    checks.check_shape("lora_B", lora_B, (rows, r), "rows of weight × r")
    return r


def check_weight(weight) -> bool:
    """``weight`` is a 2-D float tensor or a :class:`ScaledWeight`; returns whether it is
    scaled. A tensor of a scaled dtype is refused: its scales travel with it."""
    if isinstance(weight, ScaledWeight):
        return True
    if isinstance(weight, torch.Tensor) and weight.dtype in SCALED_DTYPES:
        raise TypeError(
            f"weight has the scaled dtype {weight.dtype}: pass it with its per-row "
            "float32 scales as ScaledWeight(codes, scale)"
        )
    checks.check_tensor("weight", weight, dims=2)
    return False


def check_backend_dtype(backend: str, **dtypes: torch.dtype | None):
    """Each dtype (by its tensor's name; None: no tensor) is one the backend declares
    (float64: the torch backend only)."""
    supported = backend_module(backend).WEIGHT_DTYPES
    for name, dtype in dtypes.items():
        if dtype is not None and dtype not in supported:
            raise TypeError(
                f"{name} has dtype {dtype}, which backend {backend!r} does not take "
                f"(it takes {dtype_names(supported)}; the torch backend also float64)"
            )


# Device type → whether torch.autocast exists for it (fixed for the process).
_AUTOCAST_AVAILABLE: dict[str, bool] = {}


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives ``x``'s call, or None when it is off (or ``x`` is
    float64, which it leaves)."""
    # is_cuda and is_cpu: read in a tenth of the time of device.type (a new string per read)
    device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:  # not on "meta": asking whether it is enabled there would raise
        available = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    # off: no autocast context to leave either (a context costs µs per call)
    if not (available and torch.is_autocast_enabled(device_type)):
        return None
    return None if x.dtype == torch.float64 else torch.get_autocast_dtype(device_type)


# The calls whose argument checks passed, by :func:`_call_key`, with what they resolved to
# (:class:`_Checked`): the checks are functions of the key alone, so a call with a known key
# skips them (microseconds per call; the values of a scaled weight's scales are checked per
# tensor version, a dropout seed per call). Bounded: cleared when full.
_PASSED: dict[tuple, _Checked] = {}
_PASSED_MAX = 4096


class _Checked(NamedTuple):
    """What the checks of a call resolved: whether the weight is scaled, the backend's name,
    the spec when the call draws no dropout mask (else None: its seed is per call) and the
    scalars that build it."""

    scaled: bool
    backend: str
    spec: LinearSpec | None
    scale: float
    dropout_p: float
    noise_seed: int | None
    noise_scale: float
    compute: str | None


def _call_key(
    x,
    weight,
    bias,
    lora_A,
    lora_B,
    autocast_dtype,
    scale,
    dropout_p,
    noise_seed,
    noise_scale,
    dropout_seed,
    backend,
    compute=None,
) -> tuple | None:
    """Everything the argument checks of :func:`lorasc_linear` read (dtypes, shapes but
    ``x``'s leading dims, devices, a scaled weight's ``requires_grad``, autocast's dtype,
    the scalars with their types, the noise seed, whether a dropout seed is given, the
    backend's name), as one hashable tuple; None if an argument is of a kind the checks
    refuse."""
    if isinstance(weight, ScaledWeight):
        codes = weight.codes
        scaled = (codes.requires_grad, weight.scale.requires_grad)
    else:
        codes, scaled = weight, None
    try:
        return (
            x.dtype,
            x.device,
            x.shape[-1:],
            codes.dtype,
            codes.shape,
            codes.device,
            scaled,
            None if bias is None else (bias.dtype, bias.shape, bias.device),
            lora_A.dtype,
            lora_A.shape,
            lora_A.device,
            lora_B.dtype,
            lora_B.shape,
            lora_B.device,
            autocast_dtype,
            type(scale),
            scale,
            type(dropout_p),
            dropout_p,
            type(noise_seed),
            noise_seed,
            type(noise_scale),
            noise_scale,
            dropout_seed is None,
            backend,
            compute,
        )
    except AttributeError:  # not a tensor: the checks say which argument
        return None


def _check_linear_call(
    x,
    weight,
    bias,
    lora_A,
    lora_B,
    scale,
    dropout_p,
    noise_seed,
    noise_scale,
    backend,
    autocast_dtype,
    compute=None,
) -> _Checked:
    """The argument checks of :func:`lorasc_linear` but the dropout seed's, with the dtypes
    that ``autocast_dtype`` (:func:`_autocast_dtype`) gives: returns what they resolved."""
    checks.check_tensor("x", x)
    scaled = check_weight(weight)
    compute = format_checks.check_compute(compute, weight.dtype)
    if bias is not None:
        checks.check_tensor("bias", bias, dims=1)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the in_features)")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x must have in_features={in_features} as its last dim (weight is "
            f"{tuple(weight.shape)}), got shape {tuple(x.shape)}"
        )
    if bias is not None:
        checks.check_shape("bias", bias, (out_features,), "out_features")
    check_lowrank(weight, lora_A, lora_B)
    checks.check_same_device(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    for part in ("codes", "scale") if scaled else ():
        if getattr(weight, part).requires_grad:  # no gradient flows to either: refused
            raise ValueError(
                f"weight.{part} ({weight.dtype} weight) requires grad: scaled weights are "
                "frozen (requires_grad_(False))"
            )
    if scaled and not torch.compiler.is_compiling():  # a data-dependent check: eager only
        _check_scale_values_once(weight)
    scale = checks.check_float("scale", scale)
    dropout_p = checks.check_probability("dropout_p", dropout_p)
    noise_scale = checks.check_float("noise_scale", noise_scale, minimum=0.0)
    if noise_seed is None and noise_scale != 0.0:
        raise ValueError("noise_scale is nonzero but noise_seed is None: pass both or neither")
    if scaled and noise_seed is not None:
        raise ValueError(
            f"noise_seed: fused noise is not supported on {weight.dtype} weights "
            "(docs/fp8.md); use noise_mode='inplace' or 'off'"
        )
    x_dtype = autocast_dtype or x.dtype  # autocast casts x, a float weight and the bias
    bias_dtype = None if bias is None else autocast_dtype or bias.dtype
    if scaled:
        if bias is not None and bias_dtype != x_dtype:
            raise TypeError(f"bias must have x's dtype {x_dtype}, got {bias_dtype}")
    elif x_dtype != (autocast_dtype or weight.dtype):
        raise TypeError(
            f"x has dtype {x.dtype} but weight has {weight.dtype}: they must match "
            "outside torch.autocast"
        )
    elif bias is not None and bias_dtype != x_dtype:
        raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")

    backend = resolve_backend_name(backend, x.device)  # a constant under torch.compile
    check_backend_dtype(backend, x=x_dtype, lora_A=lora_A.dtype, lora_B=lora_B.dtype)
    if scaled:
        check_backend_scaled(backend, weight)
    if compute is not None and compute not in getattr(backend_module(backend), "COMPUTE_MODES", ()):
        raise TypeError(
            f"compute={compute!r}: backend {backend!r} has no such compute mode (the "
            "primitives of backends/contract.py's ComputeBackend); use backend='triton' or "
            "'torch', or compute=None"
        )
    if noise_seed is not None:
        noise_seed = checks.check_seed("noise_seed", noise_seed)
    spec = None
    if dropout_p == 0.0:
        spec = LinearSpec.of(scale, 0.0, None, noise_seed, noise_scale, compute)
    return _Checked(scaled, backend, spec, scale, dropout_p, noise_seed, noise_scale, compute)


def check_backend_scaled(backend: str, weight: ScaledWeight) -> None:
    """The backend takes the scaled format of ``weight``."""
    supported = backend_module(backend).SCALED_WEIGHT_DTYPES
    if weight.dtype not in supported:
        raise TypeError(
            f"weight has the scaled dtype {weight.dtype}, which backend {backend!r} does not "
            f"take (its scaled formats: {dtype_names(supported)}); use backend='triton' or "
            "'torch'"
        )


def lorasc_linear(
    x: torch.Tensor,
    weight: torch.Tensor | ScaledWeight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    *,
    dropout_p: float = 0.0,
    noise_seed: int | None = None,
    noise_scale: float = 0.0,
    backend: str = "auto",
    dropout_seed: int | None = None,
    compute: str | None = None,
) -> torch.Tensor:
    """``y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ``, with ``W`` perturbed by fused noise.

    Args:
        x: (..., K) input, any number of leading dims, any strides.
        weight: (N, K) frozen weight, never modified; a float tensor gets a gradient only if
            it requires one. A :class:`ScaledWeight` (``W = scale[row] · codes``, see
            ``docs/fp8.md``) needs scales finite and at least the format's ``min_scale``
            (checked in eager mode), any strides; it is frozen, takes no fused noise, and
            ``x`` keeps its dtype.
        bias: (N,) or None.
        lora_A, lora_B: (r, K) and (N, r); may have another float dtype than ``x``.
        scale: the LoRA scaling ``lora_alpha / r``.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1).
        noise_seed, noise_scale: when ``noise_seed`` is set, this call uses
            ``round(W + noise_scale · noise(noise_seed))`` (see :mod:`lorasc_kernels.noise`).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.
        dropout_seed: seed of the dropout mask; drawn from torch's generator if None.
        compute: None, or ``"fp8"`` with a :class:`ScaledWeight` (``docs/fp8.md``): ``x``
            and the output's gradient are quantized per row to e4m3 and the GEMMs of ``y``
            and of ``x``'s gradient run on fp8 operands (torch and Triton backends).

    Under ``torch.autocast``, ``x``, ``weight`` and ``bias`` are cast to the autocast dtype
    (a :class:`ScaledWeight` is not: its tiles are converted as the kernels load them).
    Returns (..., N) in ``x``'s (or autocast's) dtype.
    """
    autocast_dtype = _autocast_dtype(x) if isinstance(x, torch.Tensor) else None
    key = checked = None
    compiling = torch.compiler.is_compiling()
    if not compiling:  # the checks are constants of a traced graph
        key = _call_key(
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            autocast_dtype,
            scale,
            dropout_p,
            noise_seed,
            noise_scale,
            dropout_seed,
            backend,
            compute,
        )
        try:
            checked = None if key is None else _PASSED.get(key)
        except TypeError:  # an unhashable argument: the checks refuse it
            key = None
    if checked is None:
        checked = _check_linear_call(
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            scale,
            dropout_p,
            noise_seed,
            noise_scale,
            backend,
            autocast_dtype,
            compute,
        )
        if key is not None:
            if len(_PASSED) >= _PASSED_MAX:
                _PASSED.clear()
            _PASSED[key] = checked
    elif checked.scaled:  # the scales' values can change: checked per version, as the checks do
        _check_scale_values_once(weight)
    spec = checked.spec
    if dropout_seed is not None:
        dropout_seed = checks.check_seed("dropout_seed", dropout_seed)
    if spec is None:  # dropout: a mask per call
        if dropout_seed is None:
            dropout_seed = draw_seed()
        spec = LinearSpec.of(
            checked.scale,
            checked.dropout_p,
            dropout_seed,
            checked.noise_seed,
            checked.noise_scale,
            checked.compute,
        )
    if autocast_dtype is not None:
        x = x.to(autocast_dtype)
        weight = weight if checked.scaled else weight.to(autocast_dtype)
        bias = None if bias is None else bias.to(autocast_dtype)
    two_dims = x.dim() == 2
    rows = x if two_dims else x.reshape(-1, x.shape[-1])  # 2-D: no view op
    if autocast_dtype is None:
        y = ops.linear(rows, weight, bias, lora_A, lora_B, spec, checked.backend, compiling)
    else:
        with torch.autocast(x.device.type, enabled=False):
            y = ops.linear(rows, weight, bias, lora_A, lora_B, spec, checked.backend, compiling)
    if two_dims:
        return y
    # Not a view (as torch.matmul): FSDP2 needs module outputs it can hook in place.
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))
