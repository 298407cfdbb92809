"""Every registered backend, and every scaled weight format, as a test parameter, so each
op's tests run on each backend (and the fp8 tests on each format).

tests/conftest.py loads this module as a plugin; a test that takes a ``backend`` argument
runs once per registered backend, with the backend's name, and one that takes
``scaled_dtype`` once per format of ``dtypes.SCALED_WEIGHT_DTYPES``.
Without a GPU, Triton runs in its interpreter (``TRITON_INTERPRET=1``, tests/conftest.py)
and CUDA through the host build of its kernels' data paths (``csrc/host_check.cpp``):
:class:`HostOps` stands in for ``torch.ops.lorasc_cuda`` on CPU tensors, so the CUDA
backend's Python code and its kernels' loads, transforms, tiles and merges run here.
"""

from __future__ import annotations

import functools

import pytest
import torch

from lorasc_kernels import _build
from lorasc_kernels.backends import BACKENDS, cuda, resolve_backend_name
from lorasc_kernels.formats.registry import SCALED_WEIGHT_DTYPES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REGISTERED = tuple(name for name in BACKENDS if name != "auto")


@functools.cache
def host_build():
    """The g++ build of csrc/host_check.cpp (cached by ninja across runs)."""
    return _build.load_host_check()


class HostOps:
    """``torch.ops.lorasc_cuda`` on CPU tensors: each op runs the kernel's data path of the
    host build, CTA after CTA (element functions, loads, tiles, schedule, stores)."""

    def __init__(self, host):
        self.host = host

    def lowrank_gemm(self, *args):
        return self.host.emulate_lowrank_gemm(*args)

    def dropout(self, x, key, threshold, inv_keep):
        return self.host.transform(x, cuda.TRANSFORM_DROPOUT, key, threshold, inv_keep)

    def merge_lowrank_(self, *args):
        self.host.merge_lowrank_(*args)


def emulate_cuda_on_host(monkeypatch):
    """Make the CUDA backend run on CPU tensors through :class:`HostOps`."""
    ops = HostOps(host_build())
    monkeypatch.setattr(cuda, "extension_ops", lambda device=None: ops)
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device: None)


@pytest.fixture(params=REGISTERED)
def backend(request, monkeypatch) -> str:
    """The name of a registered backend that can run on :data:`DEVICE` (others skip)."""
    name = request.param
    if name == "cuda" and DEVICE == "cpu":
        emulate_cuda_on_host(monkeypatch)
    try:
        return resolve_backend_name(name, torch.device(DEVICE))
    except RuntimeError as error:
        pytest.skip(str(error))


@pytest.fixture(
    params=tuple(SCALED_WEIGHT_DTYPES), ids=[entry.name for entry in SCALED_WEIGHT_DTYPES.values()]
)
def scaled_dtype(request) -> torch.dtype:
    """The storage dtype of a scaled weight format of the registry."""
    return request.param
