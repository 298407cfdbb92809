"""What a running Cascade writes out without ending the run: the finalized model's state
dict (:func:`merged_state_dict`) and the merged updates as one PEFT adapter
(:func:`export_peft_adapter`). ``Cascade.merged_state_dict`` and
``Cascade.export_peft_adapter`` call these; they read the Cascade's seeds and noise as its
boundary would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import _checks as checks
from .cascade_merges import merge_operands, raise_on_every_rank
from .distributed import is_dtensor, unwrap_data_parallel
from .functional import merge_lowrank_
from .integrations.peft import plain_model
from .modules import LoRASCLinear
from .scaled_weight import ScaledWeight

__all__ = ["merged_state_dict", "export_peft_adapter"]

logger = logging.getLogger("lorasc_kernels")


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
    holds at most one of them at a time.
    Under FSDP2 (sharded ``DTensor`` parameters) it is refused.
    """
    cascade._check_active("merged_state_dict")
    if device is not None:
        if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
            raise TypeError(
                f"device must be a torch.device, a str or an int, got {type(device).__name__}"
            )
        try:
            device = torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"device {device!r} is not a device: {error}") from None
    cascade._check_driven("merged_state_dict")
    model, prefix = plain_model(unwrap_data_parallel(cascade.model))
    if any(is_dtensor(p) for p in model.parameters()):
        raise ValueError(
            "merged_state_dict does not gather FSDP2 shards: finalize() and "
            "save with torch.distributed.checkpoint instead"
        )
    cascade._check_finite_lora()
    state = model.state_dict()
    linears = {}  # each driven layer's prefix → the state of the linear finalize makes
    merged = {}  # each driven weight → its merged value
    fresh = set()  # ids of the merged weights already on ``device``, new tensors
    for index, name, layer in cascade._indexed_layers():
        name = name.removeprefix(prefix)
        key_prefix = f"{name}." if name else ""
        weight = final_weight(cascade, index, name, layer)
        if device is not None:  # moved at once: one merged layer at a time where W lives
            weight = weight.to(device)
            fresh.add(id(weight))
        if layer.weight_scale is None:  # finalize() merges in place: aliases share it
            merged[id(layer.weight)] = weight
        linears[key_prefix] = {key_prefix + "weight": weight}
        if layer.bias is not None:
            linears[key_prefix][key_prefix + "bias"] = layer.bias.detach().to(weight.dtype)
    state = _with_linears(state, linears)
    names = {}
    for key, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(key)
    for parameter_id, weight in merged.items():
        for key in names.get(parameter_id, ()):
            if key in state:
                state[key] = weight
    anchors = cascade.slow_update.prepared_anchors()
    for parameter, anchor in zip(cascade.slow_update.params, anchors, strict=True):
        for key in names[id(parameter)]:
            state[key] = anchor.lerp(parameter.detach(), cascade.slow_update.rate)
    if device is not None:
        state = {
            key: value if id(value) in fresh else value.to(device, copy=True)
            for key, value in state.items()
        }
    return state


def final_weight(cascade, index: int, name: str, layer) -> torch.Tensor:
    """Layer ``index`` (named ``name``)'s weight as ``finalize()`` would leave it now, in new
    memory: ``W − N_t + slow_rate·s·B A`` by the boundary's merge, an fp8 weight dequantized
    to ``layer.dequantize_dtype``. Refuses (``ValueError`` naming the layer) an fp8 weight
    whose values would not fit that dtype, which ``finalize()`` would write as inf."""
    weight = layer.weight.detach().clone()
    if layer.weight_scale is not None:
        weight = ScaledWeight(weight, layer.weight_scale.clone())
    return _merged(cascade, index, name, layer, weight, layer.lora_B, layer.lora_A, 0)


def _merged(cascade, index, name, layer, weight, lora_b, lora_a, row_offset) -> torch.Tensor:
    """``weight`` (a copy of the rows from ``row_offset`` of layer ``index``'s W) merged as the
    last boundary merges them, dequantized (a ScaledWeight) and checked as :func:`final_weight`
    says."""
    mode = cascade.settings.applied_noise_mode
    with checks.naming_layer(name):
        merge_lowrank_(
            weight,
            lora_b.detach(),
            lora_a.detach(),
            cascade.settings.slow_rate * layer.scaling,
            rounding=cascade.settings.rounding,
            seed=cascade._rounding_seed(cascade.cascade_index + 1, index),
            noise_remove=cascade._noise(cascade.cascade_index, index)
            if mode == "inplace"
            else None,
            row_offset=row_offset,
            backend=layer.backend,
        )
    if not isinstance(weight, ScaledWeight):
        return weight
    values = weight.dequantize(layer.dequantize_dtype)
    if not bool(torch.isfinite(values).all()):
        dtype = str(layer.dequantize_dtype).removeprefix("torch.")
        raise ValueError(
            f"layer {checks.layer_label(name)}: its merged fp8 weight exceeds the range of "
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
    fp8 = [entry for entry in cascade._indexed_layers() if entry[2].weight_scale is not None]
    operands = [merge_operands(layer) for _, _, layer in fp8]  # collectives, on every rank
    failure = None
    for (index, name, layer), (weight, row_offset, lora_b, lora_a) in zip(
        fp8, operands, strict=True
    ):
        if weight.shape[0] == 0:  # a rank holding no rows of this weight
            continue
        copy = ScaledWeight(weight.codes.clone(), weight.scale.clone())
        try:
            _merged(cascade, index, name, layer, copy, lora_b, lora_a, row_offset)
        except ValueError as error:
            failure = error
            break
    raise_on_every_rank(failure, cascade.layers.values())


def export_peft_adapter(cascade, path: str | Path, max_rank: int | None = None) -> Path:
    """Write the merged updates as one PEFT LoRA adapter; see :mod:`.peft_export`.

    Holds every merge done so far, so after ``finalize()`` the whole run; the noise
    is not part of it. Needs ``keep_history=True``. ``max_rank=None``: the exact
    rank-``r·T`` adapter; ``max_rank=k``: each layer's sum truncated to rank ``k``
    (:func:`~lorasc_kernels.peft_export.compress_updates`), its relative Frobenius
    error logged at INFO per layer and kept in ``cascade.export_errors``.
    """
    from .peft_export import compress_updates, write_peft_adapter

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
