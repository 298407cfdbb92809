"""A boundary's merges, checked before any runs: all layers or none, on every rank.

:func:`prepare_merges` checks each requested merge of a Cascade's layers (on an FSDP2 rank,
of the rows it holds) and returns them unrun; when one is refused, every rank raises, so
that the ranks run the boundary or none does. :func:`check_weight_values` is the same
all-or-nothing check of the weights themselves, for a Cascade's construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import _checks as checks
from ..distributed import full_tensor, is_dtensor, local_row_block, with_synced_scales
from ..formats import checks as format_checks
from ..formats.scaled_weight import ScaledWeight
from ..merge import plan_merge

__all__ = [
    "MergeRequest",
    "check_weight_values",
    "prepare_merges",
    "merge_operands",
    "raise_on_every_rank",
]


class MergeRequest(NamedTuple):
    """One merge a boundary asks for; the noises are ``(seed, scale)`` pairs or None."""

    name: str
    layer: object  # a LoRASCLinear or a PEFT layer view
    seed: int  # of the stochastic rounding
    coeff: float
    noise_remove: tuple[int, float] | None
    noise_add: tuple[int, float] | None


class Precheck(NamedTuple):
    """Checks of a caller read with the merges' flags: ``flags`` (1-D bool tensors, on any
    device) and ``conclude(values as read)``, which raises to refuse before any merge's own
    checks are concluded."""

    flags: list[torch.Tensor]
    conclude: Callable[[list[list[bool]]], None]


def prepare_merges(
    requests: list[MergeRequest], rounding: str, layers, precheck: Precheck | None = None
) -> list[Callable]:
    """The checked merges (none run) of ``requests``, in order; see :func:`plan_merge`.
    ``layers``: every layer of the Cascade (their meshes agree on a refusal). Every value
    check (``precheck``'s first, then each merge's) is read in one transfer per device.

    Under FSDP2 a rank checks the rows it holds: the operands are gathered first (the same
    collectives in the same order on every rank), then every rank raises when one refuses.
    The merge of a sharded fp8 layer then gathers its new per-row scales
    (:func:`~lorasc_kernels.distributed.with_synced_scales`).
    """
    operands = [merge_operands(layer) for _, layer, *_ in requests]
    plans, failure = [], None  # (name, plan) per request; None for a rank holding no rows
    for (name, layer, seed, coeff, noise_remove, noise_add), (
        weight,
        row_offset,
        lora_b,
        lora_a,
    ) in zip(requests, operands, strict=True):
        if weight.shape[0] == 0:  # a rank holding no rows of this weight
            plans.append(None)
            continue
        try:
            with checks.naming_layer(name):
                plans.append(
                    (
                        name,
                        plan_merge(
                            weight,
                            lora_b,
                            lora_a,
                            coeff,
                            rounding=rounding,
                            seed=seed,
                            noise_remove=noise_remove,
                            noise_add=noise_add,
                            row_offset=row_offset,
                            backend=layer.backend,
                        ),
                    )
                )
        except (TypeError, ValueError) as error:
            failure = error
            break
    merges = []
    if failure is None:
        extra = [] if precheck is None else precheck.flags
        flags = read_flags(extra + [plan.flags for _, plan in filter(None, plans)])
        try:
            if precheck is not None:
                precheck.conclude(flags[: len(extra)])
        except (TypeError, ValueError) as error:
            failure = error
        flags = flags[len(extra) :]
        for entry in plans if failure is None else ():
            if entry is None:
                merges.append(lambda: None)
                continue
            name, plan = entry
            try:
                with checks.naming_layer(name):
                    merges.append(plan.conclude(flags.pop(0)))
            except (TypeError, ValueError) as error:
                failure = error
                break
    raise_on_every_rank(failure, layers)
    return [
        with_synced_scales(merge, layer)
        for merge, (_, layer, *_) in zip(merges, requests, strict=True)
    ]


def read_flags(flags: list[torch.Tensor]) -> list[list[bool]]:
    """The value-check flags of many merges (1-D bool tensors), read on the host in one
    transfer per device (one for a single-device model)."""
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(flags):
        by_device.setdefault(tensor.device, []).append(index)
    values: list[list[bool]] = [[] for _ in flags]
    for indices in by_device.values():
        read = torch.cat([flags[i] for i in indices]).tolist()  # the one host read
        for i in indices:
            values[i], read = read[: flags[i].numel()], read[flags[i].numel() :]
    return values


def merge_operands(layer) -> tuple:
    """``(weight rows, row_offset, lora_B rows, whole lora_A)`` of this rank (a collective for
    an FSDP2 ``lora_A``); an fp8 layer's rows are a ScaledWeight with their scales."""
    weight, row_offset = local_row_block(layer.weight.data)
    lora_b = local_row_block(layer.lora_B.detach())[0].to(weight.device)
    lora_a = full_tensor(layer.lora_A.detach()).to(weight.device)
    scale = layer.weight_scale  # fp8 weights: the per-row scales (a whole buffer)
    if scale is not None:
        weight = ScaledWeight(weight, scale[row_offset : row_offset + weight.shape[0]])
    return weight, row_offset, lora_b, lora_a


def check_weight_values(layers: dict) -> None:
    """Every layer's weight (this rank's rows) finite, and an fp8 layer's scales positive and
    finite; under FSDP2 every rank raises when one refuses."""
    failure = None
    for name, layer in layers.items():
        weight, row_offset = local_row_block(layer.weight.detach())
        if weight.is_meta:
            continue
        try:
            with checks.naming_layer(name):
                scale = layer.weight_scale
                values = weight  # or, for fp8, the row maxima (NaN codes make them NaN)
                if scale is not None:  # scaled_row_max refuses bad scales
                    values = format_checks.scaled_row_max(
                        weight, scale[row_offset : row_offset + weight.shape[0]]
                    )
                if not bool(torch.isfinite(values).all()):
                    raise ValueError("weight has non-finite values; no layer was changed")
        except ValueError as error:
            failure = error
            break
    raise_on_every_rank(failure, layers.values())


def raise_on_every_rank(failure: Exception | None, layers) -> None:
    """Raise ``failure`` (None: this rank found none); with row-sharded weights, every rank
    of their mesh raises when one has a failure."""
    meshes = {
        id(layer.weight.device_mesh): layer.weight for layer in layers if is_dtensor(layer.weight)
    }
    refused_elsewhere = False
    for weight in meshes.values():
        flag = torch.tensor([int(failure is not None)], device=weight.to_local().device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=weight.device_mesh.get_group())
        refused_elsewhere |= bool(flag)
    if failure is not None:
        raise failure
    if refused_elsewhere:
        raise ValueError(
            "another rank refused this merge for the rows it holds (its error "
            "says why): no layer was changed on any rank"
        )
