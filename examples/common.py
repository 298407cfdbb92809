"""Helpers shared by the examples: device choice, parameter counts, step timing, memory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements that get gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Wall-clock time of training steps; the first ``warmup`` steps are not counted."""

    def __init__(self, device: torch.device, warmup: int = 1):
        self.device = device
        self.warmup = warmup
        self.seconds: list[float] = []
        self._seen = 0

    @contextmanager
    def step(self) -> Iterator[None]:
        synchronize(self.device)
        started = time.perf_counter()
        yield
        synchronize(self.device)
        self._seen += 1
        if self._seen > self.warmup:
            self.seconds.append(time.perf_counter() - started)

    def ms_per_step(self) -> float:
        """Mean milliseconds per counted step (NaN before any)."""
        return 1e3 * sum(self.seconds) / len(self.seconds) if self.seconds else float("nan")


def _tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class MemoryMeter:
    """Peak memory of a training run, in bytes.

    On CUDA: ``torch.cuda.max_memory_allocated`` from the meter's creation on (everything
    the run allocates: weights, activations, gradients, optimizer state, merges).
    On the CPU torch keeps no allocator statistics, so the meter counts one training step's
    state tensor by tensor: parameters + gradients + optimizer state + the activations
    autograd saves for backward (distinct storages, parameters not counted twice).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.saved_bytes = 0
        self.state_bytes = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @property
    def what(self) -> str:
        """What :meth:`peak_bytes` measures, for table headers."""
        if self.device.type == "cuda":
            return "CUDA peak allocated"
        return "params+grads+optimizer state+saved activations"

    @contextmanager
    def saved_activations(self, model: nn.Module) -> Iterator[None]:
        """Count the activations saved for backward inside the block (CPU only)."""
        if self.device.type == "cuda":
            yield
            return
        parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameter_storages:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
        self.saved_bytes = max(self.saved_bytes, sum(saved.values()))

    def count_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Count parameters, gradients and optimizer state; call right after a step."""
        parameters = list(model.parameters())
        gradients = [p.grad for p in parameters if p.grad is not None]
        optimizer_state = [
            value
            for state in optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        ]
        state = (
            _tensor_bytes(parameters) + _tensor_bytes(gradients) + _tensor_bytes(optimizer_state)
        )
        self.state_bytes = max(self.state_bytes, state)

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self.saved_bytes + self.state_bytes
