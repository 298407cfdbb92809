"""``SlowUpdate``: Lookahead's rule on the other trained parameters, at each boundary.

A parameter trained next to the LoRASC layers (a new head, a norm, a bias) keeps its value
``p_start`` at the start of each cascade (its anchor); at the boundary
``p ← p_start + rate · (p − p_start)`` in place (``torch.lerp``: elementwise, so an FSDP2
rank updates its own rows and DDP ranks stay identical), and the result is the next anchor.
Their optimizer state is kept. What it gains, measured: ``docs/method.md`` §2.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import local_row_block

__all__ = ["SlowUpdate"]


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """The rows of ``parameter`` this rank holds (all of a plain tensor), sharing storage."""
    return local_row_block(parameter.detach())[0]


class SlowUpdate:
    """The slow update of ``params`` (optimizer order; ``names``: their paths, for errors)
    at ``rate``, with their anchors (copies of this rank's rows)."""

    def __init__(self, params: list[nn.Parameter], names: list[str], rate: float):
        self.params = params
        self.names = names
        self.rate = rate
        self.anchors = [_local(p).clone() for p in params]

    def finite_flags(self) -> torch.Tensor:
        """Whether each parameter (this rank's part) is finite: (params,) bool, not read."""
        if not self.params:
            return torch.ones(0, dtype=torch.bool)
        return torch.stack([torch.isfinite(_local(p.detach())).all() for p in self.params])

    def conclude_finite(self, finite: list[bool]) -> None:
        """Refuse (before a boundary writes anything), naming it, the first parameter that
        :meth:`finite_flags` (read) calls non-finite: it diverged."""
        for name, ok in zip(self.names, finite, strict=False):
            if not ok:
                raise ValueError(
                    f"{name} has non-finite values: no layer was merged and the "
                    "cascade is unchanged"
                )

    def prepared_anchors(self) -> list[torch.Tensor]:
        """The anchors, each in its parameter's current dtype and device (a model cast
        between boundaries); a parameter whose shape changed is refused. No write."""
        anchors = []
        for parameter, name, anchor in zip(self.params, self.names, self.anchors, strict=True):
            local = _local(parameter)
            if local.shape != anchor.shape:
                raise ValueError(
                    f"{name} changed shape from {tuple(anchor.shape)} to "
                    f"{tuple(local.shape)} since the cascade began: no layer was merged"
                )
            anchors.append(anchor.to(local.device, local.dtype))
        return anchors

    def apply(self, anchors: list[torch.Tensor], done: dict[int, torch.Tensor]) -> None:
        """``p ← anchor + rate · (p − anchor)`` in place, from :meth:`prepared_anchors`; the
        results are the next anchors. ``done`` (index → new value) keeps what is computed,
        so that a call cut off by an error and made again writes each value once."""
        for index, (parameter, anchor) in enumerate(zip(self.params, anchors, strict=True)):
            local = _local(parameter)
            if index not in done:
                done[index] = anchor.lerp(local, self.rate)
            local.copy_(done[index])
        self.anchors = [done[index] for index in range(len(self.params))]

    def load(self, saved_anchors) -> None:
        """Take saved anchors (checked by :func:`~lorasc_kernels.cascade.state.check_state`)."""
        for anchor, saved in zip(self.anchors, saved_anchors, strict=True):
            anchor.copy_(saved)
