"""Test set-up: run Triton kernels in the interpreter when there is no GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The GEMM dispatch's choices on disk (backends/triton/dispatch_store.py): none, so every
# test process measures afresh and leaves nothing in the user's cache folder.
os.environ.setdefault("LORASC_DISPATCH_DIR", "")

# The `backend` fixture: op tests run on every registered backend (tests/backend_params.py).
pytest_plugins = ["tests.backend_params"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
