"""Data-parallel LoRASC fine-tuning with DistributedDataParallel (or FSDP2 with ``--fsdp``).

    torchrun --standalone --nproc-per-node 2 examples/torchrun_ddp.py [--fsdp]

Runs with gloo on the CPU, or with nccl when CUDA GPUs are there (one per rank). A small
MLP learns a teacher that differs from it by a low-rank change; every rank trains on its
own batches, DDP averages the fast-LoRA gradients, and the ``Cascade`` runs the same
boundary on every rank. After each boundary the example checks that the weights agree on
all ranks (:func:`~lorasc_kernels.distributed.assert_weights_equal_across_ranks`: bit for
bit under DDP; under FSDP2 each rank holds and merges its own rows, and the checksums are
those of the whole tensors) and rank 0 prints the loss; at the end it prints a summary.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from lorasc_kernels import Cascade, LoRASCConfig, inject_lorasc
from lorasc_kernels.distributed import assert_weights_equal_across_ranks, full_tensor

IN, HIDDEN, OUT = 32, 64, 8


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--steps-per-cascade", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard), not DDP")
    return parser.parse_args()


def mlp(device):
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT)).to(device)


def make_models(device):
    """A random MLP, and a teacher: the same MLP plus a rank-2 change of each weight."""
    model, teacher = mlp(device), mlp(device)
    teacher.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in (teacher[0], teacher[2]):
            out_features, in_features = layer.weight.shape
            change = torch.randn(out_features, 2, device=device) @ torch.randn(
                2, in_features, device=device
            )
            layer.weight.add_(change / in_features**0.5)
    return model, teacher.requires_grad_(False)


def main():
    args = parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # the same model and teacher on every rank
    model, teacher = make_models(device)
    layers = inject_lorasc(model, LoRASCConfig(r=4, lora_alpha=8))
    if args.fsdp:
        for layer in layers.values():
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        wrapped = DistributedDataParallel(
            model, device_ids=None if device.index is None else [device.index]
        )
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=args.lr)
    # After wrapping (DDP's broadcast of rank 0's weights would undo the first noise), on
    # the inner model: its layer names are the unwrapped model's.
    cascade = Cascade(model, optimizer, steps_per_cascade=args.steps_per_cascade, seed=args.seed)
    data = torch.Generator(device=device).manual_seed(args.seed + 1 + rank)  # own batches

    losses = []
    for step in range(args.steps):
        x = torch.randn(args.batch_size, IN, device=device, generator=data)
        loss = (wrapped(x) - teacher(x)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if cascade.step():
            checksums = assert_weights_equal_across_ranks(model)
            if rank == 0:
                print(
                    f"step {step + 1}: cascade {cascade.cascade_index} ended, loss "
                    f"{loss.item():.4f}, weights agree on {world} ranks "
                    f"({len(checksums)} tensors checked)",
                    flush=True,
                )
    boundaries = cascade.cascade_index
    finalized = cascade.finalize()  # plain nn.Linear layers again
    # Under FSDP2 they hold the shards: gather the whole state into an unsharded model.
    trained = mlp(device)
    trained.load_state_dict(
        {name: full_tensor(value) for name, value in finalized.state_dict().items()}
    )
    x = torch.randn(256, IN, device=device, generator=data)
    with torch.no_grad():
        final = float((trained(x) - teacher(x)).pow(2).mean())
    if rank == 0:
        print(
            f"done: {world} ranks ({backend}, {'FSDP2' if args.fsdp else 'DDP'}), "
            f"{args.steps} steps, {boundaries} boundaries, "
            f"loss {losses[0]:.4f} -> {final:.4f} after finalize",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
