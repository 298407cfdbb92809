"""The merge ``W ← round(W − N_remove + coeff · B A + N_add)`` in place: its public call
(:func:`merge_lowrank_`), the same call checked and not run (:func:`prepare_merge`,
:func:`plan_merge`, for a caller that checks many merges before the first write), and the
range check that guards it (:class:`MergeRangeCheck`): refuse, before anything is written,
a merge whose result would leave W's range or whose operands hold non-finite values, and
remember, per W, a bound of its rows after each merge so that the next merge of a frozen W
reads none of it.

Shapes: ``weight`` (rows, K) (a block of rows of a larger matrix, or a
:class:`~lorasc_kernels.formats.scaled_weight.ScaledWeight` of such rows), ``lora_B``
(rows, r), ``lora_A`` (r, K).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _checks as checks
from . import ops
from .backends import BACKENDS, resolve_backend_name
from .backends.specs import MergeSpec, NoiseSpec
from .formats.checks import ROW_BLOCK_ELEMENTS, _scaled_row_max, raise_bad_scale, scale_values_ok
from .formats.registry import SCALED_DTYPES, scaled_weight_dtype
from .formats.rounding import ROUNDING_MODES
from .formats.scaled_weight import ScaledWeight
from .functional import check_backend_dtype, check_backend_scaled, check_lowrank, check_weight

__all__ = ["merge_lowrank_", "prepare_merge", "plan_merge", "MergePlan", "MergeRangeCheck"]

# Rows whose cheap bound comes this close to the largest finite value are merged exactly into
# a scratch copy instead: the bound ignores float32 rounding (relative 2**-24 per operation).
_BOUND_MARGIN = 1.0 - 2.0**-10


class MergeRangeCheck:
    """Refuse a merge ``W − n_remove + coeff · B A + n_add`` whose result leaves W's range,
    or whose W, ``lora_A`` or ``lora_B`` holds a non-finite value, in two halves so that a
    caller reads the checks of many merges at once: construction computes on W's device
    and reads nothing; :attr:`flags` is a 1-D bool tensor (a scaled W: its scales valid,
    then whether the merge fits; a float W: whether it fits); :meth:`conclude` takes them as
    read on the host and raises where they say (reading more only on the way to an error,
    or to merge the rows near the limit exactly).

    ``weight`` (rows, K), ``noise_scales`` the two noise scales (0 for no noise),
    ``exact_rows(start, stop)`` the merged values of rows ``start:stop`` computed into new
    memory. Per row ``i``, in float64, noise values lying in [-½, ½)::

        bound_i = max_j |W_ij| + (|s_remove| + |s_add|) / 2 + |coeff| · Σ_k |B_ik| max_j |A_kj|

    bounds every value of the row (and is NaN or inf where W, A or B is not finite). A row
    passes when ``bound_i`` and ``Σ_k |B_ik| max_j |A_kj|`` are below ``(1 - 2**-10)``
    times the largest finite value of W's dtype (a float64 ``W`` merges in float64). Any
    other row of finite values is merged exactly by ``exact_rows`` and refused only if that
    yields an inf, so no merge that fits is refused. No write; one read of ``W`` (a row-wise
    max), unless W is as the last merge through a check left it (:meth:`remember`).

    A scaled ``W`` passes its codes as ``weight``, its ``row_scale`` and ``exact_rows=None``
    (bad scales are refused as ``weight.scale``): ``row_max`` is then the row maxima of its
    dequantized values, its rows are rescaled to fit the format (never out of its range),
    so only float32's range bounds the merge: a row passes when
    ``bound_i`` and ``bound_i / row_scale[i]`` (the merge's ``v / scale``) are within the
    limit, and is refused on the bound otherwise.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        lora_B: torch.Tensor,
        lora_A: torch.Tensor,
        coeff: float,
        noise_scales: tuple[float, float],
        row_offset: int,
        exact_rows,
        row_scale: torch.Tensor | None = None,
    ):
        self.weight, self.lora_B, self.lora_A = weight, lora_B, lora_A
        self.row_scale, self.exact_rows = row_scale, exact_rows
        self.coeff, self.noise_scales, self.row_offset = coeff, noise_scales, row_offset
        scaled = row_scale is not None
        self.dtype_max = torch.finfo(torch.float32 if scaled else weight.dtype).max
        limit = self.dtype_max * _BOUND_MARGIN
        row_max = _LEFT_BOUNDS.get(weight, _stamp(weight, row_scale))
        if row_max is None and scaled:
            row_max = _scaled_row_max(weight, row_scale)
        elif row_max is None:
            row_max = torch.linalg.vector_norm(weight.detach(), ord=float("inf"), dim=1).double()
        self.row_max = row_max
        lowrank = lora_B.detach().abs().double() @ lora_A.detach().abs().amax(dim=1).double()
        bound = row_max + sum(abs(s) for s in noise_scales) / 2 + abs(coeff) * lowrank
        self.bound = bound
        inside = (bound <= limit) & (lowrank <= limit)  # False where NaN
        if scaled:
            inside &= bound / row_scale.double() <= limit
        self.inside = inside
        fits = inside.all()
        self.flags = (
            torch.stack([scale_values_ok(row_scale, weight.dtype), fits])
            if scaled
            else fits.reshape(1)
        )

    def conclude(self, *flags: bool) -> None:
        """Raise as the :attr:`flags` (read) say; nothing when the merge fits."""
        weight, row_offset = self.weight, self.row_offset
        if self.row_scale is not None:
            scales_ok, fits = flags
            if not scales_ok:
                raise_bad_scale("weight.scale", self.row_scale, weight.dtype)
        else:
            (fits,) = flags
        if fits:
            return
        for name, factor in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            if not bool(torch.isfinite(factor).all()):
                raise ValueError(f"{name} has non-finite values; weight was left untouched")
        if not bool(torch.isfinite(self.row_max).all()):
            row = row_offset + int((~torch.isfinite(self.row_max)).nonzero()[0, 0])
            raise ValueError(f"weight has non-finite values (row {row}); it was left untouched")
        coeff, noise_scales = self.coeff, self.noise_scales
        suspect = (~self.inside).nonzero().flatten()
        if self.row_scale is not None:
            raise ValueError(
                f"the merge could overflow float32 at row {row_offset + int(suspect[0])}: "
                f"|coeff| = {abs(coeff):.4g}, noise scales {noise_scales}; weight was left "
                "untouched"
            )
        start, stop = int(suspect[0]), int(suspect[-1]) + 1
        block = max(1, ROW_BLOCK_ELEMENTS // weight.shape[1])
        for first in range(start, stop, block):
            merged = self.exact_rows(first, min(stop, first + block))
            overflow = ~torch.isfinite(merged)
            if bool(overflow.any()):
                row, col = (int(i) for i in overflow.nonzero()[0])
                raise ValueError(
                    f"the merge would overflow {weight.dtype} (largest finite value "
                    f"{self.dtype_max:.4g}) at weight[{row_offset + first + row}, {col}]: "
                    f"|coeff| = {abs(coeff):.4g}, noise scales {noise_scales}; weight was "
                    "left untouched"
                )

    def remember(self) -> None:
        """Keep, for the next check of this W, a bound of each row's largest magnitude after
        the merge it checked (call once that merge is written): :attr:`bound` widened by the
        rounding of the merge's arithmetic and of its result (:func:`_rounding_slack`).
        Frozen between merges, W then needs no read at its next merge."""
        weight, row_scale = self.weight, self.row_scale
        relative, absolute = _rounding_slack(weight.dtype, self.lora_A.shape[0])
        step = absolute if row_scale is None else absolute * row_scale.double()
        _LEFT_BOUNDS.put(weight, _stamp(weight, row_scale), self.bound * relative + step)


def _rounding_slack(dtype: torch.dtype, rank: int) -> tuple[float, float]:
    """``(relative, absolute)`` with ``|merged| ≤ relative · bound + absolute`` for every
    value a merge writes in ``dtype`` (a scaled format: in units of the row's new scale):
    the float32 arithmetic (at most ``rank + 8`` roundings of 2**-24 relative each, also
    taken for a float64 W) then the rounding to ``dtype``, up to one step of its spacing
    (``eps`` relative for normal values, one smallest subnormal step near zero)."""
    if dtype in SCALED_DTYPES:
        fmt = scaled_weight_dtype(dtype)
        eps = 2.0**-fmt.mantissa_bits
        smallest = 2.0 ** (fmt.min_exponent - fmt.mantissa_bits)
    else:
        info = torch.finfo(dtype)
        eps, smallest = info.eps, info.smallest_normal * info.eps
    return (1.0 + (rank + 8) * 2.0**-24) * (1.0 + eps), smallest


def _stamp(weight: torch.Tensor, row_scale: torch.Tensor | None) -> tuple | None:
    """What changes when anything writes W (or its scales): storage, version, layout; None
    for an inference tensor, which keeps no version (its bounds are never remembered)."""
    if weight.is_inference() or (row_scale is not None and row_scale.is_inference()):
        return None
    stamp = (weight.data_ptr(), weight._version, weight.shape, weight.stride(), weight.dtype)
    if row_scale is None:
        return stamp
    return stamp + (row_scale.data_ptr(), row_scale._version)


class _Bounds:
    """Per W (by identity, held weakly), the row bounds a merge left and the stamp of W as it
    left it: valid while the stamp is unchanged."""

    def __init__(self):
        self._by_weight = WeakIdKeyDictionary()

    def get(self, weight: torch.Tensor, stamp: tuple | None) -> torch.Tensor | None:
        known = self._by_weight.get(weight) if stamp is not None else None
        return known[1] if known is not None and known[0] == stamp else None

    def put(self, weight: torch.Tensor, stamp: tuple | None, bounds: torch.Tensor) -> None:
        if stamp is not None:
            self._by_weight[weight] = (stamp, bounds)


_LEFT_BOUNDS = _Bounds()


def merge_lowrank_(
    weight: torch.Tensor | ScaledWeight,
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    coeff: float,
    *,
    rounding: str = "stochastic",
    seed: int = 0,
    noise_remove: tuple[int, float] | None = None,
    noise_add: tuple[int, float] | None = None,
    row_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor | ScaledWeight:
    """``W ← round(W − noise_remove + coeff · B A + noise_add)`` in place; returns ``weight``.

    Args:
        weight: (rows, K) fp32/fp16/bf16 weight, or a block of rows of a larger one; or a
            :class:`ScaledWeight` of such rows, whose ``codes`` and ``scale`` (any strides
            without overlap) are both updated in place: a row whose values would exceed the
            format's range gets a scale larger by a power of two (``docs/fp8.md``), never a
            clamp.
        lora_B: (rows, r), the rows of B matching ``weight``'s rows.
        lora_A: (r, K).
        coeff: finite multiplier of ``B A`` (the cascade uses ``slow_rate · scale``).
        rounding: ``"stochastic"`` (unbiased, bits keyed by ``seed``) or ``"nearest"``.
        seed: key of the stochastic-rounding bits.
        noise_remove, noise_add: ``(seed, scale)`` of noise ``scale · noise(seed)`` to
            subtract / add in the same pass, or None.
        row_offset: global index of ``weight``'s first row; noise and rounding bits are
            indexed by global row, so merging shards one by one equals merging the whole.
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    The exact float32 order of operations is that of
    :func:`lorasc_kernels.backends.reference.merge_`. Everything is checked first
    (:func:`prepare_merge`), including that the result stays finite in ``weight``'s dtype:
    any bad argument raises and leaves ``weight`` untouched.
    """
    return prepare_merge(
        weight,
        lora_B,
        lora_A,
        coeff,
        rounding=rounding,
        seed=seed,
        noise_remove=noise_remove,
        noise_add=noise_add,
        row_offset=row_offset,
        backend=backend,
    )()


def prepare_merge(*args, **kwargs) -> Callable[[], torch.Tensor | ScaledWeight]:
    """Check every argument of :func:`merge_lowrank_` (taken as it takes them) and return the
    call that merges.

    Nothing is written here, so a caller merging many weights (the Cascade) checks them all
    before the first write. Beyond the argument checks: ``weight`` must hold values (not
    meta, not an inference tensor outside inference mode), be finite, and the merge must
    keep it finite in its dtype (:class:`MergeRangeCheck`); a :class:`ScaledWeight` needs
    valid scales (:func:`~lorasc_kernels.formats.checks.scale_values_ok`) and a merge whose
    values, and their quotients by the row scale, stay within float32's range. The value
    checks cost one host read (:func:`plan_merge`).
    """
    plan = plan_merge(*args, **kwargs)
    return plan.conclude(plan.flags.tolist())


class MergePlan(NamedTuple):
    """A merge whose argument checks passed and whose value checks are computed but not read:
    ``flags`` (1-D bool, on W's device) are those of
    :class:`~lorasc_kernels.merge.MergeRangeCheck` (finite values, range, scales);
    ``conclude(flags as read)`` raises as they say, or returns the merge (not run)."""

    flags: torch.Tensor
    conclude: Callable[[list[bool]], Callable[[], torch.Tensor | ScaledWeight]]


def plan_merge(
    weight: torch.Tensor | ScaledWeight,
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    coeff: float,
    *,
    rounding: str = "stochastic",
    seed: int = 0,
    noise_remove: tuple[int, float] | None = None,
    noise_add: tuple[int, float] | None = None,
    row_offset: int = 0,
    backend: str = "auto",
) -> MergePlan:
    """:func:`prepare_merge` without reading the device: the checks of the arguments, and
    the value checks computed into :attr:`MergePlan.flags`, so that a caller merging many
    weights reads all their flags at once (the Cascade: one read per boundary)."""
    scaled = check_weight(weight)
    check_lowrank(weight, lora_A, lora_B, row_block=True)
    checks.check_same_device(weight=weight, lora_B=lora_B, lora_A=lora_A)
    # The tensors written in place, by the names errors give them.
    written = (
        {"weight.codes": weight.codes, "weight.scale": weight.scale}
        if scaled
        else {"weight": weight}
    )
    coeff = checks.check_float("coeff", coeff)
    rounding = checks.check_choice("rounding", rounding, ROUNDING_MODES)
    seed = checks.check_seed("seed", seed)
    noise_remove = checks.check_noise_pair("noise_remove", noise_remove)
    noise_add = checks.check_noise_pair("noise_add", noise_add)
    scalars = {
        "coeff": coeff,
        "noise_remove[1] (scale)": (noise_remove or (0, 0.0))[1],
        "noise_add[1] (scale)": (noise_add or (0, 0.0))[1],
    }
    for name, value in scalars.items():  # merges compute in float32 (float64 W: in float64)
        if weight.dtype != torch.float64 and abs(value) > torch.finfo(torch.float32).max:
            raise ValueError(f"{name} must be within float32's range, got {value}")
    row_offset = checks.check_int("row_offset", row_offset, 0, 2**32 - weight.shape[0])
    for name, tensor in written.items():
        checks.check_no_overlap(name, tensor)
    checks.check_disjoint({**written, "lora_B": lora_B, "lora_A": lora_A})
    checks.check_choice("backend", backend, BACKENDS)
    backend = resolve_backend_name(backend, weight.device)
    if scaled:
        check_backend_scaled(backend, weight)
    check_backend_dtype(
        backend, weight=None if scaled else weight.dtype, lora_A=lora_A.dtype, lora_B=lora_B.dtype
    )
    for name, tensor in written.items():
        checks.check_writable(name, tensor)
    remove = None if noise_remove is None else NoiseSpec(*noise_remove)
    add = None if noise_add is None else NoiseSpec(*noise_add)

    def merge_rows(target, start: int, stop: int):
        """Merge rows ``start:stop`` of the update into ``target`` (those rows of W)."""
        spec = MergeSpec(coeff, rounding, seed, remove, add, row_offset + start)
        with torch.no_grad():
            ops.merge_(backend, target, lora_B[start:stop], lora_A, spec)
        return target

    noise_scales = (scalars["noise_remove[1] (scale)"], scalars["noise_add[1] (scale)"])
    if scaled:
        range_check = MergeRangeCheck(
            weight.codes, lora_B, lora_A, coeff, noise_scales, row_offset, None, weight.scale
        )
    else:
        range_check = MergeRangeCheck(
            weight,
            lora_B,
            lora_A,
            coeff,
            noise_scales,
            row_offset,
            lambda start, stop: merge_rows(weight[start:stop].clone(), start, stop),
        )

    def merge() -> torch.Tensor | ScaledWeight:
        merge_rows(weight, 0, weight.shape[0])
        range_check.remember()  # the next merge of this W, if nothing else writes it, reads none
        return weight

    def conclude(flags: list[bool]) -> Callable[[], torch.Tensor | ScaledWeight]:
        range_check.conclude(*flags)
        return _once(merge)

    return MergePlan(range_check.flags, conclude)


def _once(merge: Callable):
    """``merge`` as a call that runs once: a second run would add the update twice."""
    ran = False

    def run():
        nonlocal ran
        if ran:
            raise RuntimeError(
                "this prepared merge has run already (a second run would add the update "
                "twice): call prepare_merge again for another merge"
            )
        ran = True
        return merge()

    return run
