"""The Triton backend's ``lowrank_gemm`` primitive: per problem, the fastest of three ways to
compute ``out = P (Q ⊕ noise)ᵀ (+ bias) + scale · drop(U Vᵀ)`` (M, N).

Variants (:data:`VARIANTS`):

* ``"tiled"``: :func:`.fused_linear.tiled_lowrank_gemm`, one program per output tile; takes
  everything (any dtype, layout). The fallback of the others.
* ``"persistent"``: :func:`.fused_linear_tma.persistent_lowrank_gemm`, persistent and fed
  by TMA; where :func:`.fused_linear_tma.unsupported_reason` is None (16-bit, aligned).

A scaled (fp8) weight has these two variants too, in :mod:`.fused_linear_scaled`
(:func:`~.fused_linear_scaled.scaled_lowrank_gemm`, and
:func:`~.fused_linear_scaled_tma.persistent_scaled_lowrank_gemm` where
:func:`~.fused_linear_scaled_tma.scaled_unsupported_reason` is None).
* ``"addmm"``: :func:`addmm_lowrank_gemm`, cuBLAS ``addmm`` for ``P Qᵀ + b`` then
  ``out.addmm_(U, Vᵀ, alpha=scale)`` (the benchmarks' ``addmm`` provider); for 16-bit
  operands of one dtype, unscaled weights and no rank-term dropout. The noise, if any, is
  one :func:`.fused_linear.noisy_weight_pass` first.

The mode (:data:`mode`: ``LORASC_GEMM_VARIANT``, :data:`SWITCH`, as set when this module is
first imported, i.e. at the first GEMM of the Triton backend; changed in the process by
:func:`forced_mode`; read at each call as a module attribute, not from the environment, which
would cost microseconds per launch):

* ``measure`` (the default for CUDA tensors): the first call of a problem with two or
  more candidate variants times each (after its autotuning; one that raises is left out
  with a warning, except ``tiled``) and keeps the fastest, keyed by (device, M rounded up
  to a power of two, N, K, r, dtype, forward or dX, noise, dropout, bias, candidates):
  like ``torch.backends.cudnn.benchmark``, but on by default, so the layer is never
  slower than the ``addmm`` composition measured on the same problem. The choice is kept
  on disk (:mod:`.dispatch_store`, ``LORASC_DISPATCH_DIR``): every later process on the
  same GPU model and versions, every rank of a job, runs the variant first chosen, without
  measuring it again.
* ``tiled``, ``persistent`` or ``addmm``: that variant wherever it applies, else ``tiled``
  (the default for CPU tensors under ``TRITON_INTERPRET=1``: nothing to measure there;
  ``measure`` asked for on CPU tensors runs ``tiled`` too, with one warning per process).

Cost of ``measure``: once per key, each candidate runs its autotuning (as it would alone),
then is timed by :attr:`Dispatch.timer` (``triton.testing.do_bench``: about 30 ms each, so
0.1 s per key for three). While a CUDA graph is captured nothing is measured: the key's
earlier choice, else ``tiled``. Variants round differently (``addmm`` rounds ``P Qᵀ + b``
to ``P``'s dtype before adding the rank term); the noise and the dropout mask are the same
bits in all three. Set the switch to a variant for identical outputs across GPU models
or versions.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import triton

from ...formats.scaled_weight import ScaledWeight
from ..specs import DropoutSpec, NoiseSpec
from . import on_tensor_device
from .configs import m_bucket
from .dispatch_store import ChoiceStore
from .fused_linear import noisy_weight_pass, tiled_lowrank_gemm
from .fused_linear_scaled import scaled_lowrank_gemm
from .fused_linear_scaled_tma import persistent_scaled_lowrank_gemm, scaled_unsupported_reason
from .fused_linear_tma import TMA_DTYPES, persistent_lowrank_gemm, unsupported_reason

__all__ = [
    "SWITCH",
    "VARIANTS",
    "MODES",
    "mode",
    "forced_mode",
    "ProblemKey",
    "Dispatch",
    "DISPATCH",
    "candidates",
    "addmm_lowrank_gemm",
    "lowrank_gemm",
]

SWITCH = "LORASC_GEMM_VARIANT"
VARIANTS = ("tiled", "persistent", "addmm")
_MEASURE = "measure"
MODES = (_MEASURE, *VARIANTS)

# The mode of every call in this process (module docstring): None, the default of each
# call's device (measure on CUDA, tiled elsewhere), or one of MODES (checked where used).
mode: str | None = os.environ.get(SWITCH) or None


@contextlib.contextmanager
def forced_mode(value: str | None) -> Iterator[None]:
    """:data:`mode` set to ``value`` (one of :data:`MODES`, or None for the default) inside,
    restored after."""
    global mode
    if value is not None and value not in MODES:
        raise ValueError(f"GEMM dispatch mode {value!r}: expected one of {MODES} or None")
    before, mode = mode, value
    try:
        yield
    finally:
        mode = before


class ProblemKey(NamedTuple):
    """What a measured choice is kept for: one problem of one device."""

    device: torch.device
    m_bucket: int  # M rounded up to a power of two, as the autotuners key it
    n: int
    k: int
    r: int
    dtype: torch.dtype
    q_transposed: bool  # the dX GEMM
    noise: bool
    rank_dropout: bool
    bias: bool
    candidates: tuple[str, ...]

    def words(self, device: bool = True) -> str:
        """The problem in words; without its device (``device=False``), the label a
        :class:`ChoiceStore` files it under."""
        flags = [name for name in ("noise", "rank_dropout", "bias") if getattr(self, name)]
        return (
            f"{'dX' if self.q_transposed else 'forward'} M<={self.m_bucket} N={self.n} "
            f"K={self.k} r={self.r} {str(self.dtype).removeprefix('torch.')}"
            f"{''.join(' +' + flag for flag in flags)}{f' on {self.device}' if device else ''}"
            f", of {'/'.join(self.candidates)}"
        )

    def __str__(self) -> str:
        return self.words()


def _gpu_seconds(run: Callable[[], object]) -> float:
    """Median seconds of ``run()`` on the current CUDA stream (``triton.testing.do_bench``)."""
    return triton.testing.do_bench(run, warmup=5, rep=25) * 1e-3


class Dispatch:
    """The choice of variant, per problem key (a :class:`ProblemKey` from
    :func:`lowrank_gemm`). ``timer(run) -> seconds`` times a variant (replaceable: the tests
    give a fake one); :attr:`chosen` maps each key chosen in this process to its variant;
    ``store`` (a :class:`ChoiceStore`, or None: this process only) shares the choices with
    every other process of the same GPU model and versions."""

    def __init__(
        self,
        timer: Callable[[Callable[[], object]], float] = _gpu_seconds,
        store: ChoiceStore | None = None,
    ):
        self.timer = timer
        self.store = store
        self.chosen: dict = {}
        self.told_no_timer = False  # measure was asked for on CPU tensors (warned once)

    def choose(
        self,
        device: torch.device,
        key,
        options: tuple[str, ...],
        run: Callable[[str], object],
        mode: str | None = None,
    ) -> str:
        """The variant among ``options`` (``"tiled"`` first) for ``key``, as the dispatch's
        mode says (``mode``: that of :func:`mode_for`, if already read); measuring runs
        ``run(variant)`` under :attr:`timer`."""
        mode = mode or mode_for(device.type == "cuda")
        if mode == _MEASURE:  # a key measured before: its choice, nothing else to read
            chosen = self.chosen.get(key)
            if chosen is not None:
                return chosen
        if mode not in MODES:
            raise ValueError(f"GEMM dispatch mode ({SWITCH}) {mode!r}: expected one of {MODES}")
        if mode == _MEASURE and device.type != "cuda" and self.timer is _gpu_seconds:
            if not self.told_no_timer:  # the GPU timer cannot time the interpreter
                warnings.warn(
                    f"{SWITCH}=measure times GPU kernels; on {device} tensors (the "
                    "Triton interpreter) the tiled variant runs",
                    stacklevel=3,
                )
                self.told_no_timer = True
            return "tiled"
        if mode != _MEASURE:
            return mode if mode in options else "tiled"
        if len(options) == 1:  # nothing to choose between: nothing timed
            return options[0]
        if key not in self.chosen:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return "tiled"
            label = key.words(device=False) if isinstance(key, ProblemKey) else str(key)
            stored = None if self.store is None else self.store.read(device).get(label)
            if stored in options:  # another process measured it: the same choice here
                self.chosen[key] = stored
                return stored
            seconds = {}
            for variant in options:
                try:
                    seconds[variant] = self.timer(lambda variant=variant: run(variant))
                except Exception as error:  # the tiled kernel is the fallback: never dropped
                    if variant == "tiled":
                        raise
                    warnings.warn(
                        f"GEMM variant {variant!r} failed on {key}, left out for "
                        f"the process: {type(error).__name__}: {error}",
                        stacklevel=3,
                    )
            fastest = min(seconds, key=seconds.__getitem__)
            if self.store is not None:
                settled = self.store.settle(device, label, fastest)
                fastest = settled if settled in options else fastest
            self.chosen[key] = fastest
        return self.chosen[key]


DISPATCH = Dispatch(store=ChoiceStore.from_environment())


# The mode without :data:`mode`, by whether the tensors are CUDA's (else the interpreter's)
_DEFAULT_MODE = {True: _MEASURE, False: "tiled"}


def mode_for(on_gpu: bool) -> str:
    """:data:`mode`, or its default for CUDA tensors (``on_gpu``) or others. A bool, not a
    device: ``tensor.is_cuda`` is read in a tenth of the time of ``tensor.device.type``."""
    return mode or _DEFAULT_MODE[on_gpu]


def candidates(
    p, q, bias, u, v, rank_dropout: DropoutSpec | None, q_transposed: bool = False
) -> tuple[str, ...]:
    """The variants that compute this call (module docstring), ``"tiled"`` first; a
    :class:`ScaledWeight` ``q`` has a tiled and a persistent kernel of its own."""
    if isinstance(q, ScaledWeight):
        return ("tiled",) + (("persistent",) if scaled_unsupported_reason(p, q) is None else ())
    found = ["tiled"]
    if unsupported_reason(p, q, q_transposed) is None:
        found.append("persistent")
    operands = [q] + [t for t in (bias, u, v) if t is not None]
    if p.dtype in TMA_DTYPES and rank_dropout is None and all(t.dtype == p.dtype for t in operands):
        found.append("addmm")
    return tuple(found)


def addmm_lowrank_gemm(
    p, q, bias, u, v, scale, noise: NoiseSpec | None = None, q_transposed: bool = False
) -> torch.Tensor:
    """``out = P (Q ⊕ noise)ᵀ (+ bias) + scale · U Vᵀ`` (with ``q_transposed``, ``W`` and
    ``v`` as stored: ``P (Q ⊕ noise) + scale · U V``) by two ``addmm`` calls (cuBLAS on a
    GPU): ``P Qᵀ + b`` rounded to ``P``'s dtype, then the rank term added in place."""
    if noise is not None:
        q = noisy_weight_pass(q, noise)
    q_t = q if q_transposed else q.t()  # the GEMM's (K, N) operand
    out = p @ q_t if bias is None else torch.addmm(bias, p, q_t)
    if u is not None:
        out.addmm_(u, v if q_transposed else v.t(), alpha=scale)
    return out


# ``(candidates, ProblemKey)`` of the calls seen, by their :func:`_layout`: a known layout
# skips the checks of :func:`candidates` (a dozen Python calls per launch, on the default
# ``measure`` path of every CUDA call). Bounded: cleared when full.
_PROBLEMS: dict[tuple, tuple[tuple[str, ...], ProblemKey]] = {}
_PROBLEMS_MAX = 4096


def _layout(p, q, bias, u, v, noise, q_transposed, rank_dropout) -> tuple:
    """Everything :func:`candidates` and the :class:`ProblemKey` of a call read, by attribute
    reads alone: devices, dtypes, shapes, strides, the operands' base-pointer alignment
    (TMA's 16 bytes), which optional operands are there."""
    q_data = q.codes if isinstance(q, ScaledWeight) else q
    return (
        p.device,
        p.dtype,
        p.shape,
        p.stride(),
        p.data_ptr() % 16,
        type(q),
        q_data.dtype,
        q_data.shape,
        q_data.stride(),
        q_data.data_ptr() % 16,
        None if bias is None else bias.dtype,
        None if u is None else (u.dtype, u.shape[1]),
        None if v is None else v.dtype,
        noise is None,
        rank_dropout is None,
        q_transposed,
    )


def _problem(p, q, bias, u, v, noise, q_transposed, rank_dropout) -> tuple:
    """``(candidates, ProblemKey)`` of a call."""
    options = candidates(p, q, bias, u, v, rank_dropout, q_transposed)
    (M, K), N = p.shape, q.shape[1 if q_transposed else 0]  # q: W as stored (the contract)
    key = ProblemKey(
        p.device,
        m_bucket(M),
        N,
        K,
        0 if u is None else u.shape[1],
        p.dtype,
        q_transposed,
        noise is not None,
        rank_dropout is not None,
        bias is not None,
        options,
    )
    return options, key


def _run_variant(variant, p, q, bias, u, v, scale, noise, q_transposed, rank_dropout):
    """:func:`lowrank_gemm`'s product by ``variant`` (one of :data:`VARIANTS`)."""
    if isinstance(q, ScaledWeight):  # no noise on scaled weights (the layer refuses it)
        gemm = persistent_scaled_lowrank_gemm if variant == "persistent" else scaled_lowrank_gemm
        return gemm(p, q, bias, u, v, scale, q_transposed, rank_dropout)
    if variant == "persistent":
        return persistent_lowrank_gemm(p, q, bias, u, v, scale, noise, q_transposed, rank_dropout)
    if variant == "addmm":
        return addmm_lowrank_gemm(p, q, bias, u, v, scale, noise, q_transposed)
    return tiled_lowrank_gemm(p, q, bias, u, v, scale, noise, q_transposed, rank_dropout)


@on_tensor_device
def lowrank_gemm(
    p,
    q,
    bias,
    u,
    v,
    scale,
    noise: NoiseSpec | None = None,
    q_transposed: bool = False,
    rank_dropout: DropoutSpec | None = None,
) -> torch.Tensor:
    """``out = P (Q ⊕ noise)ᵀ (+ bias) + scale · drop(U Vᵀ)`` (M, N) in ``P``'s dtype, the
    contract's primitive (:class:`~lorasc_kernels.backends.contract.Backend`), by the
    variant :data:`DISPATCH` chooses."""
    current = mode or _DEFAULT_MODE[p.is_cuda]  # mode_for(p.is_cuda), without its frame
    if current == "tiled":  # it takes every call: no candidates, no key to build
        if isinstance(q, ScaledWeight):
            return scaled_lowrank_gemm(p, q, bias, u, v, scale, q_transposed, rank_dropout)
        return tiled_lowrank_gemm(p, q, bias, u, v, scale, noise, q_transposed, rank_dropout)
    operands = (p, q, bias, u, v, scale, noise, q_transposed, rank_dropout)
    layout = _layout(p, q, bias, u, v, noise, q_transposed, rank_dropout)
    problem = _PROBLEMS.get(layout)
    if problem is None:
        if len(_PROBLEMS) >= _PROBLEMS_MAX:
            _PROBLEMS.clear()
        problem = _PROBLEMS[layout] = _problem(p, q, bias, u, v, noise, q_transposed, rank_dropout)
    options, key = problem
    # a key measured before: its choice, read here (Dispatch.choose's first step, without
    # its frame and the closure it is given: host time at every launch of every layer)
    variant = DISPATCH.chosen.get(key) if current == _MEASURE else None
    if variant is None:
        variant = DISPATCH.choose(
            p.device, key, options, lambda variant: _run_variant(variant, *operands), current
        )
    return _run_variant(variant, *operands)
