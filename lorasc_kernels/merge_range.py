"""The range check of a merge: refuse, before anything is written, a merge whose result
would leave W's range or whose operands hold non-finite values (:class:`MergeRangeCheck`),
and remember, per W, a bound of its rows after each merge so that the next merge of a
frozen W reads none of it."""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ._checks import ROW_BLOCK_ELEMENTS, _scaled_row_max, raise_bad_scale, scale_values_ok
from .dtypes import SCALED_DTYPES, scaled_weight_dtype

__all__ = ["MergeRangeCheck"]

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
