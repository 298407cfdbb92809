"""One rank of the distributed cascade checks, run by tests/test_distributed.py.

Launched once per rank with the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) on the CPU with gloo. Every rank also keeps an unsharded,
single-process copy of the model as the reference; it runs two scenarios and saves what
it measured to ``<out_dir>/rank<RANK>.pt`` for the test to check:

* ``ddp``: LoRASC layers and a Cascade under DistributedDataParallel, each rank on half
  of the global batch, against the reference trained on the whole batch; the last bias is
  trained too and gets the Cascade's slow update.
* ``fsdp``: the same under FSDP2 (``fully_shard``); at each boundary the reference gets
  the FSDP run's fast LoRA and trained gain (gathered here, for checking only), so the
  merges and the slow update of the sharded gain must agree bit for bit.
* ``edge``: FSDP2 on a weight with fewer rows than ranks; a column-sharded DTensor.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

import lorasc_kernels.layer
from lorasc_kernels import Cascade, LoRASCConfig, LoRASCLinear, inject_lorasc
from lorasc_kernels.distributed import (
    assert_weights_equal_across_ranks,
    full_tensor,
    is_dtensor,
    local_row_block,
    weight_checksums,
)
from lorasc_kernels.inject import lorasc_layers

IN, HIDDEN, OUT = 13, 11, 5  # 11 and 5 rows shard unevenly over 2 ranks: 6 + 5, 3 + 2
GLOBAL_BATCH, STEPS, STEPS_PER_CASCADE = 8, 5, 2
# The paper's settings, not the defaults: noise and a partial merge exercise every part.
PAPER = {"slow_rate": 0.5, "noise_lambda": 0.15}


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def squared_error(model, x, target):
    return (model(x).float() - target).pow(2).mean()


def rel_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def lora_grad_errors(model, reference):
    """Largest relative error of the fast-LoRA gradients of ``model`` against ``reference``."""
    pairs = zip(lorasc_layers(model).values(), lorasc_layers(reference).values(), strict=True)
    return max(
        rel_error(full_tensor(getattr(layer, name).grad), getattr(ref, name).grad)
        for layer, ref in pairs
        for name in ("lora_A", "lora_B")
    )


def slow_update_exact(before, fast, after, slow_rate=0.5):
    """Whether ``after == lerp(before, fast, slow_rate)`` bit for bit (full tensors)."""
    return torch.equal(after, torch.lerp(before, fast, slow_rate))


def global_batches(seed):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(GLOBAL_BATCH, IN, generator=generator),
            torch.randn(GLOBAL_BATCH, OUT, generator=generator),
        )
        for _ in range(STEPS)
    ]


def ddp_scenario(rank, world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    inject_lorasc(model, LoRASCConfig(r=3, lora_alpha=6))
    model[2].bias.requires_grad_(True)  # trained next to the fast LoRAs: slow-updated
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(trainable(ddp), lr=1e-2)
    ref_optimizer = torch.optim.Adam(trainable(reference), lr=1e-2)
    cascade = Cascade(ddp, optimizer, steps_per_cascade=STEPS_PER_CASCADE, seed=7, **PAPER)
    ref_cascade = Cascade(
        reference, ref_optimizer, steps_per_cascade=STEPS_PER_CASCADE, seed=7, **PAPER
    )
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    grad_errors, boundary_checksums, slow_updates = [], [], []
    bias_start = model[2].bias.detach().clone()
    for x, target in global_batches(seed=1):
        squared_error(ddp, x[local], target[local]).backward()
        squared_error(reference, x, target).backward()
        grad_errors.append(lora_grad_errors(model, reference))
        for opt in (optimizer, ref_optimizer):
            opt.step()
            opt.zero_grad()
        ref_cascade.step()
        bias_fast = model[2].bias.detach().clone()
        if cascade.step():
            boundary_checksums.append(assert_weights_equal_across_ranks(ddp))
            slow_updates.append(slow_update_exact(bias_start, bias_fast, model[2].bias))
            bias_start = model[2].bias.detach().clone()
    assert cascade.cascade_index == ref_cascade.cascade_index == STEPS // STEPS_PER_CASCADE
    mismatch = ""
    with torch.no_grad():  # one rank's W off by one ulp: the helper must notice
        if rank == 1:
            model[2].weight[0, 0] = torch.nextafter(model[2].weight[0, 0], torch.tensor(1.0))
    try:
        assert_weights_equal_across_ranks(ddp)
    except AssertionError as error:
        mismatch = str(error)
    return {
        "grad_errors": grad_errors,
        "boundary_checksums": boundary_checksums,
        "weight_errors": [
            rel_error(m.weight, r.weight)
            for m, r in zip(
                lorasc_layers(model).values(), lorasc_layers(reference).values(), strict=True
            )
        ],
        "bias_error": rel_error(model[2].bias, reference[2].bias),
        "slow_updates": slow_updates,
        "mismatch_message": mismatch,
    }


class KernelInputs:
    """Records what LoRASCLinear.forward hands ``lorasc_linear`` (the kernels' entry)."""

    def __init__(self):
        self.seen = []
        self.original = lorasc_kernels.layer.lorasc_linear

    def __enter__(self):
        def recorded(x, weight, bias, lora_A, lora_B, *args, **kwargs):
            self.seen.append(
                {
                    name: (is_dtensor(t), tuple(t.shape))
                    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B))
                }
            )
            return self.original(x, weight, bias, lora_A, lora_B, *args, **kwargs)

        lorasc_kernels.layer.lorasc_linear = recorded
        return self

    def __exit__(self, *exc):
        lorasc_kernels.layer.lorasc_linear = self.original


class GatherLog:
    """Records the global shape of every DTensor gathered (``full_tensor``/``redistribute``)."""

    def __init__(self):
        self.shapes = []
        self.originals = {name: getattr(DTensor, name) for name in ("full_tensor", "redistribute")}

    def __enter__(self):
        for name, original in self.originals.items():

            def logged(tensor, *args, _original=original, **kwargs):
                self.shapes.append(tuple(tensor.shape))
                return _original(tensor, *args, **kwargs)

            setattr(DTensor, name, logged)
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(DTensor, name, original)


class Gain(nn.Module):
    """``x · g`` with a trained float32 vector ``g``: a parameter beside the fast LoRAs (FSDP2
    wants one dtype among a group's trained parameters, so it is not the bf16 bias)."""

    def __init__(self, features):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x):
        return x.float() * self.weight


def full_state(model):
    """Every parameter of ``model`` in full (gathered: for checking only)."""
    return {name: full_tensor(p.detach()).clone() for name, p in model.named_parameters()}


def fsdp_scenario(rank, world):
    torch.manual_seed(0)
    kwargs = {"dtype": torch.bfloat16, "lora_dtype": torch.float32}
    model = nn.Sequential(
        LoRASCLinear(IN, HIDDEN, r=3, lora_alpha=6, **kwargs),
        nn.Tanh(),
        LoRASCLinear(HIDDEN, OUT, r=2, lora_alpha=4, **kwargs),
        Gain(OUT),
    )  # 5 rows sharded 3 + 2, slow-updated shard-wise
    reference = copy.deepcopy(model)
    for layer in lorasc_layers(model).values():
        fully_shard(layer)
    fully_shard(model)
    kernel_inputs = KernelInputs()
    optimizer = torch.optim.Adam(trainable(model), lr=1e-2)
    ref_optimizer = torch.optim.Adam(trainable(reference), lr=1e-2)
    settings = {"steps_per_cascade": STEPS_PER_CASCADE, "seed": 3, "keep_history": True, **PAPER}
    cascade = Cascade(model, optimizer, **settings)
    ref_cascade = Cascade(reference, ref_optimizer, **settings)
    states = [(full_state(model), full_state(reference))]  # after the first noise
    gathered, grad_errors, checksums, slow_updates = [], [], [], []
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    gain_start = full_tensor(model[3].weight.detach()).clone()
    for x, target in global_batches(seed=2):
        x = x.to(torch.bfloat16)
        with kernel_inputs:
            loss = squared_error(model, x[local], target[local])
        loss.backward()
        squared_error(reference, x, target).backward()
        grad_errors.append(lora_grad_errors(model, reference))
        for opt in (optimizer, ref_optimizer):
            opt.step()
            opt.zero_grad()
        gain_fast = full_tensor(model[3].weight.detach()).clone()
        if cascade.steps_in_cascade + 1 == STEPS_PER_CASCADE:
            # The boundary must agree for the same fast LoRA and gain: hand the reference
            # this run's.
            with torch.no_grad():
                for name, value in full_state(model).items():
                    if reference.get_parameter(name).requires_grad:
                        reference.get_parameter(name).copy_(value)
        with GatherLog() as log:
            ran = cascade.step()
        assert ran == ref_cascade.step()
        if ran:
            gathered.append(log.shapes)
            gain_after = full_tensor(model[3].weight.detach())
            slow_updates.append(slow_update_exact(gain_start, gain_fast, gain_after))
            gain_start = gain_after.clone()
            states.append((full_state(model), full_state(reference)))
            checksums.append(
                (
                    weight_checksums(model),
                    weight_checksums(reference),
                    assert_weights_equal_across_ranks(model),
                )
            )
    return {
        "states": states,
        "checksums": checksums,
        "noise_scales": (cascade.noise_scales, ref_cascade.noise_scales),
        "history_equal": all(
            torch.equal(a, b)
            for name in cascade.history
            for pair, ref_pair in zip(cascade.history[name], ref_cascade.history[name], strict=True)
            for a, b in zip(pair, ref_pair, strict=True)
        ),
        "kernel_inputs": kernel_inputs.seen,
        "local_weight_shapes": [
            tuple(layer.weight.to_local().shape) for layer in lorasc_layers(model).values()
        ],
        "gathered_shapes": gathered,
        "weight_shapes": [tuple(layer.weight.shape) for layer in lorasc_layers(model).values()],
        "grad_errors": grad_errors,
        "slow_updates": slow_updates,
        "local_anchor_shapes": [tuple(anchor.shape) for anchor in cascade.slow_update.anchors],
        "resumed_anchors_equal": anchors_reload(cascade),
    }


def anchors_reload(cascade):
    """Whether the anchors (each rank's own rows) come back from the Cascade's state dict."""
    saved = cascade.state_dict()
    expected = [anchor.clone() for anchor in cascade.slow_update.anchors]
    for anchor in cascade.slow_update.anchors:
        anchor.zero_()
    cascade.load_state_dict(saved)
    anchors = cascade.slow_update.anchors
    return all(torch.equal(a, b) for a, b in zip(anchors, expected, strict=True))


def edge_scenario():
    """FSDP2 on a one-row weight (the second rank holds none of its rows, nor of A), and
    a DTensor sharded by columns, which has no row block."""
    torch.manual_seed(0)
    layer = LoRASCLinear(IN, 1, r=1, lora_alpha=2)
    reference = copy.deepcopy(layer)
    fully_shard(layer)
    optimizer = torch.optim.SGD(trainable(layer), lr=0.5)
    cascade = Cascade(layer, optimizer, steps_per_cascade=1, seed=5, **PAPER)
    ref_cascade = Cascade(
        reference,
        torch.optim.SGD(trainable(reference), lr=0.5),
        steps_per_cascade=1,
        seed=5,
        **PAPER,
    )
    layer(torch.randn(4, IN)).pow(2).mean().backward()
    optimizer.step()
    with torch.no_grad():
        for name, value in full_state(layer).items():
            if "lora" in name:
                reference.get_parameter(name).copy_(value)
    assert cascade.step() and ref_cascade.step()
    column_shard_error = ""
    try:
        local_row_block(distribute_tensor(torch.randn(4, 6), layer.weight.device_mesh, [Shard(1)]))
    except ValueError as error:
        column_shard_error = str(error)
    return {
        "local_rows": layer.weight.to_local().shape[0],
        "states": (full_state(layer), full_state(reference)),
        "column_shard_error": column_shard_error,
    }


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        results = {
            "ddp": ddp_scenario(rank, world),
            "fsdp": fsdp_scenario(rank, world),
            "edge": edge_scenario(),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
