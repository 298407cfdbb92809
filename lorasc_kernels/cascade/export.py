"""What a running Cascade writes out without ending the run: the finalized model's state
dict (:func:`merged_state_dict`, or streamed to safetensors files by :func:`save_merged`)
and the merged updates as one PEFT adapter (:func:`export_peft_adapter`). The Cascade's
methods of the same names call these; they read the Cascade's seeds and noise as its
boundary would.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .. import _checks as checks
from .._files import Pending, spec, write_safetensors, write_staged
from ..distributed import is_dtensor, unwrap_data_parallel
from ..formats.scaled_weight import ScaledWeight
from ..integrations.peft import plain_model
from ..layer import LoRASCLinear
from ..merge import merge_lowrank_
from .merges import MergeRequest, merge_operands, raise_on_every_rank

__all__ = ["merged_state_dict", "save_merged", "export_peft_adapter"]

logger = logging.getLogger("lorasc_kernels")

# Hugging Face's names and default shard size (``save_pretrained(max_shard_size="5GB")``).
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9


def merged_state_dict(cascade, device: torch.device | str | None = None) -> dict:
    """The state dict of the model ``cascade.finalize()`` would return now, leaving the model
    and the Cascade as they are.

    Keys as after ``finalize()`` (each driven layer a plain linear: its ``weight`` and
    ``bias``, no ``lora_A``/``lora_B``/``weight_scale``, nor a PEFT layer's); each layer's
    ``weight`` is ``W − N_t + slow_rate·s·B A`` merged as ``finalize()`` merges it (same
    float32 math, rounding and bits; fp8 dequantized to the layer's float dtype), the other
    slow-updated parameters get their slow update. Every other tensor is the model's own
    (shared), or a copy on ``device`` when it is given. Costs one new weight per layer;
    with ``device``, each merged weight moves there as soon as it is made, so W's device
    holds at most one of them at a time. :func:`save_merged` writes the same tensors to
    files holding at most one in memory.
    Under FSDP2 (sharded ``DTensor`` parameters) it is refused.
    """
    if device is not None:
        if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
            raise TypeError(
                f"device must be a torch.device, a str or an int, got {type(device).__name__}"
            )
        try:
            device = torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"device {device!r} is not a device: {error}") from None
    made = {}  # each merge (the same for every alias of its weight) → its tensor
    state = {}
    for key, entry in merged_entries(cascade, "merged_state_dict").items():
        if not isinstance(entry, Pending):  # the model's own
            state[key] = entry if device is None else entry.to(device, copy=True)
            continue
        if id(entry) not in made:  # moved at once: one merged layer at a time where W lives
            made[id(entry)] = entry.make() if device is None else entry.make().to(device)
        state[key] = made[id(entry)]
    return state


def save_merged(cascade, folder: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write :func:`merged_state_dict`'s tensors to ``folder`` as safetensors files, making
    each merged weight when its bytes are written and dropping it after: at most one merged
    layer (and one slow-updated parameter) in memory beside the model.

    Files as Hugging Face's ``save_pretrained`` names them: ``model.safetensors`` when all
    fit in ``max_shard_bytes`` (an int ≥ 1), else ``model-00001-of-0000n.safetensors`` …
    (keys in the state dict's order, a new shard when the next tensor would pass the limit;
    a larger tensor alone) and ``model.safetensors.index.json``. Each tensor's bytes are
    those of ``merged_state_dict()`` (every alias of a tied weight written under each key,
    the merge made again for each). Files are staged aside and moved in together at the
    end (an error leaves the folder as it was); then the shards and index of an earlier
    save there that this one does not name are removed. Returns the folder.
    """
    max_shard_bytes = checks.check_int("max_shard_bytes", max_shard_bytes, 1)
    entries = {key: spec(entry) for key, entry in merged_entries(cascade, "save_merged").items()}
    shards, size = [], 0
    for key, entry in entries.items():
        if not shards or size + entry.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = entry
        size += entry.nbytes
    count = len(shards)
    names = [
        SAFE_WEIGHTS_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        for i in range(count)
    ]
    writers = {
        name: lambda staged, shard=shard: write_safetensors(staged, shard, {"format": "pt"})
        for name, shard in zip(names, shards, strict=True)
    }
    if count > 1:
        index = {
            "metadata": {"total_size": sum(entry.nbytes for entry in entries.values())},
            "weight_map": {
                key: name for name, shard in zip(names, shards, strict=True) for key in shard
            },
        }
        writers[SAFE_INDEX_NAME] = lambda staged: staged.write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
    folder = write_staged(folder, writers)
    for old in [SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, *folder.glob("model-*-of-*.safetensors")]:
        old = folder / old
        if old.name not in writers:
            old.unlink(missing_ok=True)
    return folder


def merged_entries(cascade, what: str) -> dict:
    """:func:`merged_state_dict`'s keys (for the call ``what``, after its checks), each the
    model's own tensor or a :class:`Pending` merge or slow update (one object for every
    key of a weight's aliases). The merges are :meth:`Cascade.boundary_requests` of the
    last boundary, as ``finalize()`` runs them."""
    model, prefix = plain_model(unwrap_data_parallel(cascade.model))
    if any(is_dtensor(p) for p in model.parameters()):
        raise ValueError(
            f"{what} does not gather FSDP2 shards: finalize() and "
            "save with torch.distributed.checkpoint instead"
        )
    cascade.check_mergeable(what)
    state = model.state_dict()
    linears = {}  # each driven layer's prefix → the state of the linear finalize makes
    merged = {}  # each driven weight → its merge
    rounding = cascade.settings.rounding
    for request in cascade.boundary_requests(last=True):
        layer, name = request.layer, request.name.removeprefix(prefix)
        key_prefix = f"{name}." if name else ""
        dtype = layer.weight.dtype if layer.weight_scale is None else layer.dequantize_dtype
        weight = Pending(
            tuple(layer.weight.shape),
            dtype,
            lambda args=(request, name, rounding): final_weight(*args),
        )
        if layer.weight_scale is None:  # finalize() merges in place: aliases share it
            merged[id(layer.weight)] = weight
        linears[key_prefix] = {key_prefix + "weight": weight}
        if layer.bias is not None:
            linears[key_prefix][key_prefix + "bias"] = layer.bias.detach().to(dtype)
    state = _with_linears(state, linears)
    names = {}
    for key, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(key)
    for parameter_id, weight in merged.items():
        for key in names.get(parameter_id, ()):
            if key in state:
                state[key] = weight
    slow = cascade.slow_update
    for parameter, anchor in zip(slow.params, slow.prepared_anchors(), strict=True):
        updated = Pending(
            tuple(anchor.shape),
            anchor.dtype,
            lambda a=anchor, p=parameter: a.lerp(p.detach(), slow.rate),
        )
        for key in names[id(parameter)]:
            state[key] = updated
    return state


def final_weight(request: MergeRequest, label: str, rounding: str) -> torch.Tensor:
    """The weight of ``request``'s layer (named ``label``) as ``finalize()`` would leave it
    now, in new memory: ``W − N_t + slow_rate·s·B A`` merged as ``request`` asks, an fp8
    weight dequantized to ``layer.dequantize_dtype``. Refuses (``ValueError`` naming the
    layer) an fp8 weight whose values would not fit that dtype, which ``finalize()`` would
    write as inf."""
    layer = request.layer
    weight = layer.weight.detach().clone()
    if layer.weight_scale is not None:
        weight = ScaledWeight(weight, layer.weight_scale.clone())
    return _merged(request, label, rounding, weight, layer.lora_B, layer.lora_A, 0)


def _merged(request, label, rounding, weight, lora_b, lora_a, row_offset) -> torch.Tensor:
    """``weight`` (a copy of the rows from ``row_offset`` of ``request``'s W) merged as
    ``request`` asks, dequantized (a ScaledWeight) and checked as :func:`final_weight` says."""
    layer = request.layer
    with checks.naming_layer(label):
        merge_lowrank_(
            weight,
            lora_b.detach(),
            lora_a.detach(),
            request.coeff,
            rounding=rounding,
            seed=request.seed,
            noise_remove=request.noise_remove,
            noise_add=request.noise_add,
            row_offset=row_offset,
            backend=layer.backend,
        )
    if not isinstance(weight, ScaledWeight):
        return weight
    values = weight.dequantize(layer.dequantize_dtype)
    if not bool(torch.isfinite(values).all()):
        dtype = str(layer.dequantize_dtype).removeprefix("torch.")
        raise ValueError(
            f"layer {checks.layer_label(label)}: its merged fp8 weight exceeds the range of "
            f"{dtype}, the dtype finalize() dequantizes it to (inf would be written); set "
            "layer.dequantize_dtype = torch.float32 (or torch.bfloat16) first; nothing was "
            "changed"
        )
    return values


def check_final_weights_fit(cascade) -> None:
    """Refuse, before ``finalize()`` writes anything, an fp8 layer whose finalized weight
    would not fit its ``dequantize_dtype`` (see :func:`final_weight`; a merge into a copy
    of its codes, one byte per element; under FSDP2 each rank its rows, and every rank
    raises when one refuses)."""
    fp8 = [
        request
        for request in cascade.boundary_requests(last=True)
        if request.layer.weight_scale is not None
    ]
    operands = [merge_operands(request.layer) for request in fp8]  # collectives, every rank
    failure = None
    for request, (weight, row_offset, lora_b, lora_a) in zip(fp8, operands, strict=True):
        if weight.shape[0] == 0:  # a rank holding no rows of this weight
            continue
        copy = ScaledWeight(weight.codes.clone(), weight.scale.clone())
        rounding = cascade.settings.rounding
        try:
            _merged(request, request.name, rounding, copy, lora_b, lora_a, row_offset)
        except ValueError as error:
            failure = error
            break
    raise_on_every_rank(failure, cascade.layers.values())


def export_peft_adapter(cascade, path: str | Path, max_rank: int | None = None) -> Path:
    """Write the merged updates as one PEFT LoRA adapter (:mod:`.peft_adapter` writes it).

    Holds every merge done so far, so after ``finalize()`` the whole run; the noise
    is not part of it. Needs ``keep_history=True``. ``max_rank=None``: the exact
    rank-``r·T`` adapter; ``max_rank=k``: each layer's sum truncated to rank ``k``
    (:func:`~lorasc_kernels.integrations.peft_adapter.compress_updates`), its relative Frobenius
    error logged at INFO per layer and kept in ``cascade.export_errors``.
    """
    from ..integrations.peft_adapter import compress_updates, write_peft_adapter

    if not cascade.settings.keep_history:
        raise RuntimeError("export_peft_adapter needs Cascade(..., keep_history=True)")
    if not all(isinstance(layer, LoRASCLinear) for layer in cascade.layers.values()):
        raise RuntimeError(
            "export_peft_adapter writes the updates of LoRASCLinear layers; "
            "a PEFT model's base weights hold every merge: finalize() and "
            "save the model"
        )
    if not any(cascade.history.values()):
        raise RuntimeError("nothing to export yet: no fast LoRA has been merged")
    updates, errors = cascade.history, {}
    if max_rank is not None:
        updates, errors = compress_updates(cascade.history, max_rank)
        for name, error in errors.items():
            logger.info(
                "PEFT export: layer %s truncated to rank %d, relative Frobenius error %.3g",
                checks.layer_label(name),
                max_rank,
                error,
            )
    config = getattr(unwrap_data_parallel(cascade.model), "config", None)
    base_name = getattr(config, "_name_or_path", None) or None  # Hugging Face models
    folder = write_peft_adapter(path, updates, base_name)
    cascade.export_errors = errors
    return folder


def _with_linears(state: dict, linears: dict[str, dict]) -> dict:
    """``state`` with every entry under a prefix of ``linears`` replaced by that prefix's
    entries, placed where the layer's first entry was (the order of the finalized model)."""
    prefixes = sorted(linears, key=len, reverse=True)
    merged, placed = {}, set()
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            merged[key] = value
        elif prefix not in placed:
            merged.update(linears[prefix])
            placed.add(prefix)
    return merged
