"""One rank of the FSDP2 checks on fp8 layers, run by tests/test_distributed.py.

Launched as ``cascade_worker.py`` is. Two ``LoRASCLinear`` layers with fp8 e4m3 weights
(11 and 5 rows, sharded 6 + 5 and 3 + 2) under FSDP2, and an unsharded copy as the
reference. Before each merge (two boundaries, then ``finalize()``) the fast ``B`` is made
``LARGE`` times larger, so that the merges rescale rows held by both ranks, and the
reference is handed the same fast LoRA. Two scenarios: the default settings, and the
paper's (noise written into ``W``, ``slow_rate=0.5``), and the default settings with the
layers in the fp8 compute mode (``compute="fp8"``). After each merge every rank records
its output on a fixed probe, its ``weight_scale`` buffers and the gathered parameters, and
the reference's. ``edge``: a one-row fp8 weight, whose rows rank 1 does not hold, rescaled
by a boundary. Each rank saves to ``<out_dir>/rank<RANK>.pt`` for the test to compare.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from cascade_worker import (
    GLOBAL_BATCH,
    HIDDEN,
    IN,
    OUT,
    PAPER,
    STEPS_PER_CASCADE,
    global_batches,
    squared_error,
    trainable,
)
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lorasc_kernels import Cascade, LoRASCLinear
from lorasc_kernels.distributed import is_dtensor
from lorasc_kernels.inject import lorasc_layers

LARGE = 100.0  # the fast B's factor before a merge: updates several times W's largest entry


def gathered(tensor):
    """The whole of ``tensor`` (for checking only); fp8 shards travel as bytes, which gloo
    sends (FSDP2's own all-gather does the same)."""
    if not is_dtensor(tensor):
        return tensor.clone()
    if tensor.element_size() != 1:
        return tensor.full_tensor()
    local = tensor.to_local().view(torch.uint8)
    as_bytes = DTensor.from_local(
        local,
        tensor.device_mesh,
        tensor.placements,
        run_check=False,
        shape=tensor.shape,
        stride=tensor.stride(),
    )
    return as_bytes.full_tensor().view(tensor.dtype)


def full_state(model):
    """Every parameter of ``model`` in full."""
    return {name: gathered(p.detach()) for name, p in model.named_parameters()}


def scales(model):
    """Every ``weight_scale`` buffer of ``model`` (this rank's copy), by layer name."""
    return {name: layer.weight_scale.clone() for name, layer in lorasc_layers(model).items()}


def snapshot(model, reference, probe):
    """This rank's view of ``model`` and the reference's after a merge."""
    with torch.no_grad():
        return {
            "output": model(probe),
            "scales": scales(model),
            "state": full_state(model),
            "ref_output": reference(probe),
            "ref_scales": scales(reference),
            "ref_state": full_state(reference),
        }


def enlarge_and_hand_over(model, reference):
    """``B ← LARGE · B`` on this rank's rows; the reference gets the whole fast LoRA."""
    with torch.no_grad():
        for layer in lorasc_layers(model).values():
            layer.lora_B.to_local().mul_(LARGE)
        for name, value in full_state(model).items():
            if reference.get_parameter(name).requires_grad:
                reference.get_parameter(name).copy_(value)


def fp8_scenario(rank, world, settings, compute=None):
    torch.manual_seed(0)
    model = nn.Sequential(
        LoRASCLinear(IN, HIDDEN, r=3, lora_alpha=6, weight_format="fp8_e4m3", compute=compute),
        nn.Tanh(),
        LoRASCLinear(HIDDEN, OUT, r=2, lora_alpha=4, weight_format="fp8_e4m3", compute=compute),
    )
    reference = copy.deepcopy(model)
    for layer in lorasc_layers(model).values():
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.Adam(trainable(model), lr=1e-2)
    settings = {"steps_per_cascade": STEPS_PER_CASCADE, "seed": 3, **settings}
    cascade = Cascade(model, optimizer, **settings)
    ref_cascade = Cascade(reference, torch.optim.Adam(trainable(reference)), **settings)
    probe = torch.randn(6, IN, generator=torch.Generator().manual_seed(9))
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    initial_scales = scales(reference)
    boundaries = []
    for x, target in global_batches(seed=4):
        squared_error(model, x[local], target[local]).backward()
        optimizer.step()
        optimizer.zero_grad()
        if cascade.steps_in_cascade + 1 == STEPS_PER_CASCADE:
            enlarge_and_hand_over(model, reference)
        ran = cascade.step()
        assert ran == ref_cascade.step()
        if ran:
            boundaries.append(snapshot(model, reference, probe))
    enlarge_and_hand_over(model, reference)
    served, ref_served = cascade.finalize(), ref_cascade.finalize()
    final = full_state(served)  # the finalized weights are still shards: gathered here
    model_of_final = copy.deepcopy(ref_served)
    model_of_final.load_state_dict(final)
    with torch.no_grad():
        final_outputs = (model_of_final(probe), ref_served(probe))
    weights = [served[0].weight, served[2].weight]
    return {
        "compute": compute,
        "initial_scales": initial_scales,
        "boundaries": boundaries,
        "noise_scales": (cascade.noise_scales, ref_cascade.noise_scales),
        "final": {
            "state": final,
            "ref_state": full_state(ref_served),
            "output": final_outputs[0],
            "ref_output": final_outputs[1],
            "weights": [
                (type(w.data).__name__, str(w.placements), tuple(w.to_local().shape), w.dtype)
                for w in weights
            ],
        },
    }


def edge_scenario():
    """One boundary on a one-row fp8 weight: rank 0 merges and rescales the row, every rank
    must hold its new scale; then finalize()."""
    torch.manual_seed(0)
    layer = LoRASCLinear(IN, 1, r=1, lora_alpha=2, weight_format="fp8_e4m3")
    reference = copy.deepcopy(layer)
    fully_shard(layer)
    optimizer = torch.optim.SGD(trainable(layer), lr=0.5)
    settings = {"steps_per_cascade": 1, "seed": 5, **PAPER}
    cascade = Cascade(layer, optimizer, **settings)
    ref_cascade = Cascade(reference, torch.optim.SGD(trainable(reference)), **settings)
    layer(torch.randn(4, IN)).pow(2).mean().backward()
    optimizer.step()
    enlarge_and_hand_over(layer, reference)
    before = layer.weight_scale.clone()
    assert cascade.step() and ref_cascade.step()
    return {
        "local_rows": layer.weight.to_local().shape[0],
        "scales": (before, layer.weight_scale.clone(), reference.weight_scale.clone()),
        "final": (gathered(cascade.finalize().weight), ref_cascade.finalize().weight),
    }


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        results = {
            "default": fp8_scenario(rank, world, {}),
            "paper": fp8_scenario(rank, world, PAPER),
            "compute": fp8_scenario(rank, world, {}, compute="fp8"),
            "edge": edge_scenario(),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
