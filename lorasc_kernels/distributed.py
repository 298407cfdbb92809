"""Distributed training helpers: row shards of FSDP2 weights, global statistics, checksums.

Under DDP every rank holds whole, identical tensors and nothing here changes the math.
Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter outside forward is a
``DTensor`` sharded by rows (``Shard(0)``, ``torch.chunk``-style: ``ceil(N / world)`` rows per
rank, the last ranks shorter or empty). The cascade then works on each rank's own rows:

* :func:`local_row_block` gives a rank's rows of ``W`` (or ``B``) and the global index of the
  first one, the ``row_offset`` of :func:`~lorasc_kernels.merge_lowrank_`, so noise and
  rounding bits are those of the unsharded run and no rank ever gathers ``W``;
* :func:`full_tensor` gathers a small tensor (``A`` is sharded on its ``r`` rows);
* :func:`global_std` is ``std(W)`` of the whole matrix from per-row moments (``N`` numbers
  gathered, not ``N × K``), the same float on every rank and in an unsharded run;
* :func:`init_rows` draws the whole fresh ``A`` from the seeded generator and keeps the
  local rows, so every rank holds its part of the unsharded run's ``A`` (the layers'
  ``reset_lora``);
* an fp8 layer's per-row scales ``weight_scale`` (N,) stay a replicated buffer (FSDP2 shards
  parameters only, and the forward needs all of them next to the gathered ``W``): each rank
  merges and rescales the scales of its own rows, then :func:`with_synced_scales` gathers
  every rank's rows into every rank's buffer (``N`` floats), and the layer's ``to_linear``
  dequantizes each rank's rows with their own scales (:func:`row_scales_as_held`).

Debug helpers: :func:`tensor_checksum` hashes the exact bits of a tensor (a sharded one
hashed by global position, so it equals the checksum of the gathered tensor);
:func:`weight_checksums` does so for a model; :func:`assert_weights_equal_across_ranks`
compares them across ranks with an ``all_gather``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .noise import MASK32, mix32

__all__ = [
    "is_dtensor",
    "unwrap_data_parallel",
    "local_row_block",
    "full_tensor",
    "global_std",
    "init_rows",
    "row_scales_as_held",
    "with_synced_scales",
    "tensor_checksum",
    "weight_checksums",
    "assert_weights_equal_across_ranks",
]

# Elements handled at a time by the statistics and checksums: bounds their temporaries.
_BLOCK_ELEMENTS = 1 << 20


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 shard)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_row_block(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(local rows, global index of the first one)`` of ``tensor``.

    A plain tensor is its own block at offset 0. A ``DTensor`` must live on a 1-D mesh,
    sharded by rows (``Shard(0)``) or replicated; its local tensor shares storage with the
    shard, so writing into it updates the parameter.
    """
    if not is_dtensor(tensor):
        return tensor, 0
    from torch.distributed.tensor import Replicate, Shard

    local = tensor.to_local()
    mesh, placements = tensor.device_mesh, tensor.placements
    if mesh.ndim != 1:
        raise ValueError(f"a DTensor on a {mesh.ndim}-D mesh is not supported (1-D meshes only)")
    placement = placements[0]
    if isinstance(placement, Replicate):
        return local, 0
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise ValueError(f"expected a DTensor sharded by rows (Shard(0)), got {placement!r}")
    rows = tensor.shape[0]
    chunk = -(-rows // mesh.size())
    row_offset = min(mesh.get_local_rank() * chunk, rows)
    if local.shape[0] != min(chunk, rows - row_offset):
        raise ValueError(
            f"local shard has {local.shape[0]} rows; torch.chunk-style sharding of {rows} "
            f"rows over {mesh.size()} ranks gives {min(chunk, rows - row_offset)} here"
        )
    return local, row_offset


def _is_row_sharded(tensor) -> bool:
    """Whether ``tensor`` is a DTensor sharded (not replicated) over its mesh."""
    return is_dtensor(tensor) and tensor.placements[0].is_shard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a ``DTensor`` (a collective: every rank must call it), else ``tensor``.

    For small tensors such as ``lora_A``; never for a weight matrix.
    """
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def _row_sharded(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``rows``, this rank's block of a tensor with ``like.shape[0]`` rows, as a DTensor
    sharded as ``like`` (no communication)."""
    from torch.distributed.tensor import DTensor

    shape = (like.shape[0], *rows.shape[1:])
    return DTensor.from_local(
        rows,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=shape,
        stride=torch.empty(shape, device="meta").stride(),
    )


def _row_moments(
    block: torch.Tensor, cols: int, row_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``(rows, 2)`` float64: each row's mean and sum of squared deviations from it, of
    ``row_scale[row] · block[row]`` when ``row_scale`` (rows,) is given."""
    rows = block.shape[0]
    step = max(1, _BLOCK_ELEMENTS // cols)
    moments = torch.empty(rows, 2, dtype=torch.float64, device=block.device)
    for start in range(0, rows, step):
        values = block[start : start + step].reshape(-1, cols).to(torch.float64)
        if row_scale is not None:  # exact in float64: fp8 and float32 significands
            values = values * row_scale[start : start + step, None].to(torch.float64)
        means = values.mean(dim=1)
        moments[start : start + step, 0] = means
        moments[start : start + step, 1] = (values - means[:, None]).square().sum(dim=1)
    return moments


def global_std(tensor: torch.Tensor, row_scale: torch.Tensor | None = None) -> float:
    """``std`` (unbiased) of the whole of ``tensor``, in float64, identical on every rank;
    of the dequantized ``row_scale[row] · tensor[row]`` when the per-row scales ``row_scale``
    (N,) of a scaled (fp8) weight are given (a whole tensor, replicated on every rank).

    Each rank computes the moments of its own rows (:func:`local_row_block`); the ``N × 2``
    moments are gathered and combined in row order on every rank. A row's moments do not
    depend on the sharding (where torch reduces a row alike whatever the number of rows,
    as on the CPU), so a sharded matrix gives the unsharded bits. A collective for a
    sharded ``DTensor``.
    """
    if tensor.dim() == 0 or tensor.numel() < 2:
        raise ValueError(f"std needs at least 2 elements, got shape {tuple(tensor.shape)}")
    cols = tensor.numel() // tensor.shape[0]
    local, row_offset = local_row_block(tensor.detach())
    if row_scale is not None:
        row_scale = row_scale[row_offset : row_offset + local.shape[0]]
    moments = _row_moments(local, cols, row_scale)
    if _is_row_sharded(tensor):
        moments = _row_sharded(moments, tensor).full_tensor()
    means, squares = moments.unbind(dim=1)
    mean = means.mean()
    total = (squares + cols * (means - mean).square()).sum()
    return math.sqrt(float(total) / (tensor.numel() - 1))


def init_rows(tensor: torch.Tensor, init: Callable[[torch.Tensor], object]) -> None:
    """``init(tensor)`` (an in-place initialisation, e.g. ``nn.init.kaiming_uniform_``), also
    when ``tensor`` is an FSDP2 shard: then the whole tensor is drawn into a plain one (for
    small tensors such as ``lora_A``) and each rank keeps its rows, the same values as an
    unsharded run with the same generator, whatever the sharding."""
    if not is_dtensor(tensor):
        init(tensor)
        return
    local, row_offset = local_row_block(tensor.detach())
    whole = torch.empty(tensor.shape, dtype=local.dtype, device=local.device)
    init(whole)
    with torch.no_grad():
        local.copy_(whole[row_offset : row_offset + local.shape[0]])


def row_scales_as_held(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The per-row scales ``scale`` (N,) of ``weight`` (N, K) as its rows are held: ``scale``
    itself, or for a row-sharded ``weight`` this rank's entries as a DTensor sharded as
    ``weight`` (no communication), so that each rank dequantizes its own rows."""
    if not _is_row_sharded(weight):
        return scale
    local, row_offset = local_row_block(weight.detach())
    return _row_sharded(scale[row_offset : row_offset + local.shape[0]], weight)


def _local_scale_rows(layer) -> torch.Tensor:
    """The entries of ``layer.weight_scale`` (N,) for this rank's rows of ``layer.weight``
    (a view of the buffer)."""
    local, row_offset = local_row_block(layer.weight.detach())
    return layer.weight_scale[row_offset : row_offset + local.shape[0]]


def with_synced_scales(merge: Callable[[], object], layer) -> Callable[[], object]:
    """``merge`` (of this rank's rows of ``layer``, maybe none), then, for an fp8 layer whose
    weight is row-sharded, ``layer.weight_scale`` made the same on every rank again.

    The scales (N,) are a replicated buffer, but a rank's merge writes (and may rescale)
    the entries of its own rows only: the returned call then all-gathers every rank's
    entries into every rank's buffer (``N`` float32, a collective). Every rank must run it,
    in the same order. ``merge`` itself for any other layer.
    """
    if layer.weight_scale is None or not _is_row_sharded(layer.weight):
        return merge

    def merge_and_sync():
        merge()
        whole = _row_sharded(_local_scale_rows(layer), layer.weight).full_tensor()
        layer.weight_scale.copy_(whole)

    return merge_and_sync


def _block_checksum(block: torch.Tensor, row_offset: int) -> int:
    """Sum over the 16-bit words (bytes for 1-byte dtypes) of ``block`` of
    ``mix32(mix32(index) ^ word)`` mod 2**64, ``index`` counted from the global position
    of ``block``'s first row: additive over the row blocks of a tensor."""
    flat = block.detach().contiguous().view(-1)
    one_byte = flat.element_size() == 1
    words = flat.view(torch.uint8 if one_byte else torch.int16)
    rows = block.shape[0] if block.dim() else 1
    first = row_offset * (words.numel() // rows if rows else 0)
    total = 0
    for start in range(0, words.numel(), _BLOCK_ELEMENTS):
        chunk = words[start : start + _BLOCK_ELEMENTS].to(torch.int64)
        if not one_byte:
            chunk &= 0xFFFF
        index = torch.arange(
            first + start, first + start + chunk.numel(), dtype=torch.int64, device=chunk.device
        )
        key = mix32(mix32(index >> 32) ^ (index & MASK32))
        total += int(mix32(key ^ chunk).sum())
    return total % 2**64


def tensor_checksum(tensor: torch.Tensor) -> int:
    """A 64-bit checksum of the exact bits of ``tensor`` (dtype and position aware).

    For a row-sharded ``DTensor`` each rank hashes its rows at their global positions and
    the sums are all-reduced (a collective), so the result is the checksum of the whole
    tensor, computed without gathering it.
    """
    local, row_offset = local_row_block(tensor)
    checksum = _block_checksum(local, row_offset)
    if _is_row_sharded(tensor):
        total = torch.tensor(
            checksum - 2**64 * (checksum >= 2**63), dtype=torch.int64, device=local.device
        )
        dist.all_reduce(total, group=tensor.device_mesh.get_group())
        checksum = int(total) % 2**64
    return checksum


def weight_checksums(model: nn.Module) -> dict[str, int]:
    """:func:`tensor_checksum` of every parameter and buffer of ``model``, by name.

    A collective when the model holds sharded ``DTensor`` parameters: call it on every rank.
    """
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: tensor_checksum(tensor) for name, tensor in named}


def assert_weights_equal_across_ranks(model: nn.Module, group=None) -> dict[str, int]:
    """Raise ``AssertionError`` naming every tensor of ``model`` whose bits differ between
    ranks of ``group``; return this rank's :func:`weight_checksums`.

    A debug check for replicated training (DDP, or after a cascade boundary): one
    ``all_gather`` of a few integers per tensor. Without an initialised process group
    there is nothing to compare.
    """
    checksums = weight_checksums(model)
    if not (dist.is_available() and dist.is_initialized()):
        return checksums
    gathered: list[dict[str, int] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, checksums, group=group)
    differing = [
        name for name in checksums if any(other.get(name) != checksums[name] for other in gathered)
    ]
    if differing:
        raise AssertionError(
            f"weights differ across ranks on rank {dist.get_rank(group)}: {differing}"
        )
    return checksums


def unwrap_data_parallel(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper: layer names as the user's model has."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model
