"""A short demo: adapt a small frozen MLP to a shifted regression task with LoRASCLinear.

Runs in seconds on a CPU. Prints the loss before and after training.
"""

import torch
from torch import nn

from lorasc_kernels import LoRASCConfig, inject_lorasc


def main(steps: int = 200, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                          nn.Linear(64, 8))
    target = nn.Sequential(nn.Linear(32, 8))
    inputs = torch.randn(512, 32)
    with torch.no_grad():
        labels = model(inputs) + 0.5 * target(inputs)

    layers = inject_lorasc(model, LoRASCConfig(r=4, lora_alpha=8))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRASC layers: {len(layers)}, trainable parameters: {trainable}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = nn.MSELoss()
    with torch.no_grad():
        print(f"loss before: {loss_fn(model(inputs), labels).item():.4f}")
    for _ in range(steps):
        loss = loss_fn(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        print(f"loss after {steps} steps: {loss_fn(model(inputs), labels).item():.4f}")


if __name__ == "__main__":
    main()
