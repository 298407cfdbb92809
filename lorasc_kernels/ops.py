"""``torch.library`` custom ops of the LoRASC linear and merge, so ``torch.compile`` traces them.

Ops (namespace ``lorasc``), each with a fake kernel giving output shapes and dtypes:

* ``linear_forward(x, weight, bias, lora_A, lora_B, ...) -> (y, xa)``;
* ``linear_backward(dy, x, xa, weight, lora_A, lora_B, ..., needs) -> [grads]``: only the
  gradients ``needs`` asks for, in the order ``(x, weight, bias, lora_A, lora_B)``;
* ``merge_lowrank_(weight, ..., weight_scale)``: mutates ``weight`` (and ``weight_scale``).

A :class:`~lorasc_kernels.formats.scaled_weight.ScaledWeight` crosses the schemas as two tensors,
its codes as ``weight`` and its scales as ``weight_scale`` (None for a float weight):
:func:`linear` and :func:`merge_` unpack it, and the ops' implementations re-pack it before
calling :mod:`lorasc_kernels.backends.composition` or the backend, which take the container.

The forward op's autograd formula (``torch.library.register_autograd``) saves ``x``, ``xa``
and the parameters and calls the backward op, so a model of ``LoRASCLinear`` layers
compiles with ``fullgraph=True``. In eager mode :func:`linear` skips the op
dispatch (about 0.3 ms per forward+backward on the CPU) and runs the same formula in
:class:`LinearFunction`, a plain ``torch.autograd.Function``. Each op takes the backend's
name (``"torch"``, ``"triton"`` or ``"cuda"``) and runs :mod:`lorasc_kernels.backends.composition`
over that backend's primitives, or its ``merge_``, inside. Within the package, arguments
travel as the bundles of :mod:`lorasc_kernels.backends.specs`; this module is the one place that
converts them to the ops' schema arguments and back.

Seeds are ints in ``[0, 2**64)`` but a schema ``int`` is int64: they cross the op boundary
as the int64 with the same 64 bits (:func:`seed_to_int64`; seeds below ``2**63`` are
unchanged) and are decoded back inside. ``None`` (no noise, no dropout) is ``int?``.
Under ``torch.compile`` seeds are constants of the graph: a new noise seed (once per
cascade) recompiles, and dropout, which draws a seed on the host at each call, breaks
the graph — compile with ``lora_dropout=0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .backends import backend_module, composition
from .backends.specs import LinearSpec, MergeSpec, NoiseSpec
from .formats.scaled_weight import ScaledWeight

__all__ = ["seed_to_int64", "seed_from_int64", "LinearFunction", "linear", "merge_"]

_SEED_SPAN = 2**64


def seed_to_int64(seed: int | None) -> int | None:
    """A seed in ``[0, 2**64)`` as the int64 with the same bits (None stays None)."""
    if seed is None:
        return None
    return seed - _SEED_SPAN if seed >= 2**63 else seed


def seed_from_int64(value: int | None) -> int | None:
    """Inverse of :func:`seed_to_int64`."""
    return None if value is None else value % _SEED_SPAN


def _linear_op_args(spec: LinearSpec) -> tuple:
    """``(scale, dropout_p, dropout_seed, noise_seed, noise_scale)`` of the ops' schemas
    (``spec.compute`` travels as their last argument, ``compute``)."""
    dropout, noise = spec.dropout, spec.noise
    return (
        spec.scale,
        0.0 if dropout is None else dropout.p,
        None if dropout is None else seed_to_int64(dropout.seed),
        None if noise is None else seed_to_int64(noise.seed),
        0.0 if noise is None else noise.scale,
    )


def _linear_spec(
    scale, dropout_p, dropout_seed, noise_seed, noise_scale, compute=None
) -> LinearSpec:
    """Inverse of :func:`_linear_op_args` (with ``compute``)."""
    return LinearSpec.of(
        scale,
        dropout_p,
        seed_from_int64(dropout_seed),
        seed_from_int64(noise_seed),
        noise_scale,
        compute,
    )


def _unpack(weight: torch.Tensor | ScaledWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, weight_scale)`` as the schemas take a weight: a :class:`ScaledWeight`'s
    ``(codes, scale)``, or a float weight and None."""
    if isinstance(weight, ScaledWeight):
        return weight.codes, weight.scale
    return weight, None


def _pack(weight: torch.Tensor, weight_scale: torch.Tensor | None) -> torch.Tensor | ScaledWeight:
    """Inverse of :func:`_unpack`."""
    return weight if weight_scale is None else ScaledWeight(weight, weight_scale)


@torch.library.custom_op("lorasc::linear_forward", mutates_args=())
def _linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout_p: float,
    dropout_seed: int | None,
    noise_seed: int | None,
    noise_scale: float,
    backend: str,
    weight_scale: torch.Tensor | None = None,
    compute: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y (M, N), xa (M, r))`` for 2-D ``x`` (M, K); see the module docstring."""
    spec = _linear_spec(scale, dropout_p, dropout_seed, noise_seed, noise_scale, compute)
    return composition.linear_forward(
        backend_module(backend), x, _pack(weight, weight_scale), bias, lora_A, lora_B, spec
    )


@_linear_forward.register_fake
def _(
    x,
    weight,
    bias,
    lora_A,
    lora_B,
    scale,
    dropout_p,
    dropout_seed,
    noise_seed,
    noise_scale,
    backend,
    weight_scale=None,
    compute=None,
):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("lorasc::linear_backward", mutates_args=())
def _linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout_p: float,
    dropout_seed: int | None,
    noise_seed: int | None,
    noise_scale: float,
    needs: Sequence[bool],
    backend: str,
    weight_scale: torch.Tensor | None = None,
    compute: str | None = None,
) -> list[torch.Tensor]:
    """The gradients that ``needs`` (five bools: x, weight, bias, lora_A, lora_B) asks for."""
    spec = _linear_spec(scale, dropout_p, dropout_seed, noise_seed, noise_scale, compute)
    grads = composition.linear_backward(
        backend_module(backend), dy, x, xa, _pack(weight, weight_scale), lora_A, lora_B, spec, needs
    )
    return [grad for grad, need in zip(grads, needs, strict=True) if need]


@_linear_backward.register_fake
def _(
    dy,
    x,
    xa,
    weight,
    lora_A,
    lora_B,
    scale,
    dropout_p,
    dropout_seed,
    noise_seed,
    noise_scale,
    needs,
    backend,
    weight_scale=None,
    compute=None,
):
    shapes = (
        (x.shape, x.dtype),
        (weight.shape, weight.dtype),
        ((weight.shape[0],), x.dtype),
        (lora_A.shape, lora_A.dtype),
        (lora_B.shape, lora_B.dtype),
    )
    return [
        x.new_empty(shape, dtype=dtype)  # contiguous, as every backend returns them
        for (shape, dtype), need in zip(shapes, needs, strict=True)
        if need
    ]


# -- the autograd of the linear: one formula, two ways to reach the backend ---------------
# Both the custom op's autograd (traced by torch.compile) and the eager LinearFunction save
# the same tensors with _save and compute the same five gradients; they differ only in how
# the backward runs: through the ``lorasc::linear_backward`` op (its gradients fitted to
# the schema's inputs by _gradients), or by calling :func:`composition.linear_backward`
# directly (no op dispatch: 0.16 ms less per step on the CPU,
# benchmarks/bench_autograd_paths.py).


def _save(ctx, x, xa, weight, lora_A, lora_B, weight_scale) -> None:
    """What backward needs: ``x``, ``xa = drop(x) Aᵀ`` and the parameters, never a mask."""
    ctx.save_for_backward(x, xa, weight, lora_A, lora_B, weight_scale)


def _gradients(ctx, dy, run_backward) -> tuple:
    """One gradient per input of the forward op: ``(dx, dweight, dbias, dA, dB)``, None
    where autograd needs none, then None for each other input of its schema
    (``ctx.needs_input_grad`` holds one flag per input).
    ``run_backward(dy, *saved, needs)`` returns the five with None where ``needs`` (five
    bools) is False."""
    needs = tuple(ctx.needs_input_grad[:5])
    rest = (None,) * (len(ctx.needs_input_grad) - len(needs))
    if not any(needs):
        return (None,) * len(needs) + rest
    return tuple(run_backward(dy, *ctx.saved_tensors, needs)) + rest


def _setup_context(ctx, inputs, output):
    x, weight, _, lora_A, lora_B, *hyper, backend, weight_scale, compute = inputs
    _save(ctx, x, output[1], weight, lora_A, lora_B, weight_scale)
    ctx.mark_non_differentiable(output[1])
    ctx.hyper = hyper
    ctx.backend = backend
    ctx.compute = compute


def _backward(ctx, dy, _):
    def through_op(dy, x, xa, weight, lora_A, lora_B, weight_scale, needs):
        grads = iter(
            torch.ops.lorasc.linear_backward(
                dy,
                x,
                xa,
                weight,
                lora_A,
                lora_B,
                *ctx.hyper,
                list(needs),
                ctx.backend,
                weight_scale,
                ctx.compute,
            )
        )
        return (next(grads) if need else None for need in needs)

    return _gradients(ctx, dy, through_op)


_linear_forward.register_autograd(_backward, setup_context=_setup_context)


class LinearFunction(torch.autograd.Function):
    """Eager autograd of the custom op's formula (:func:`_save`, the same five gradients),
    running :mod:`lorasc_kernels.backends.composition` on the backend directly.

    Under ``backward(create_graph=True)`` (double backward, e.g. a gradient penalty) the
    backward runs on the torch backend, whose ops autograd records, with ``xa`` recomputed
    from ``x`` and ``A`` so its graph is part of the result: any backend's forward then has
    second derivatives (the backends share the forward's bits up to float rounding). In the
    fp8 compute mode that backward is the storage mode's (rounding to fp8 has no useful
    derivative): the first derivatives it returns are then not fp8-quantized.
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_A, lora_B, spec: LinearSpec, backend: str, weight_scale=None
    ):
        ctx.backend = backend_module(backend)
        ctx.spec = spec
        y, xa = composition.linear_forward(
            ctx.backend, x, _pack(weight, weight_scale), bias, lora_A, lora_B, spec
        )
        _save(ctx, x, xa, weight, lora_A, lora_B, weight_scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        # Straight through, without _gradients' generic closure (~2 µs of host time a step)
        x, xa, weight, lora_A, lora_B, weight_scale = ctx.saved_tensors
        weight = _pack(weight, weight_scale)
        backend, spec = ctx.backend, ctx.spec
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
            backend = backend_module("torch")
            spec = dataclasses.replace(spec, compute=None)
            _, xa = composition.linear_forward(backend, x, weight, None, lora_A, lora_B, spec)
        grads = composition.linear_backward(
            backend, dy, x, xa, weight, lora_A, lora_B, spec, ctx.needs_input_grad[:5]
        )
        return (*grads, None, None, None)  # none for spec, backend, weight_scale


@torch.library.custom_op("lorasc::merge_lowrank_", mutates_args=("weight", "weight_scale"))
def _merge_lowrank(
    weight: torch.Tensor,
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    coeff: float,
    rounding: str,
    seed: int,
    remove_seed: int | None,
    remove_scale: float,
    add_seed: int | None,
    add_scale: float,
    row_offset: int,
    backend: str,
    weight_scale: torch.Tensor | None,
) -> None:
    """``W ← round(W − noise_remove + coeff · B A + noise_add)`` in place, by ``backend``.

    No mutated argument has a default: the dispatcher leaves a trailing argument that equals
    its default out of the boxed call, and torch < 2.14's in-place version counter then
    indexes past the arguments it got (``IndexError`` on every merge; seen with torch 2.11).
    """
    remove = None if remove_seed is None else NoiseSpec(seed_from_int64(remove_seed), remove_scale)
    add = None if add_seed is None else NoiseSpec(seed_from_int64(add_seed), add_scale)
    spec = MergeSpec(coeff, rounding, seed_from_int64(seed), remove, add, row_offset)
    backend_module(backend).merge_(_pack(weight, weight_scale), lora_B, lora_A, spec)


@_merge_lowrank.register_fake
def _(
    weight,
    lora_B,
    lora_A,
    coeff,
    rounding,
    seed,
    remove_seed,
    remove_scale,
    add_seed,
    add_scale,
    row_offset,
    backend,
    weight_scale,
):
    return None


def linear(
    x,
    weight: torch.Tensor | ScaledWeight,
    bias,
    lora_A,
    lora_B,
    spec: LinearSpec,
    backend: str,
    compiling: bool | None = None,
) -> torch.Tensor:
    """Differentiable LoRASC linear on validated 2-D ``x`` (M, K) → (M, N).

    ``backend`` is a registered name (from
    :func:`~lorasc_kernels.backends.resolve_backend_name`); it runs through the custom ops
    under ``torch.compile`` and through :class:`LinearFunction` in eager mode. ``compiling``:
    ``torch.compiler.is_compiling()`` where the caller has read it (two frames less per
    call), else None. Either route gives the same values and gradients.
    """
    weight, weight_scale = _unpack(weight)
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    if not compiling:
        return LinearFunction.apply(x, weight, bias, lora_A, lora_B, spec, backend, weight_scale)
    y, _ = torch.ops.lorasc.linear_forward(
        x, weight, bias, lora_A, lora_B, *_linear_op_args(spec), backend, weight_scale, spec.compute
    )
    return y


def merge_(
    backend: str, weight: torch.Tensor | ScaledWeight, lora_B, lora_A, spec: MergeSpec
) -> None:
    """Run ``backend``'s merge through the ``lorasc::merge_lowrank_`` op (a
    :class:`ScaledWeight`'s codes and scales are both updated).

    ``backend`` is a registered name (:func:`~lorasc_kernels.backends.resolve_backend_name`).
    """

    def noise_args(noise: NoiseSpec | None) -> tuple[int | None, float]:
        return (None, 0.0) if noise is None else (seed_to_int64(noise.seed), noise.scale)

    weight, weight_scale = _unpack(weight)
    torch.ops.lorasc.merge_lowrank_(
        weight,
        lora_B,
        lora_A,
        spec.coeff,
        spec.rounding,
        seed_to_int64(spec.seed),
        *noise_args(spec.remove),
        *noise_args(spec.add),
        spec.row_offset,
        backend,
        weight_scale,
    )
