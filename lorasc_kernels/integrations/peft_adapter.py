"""Write a LoRASC run's merged updates as one standard PEFT LoRA adapter.

A run of T merges adds ``Σ_t c·B_t A_t`` to each weight (``c = slow_rate · s``). Stacked,
that is one LoRA of rank ``r·T``: ``A = [A_0; …; A_{T-1}]`` (rows), ``B = [c·B_0, …]``
(columns), with ``lora_alpha = r·T`` so PEFT's scaling is 1. The files follow PEFT's
conventions (``peft/utils/save_and_load.py``): ``adapter_model.safetensors`` keyed
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (no adapter name, PEFT
inserts it on load) and ``adapter_config.json`` of a ``LoraConfig``; so
``peft.PeftModel.from_pretrained(base_model, path)`` serves the run on an untouched base
model. Module names are anchored: ``target_modules`` is the regex ``^(?:name|…)$`` (PEFT
fullmatches a string against each module's full path, where a list entry would also match
every path ending in ``.name``), and layers of different ranks get anchored
``rank_pattern``/``alpha_pattern`` entries. PEFT adapts submodules only, so a model that
is itself one ``LoRASCLinear`` (module path ``""``) is refused: wrap it in a container.

In ``"inplace"`` noise mode the finalized weights differ from ``W₀ + ΣcBA`` by the
rounding of adding and removing the noise (one rounding in W's dtype per merge); the
adapter holds the updates only.

A rank-``r·T`` adapter grows with the run; :func:`compress_updates` replaces each module's
updates by the best rank-``k`` approximation of their sum (truncated SVD through
:mod:`~lorasc_kernels.cascade.lowrank`: QR of the stacked factors, SVD of the small core, no
N × K matrix formed) and gives its relative Frobenius error ``‖ΔW − ΔW_k‖ / ‖ΔW‖``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from .. import _checks as checks
from .._files import Pending, write_safetensors, write_staged
from ..cascade.lowrank import stacked, truncated

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "compress_updates", "write_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def write_peft_adapter(
    path: str | Path,
    updates: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``updates`` (module name → list of ``(c·B_t, A_t)``) as a PEFT LoRA adapter.

    Args:
        path: folder to create (or reuse); gets ``adapter_config.json`` and
            ``adapter_model.safetensors``.
        updates: per module, the merged updates in order; ``c·B_t`` (N, r), ``A_t`` (r, K).
        base_model_name_or_path: recorded in the config, as PEFT does.

    Returns the folder's path.
    """
    tensors, ranks = {}, {}
    for name, pairs in updates.items():
        (out_features, rank, in_features), (dtype_b, dtype_a) = _check_module_updates(name, pairs)
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = Pending(
            (rank, in_features), dtype_a, lambda pairs=pairs: torch.cat([a for _, a in pairs])
        )
        tensors[f"{prefix}.lora_B.weight"] = Pending(
            (out_features, rank), dtype_b, lambda pairs=pairs: torch.cat([b for b, _ in pairs], 1)
        )
        ranks[name] = rank
    rank = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", name): "^" anchors them.
    rank_pattern = {f"^{re.escape(n)}": k for n, k in ranks.items() if k != rank}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": "^(?:" + "|".join(re.escape(n) for n in updates) + ")$",
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    # Both files are written aside and moved in place at the end: a failed write (a full
    # disk) leaves no adapter half-written, nor half-replaced. One module's factors at a time
    # are in memory (read from the history's files when it keeps them on disk).
    return write_staged(
        path,
        {
            CONFIG_NAME: lambda staged: staged.write_text(json.dumps(config, indent=2) + "\n"),
            WEIGHTS_NAME: lambda staged: write_safetensors(staged, tensors, {"format": "pt"}),
        },
    )


def compress_updates(
    updates: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    max_rank: int,
) -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor]]], dict[str, float]]:
    """Each module's ``Σ_t c·B_t A_t`` as one pair of rank ``min(max_rank, r·T, N, K)``,
    and per module the relative Frobenius error of that approximation (0 when the rank is
    not cut); ``updates`` as :func:`write_peft_adapter` takes them."""
    max_rank = checks.check_int("max_rank", max_rank, 1)
    compressed, errors = {}, {}
    for name, pairs in updates.items():
        _check_module_updates(name, pairs)
        lora_b, lora_a, error = truncated(*stacked(pairs), max_rank)
        compressed[name], errors[name] = [(lora_b, lora_a)], error
    return compressed, errors


def _check_module_updates(name, pairs):
    """``pairs`` of one module: a non-empty list of ``(c·B_t (N, r_t), A_t (r_t, K))``;
    returns ``(N, Σ r_t, K)`` and the dtypes of the stacked B and A."""
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"updates has module name {name!r}: PEFT adapts named submodules only; for a "
            "model that is itself one LoRASCLinear, wrap it (nn.Sequential(layer)) before "
            "building the Cascade"
        )
    if not pairs:
        raise ValueError(f"updates[{name!r}] is empty: every module needs one update or more")
    shape, rank, dtypes = None, 0, None
    for t, pair in enumerate(pairs):
        lora_b, lora_a = pair
        if lora_b.dim() != 2 or lora_a.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
            raise ValueError(
                f"updates[{name!r}][{t}] must be (c·B (N, r), A (r, K)), got shapes "
                f"{tuple(lora_b.shape)} and {tuple(lora_a.shape)}"
            )
        if shape is not None and (lora_b.shape[0], lora_a.shape[1]) != shape:
            raise ValueError(
                f"updates[{name!r}][{t}] updates a {lora_b.shape[0]}×{lora_a.shape[1]} weight, "
                f"the earlier ones a {shape[0]}×{shape[1]} weight"
            )
        shape = (lora_b.shape[0], lora_a.shape[1])
        rank += lora_a.shape[0]
        pair_dtypes = (lora_b.dtype, lora_a.dtype)
        dtypes = (
            pair_dtypes if dtypes is None else tuple(map(torch.promote_types, dtypes, pair_dtypes))
        )
    return (shape[0], rank, shape[1]), dtypes
