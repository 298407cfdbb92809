"""The CUDA extension compiles and loads without a GPU, registers its ops, and checks its
arguments; setup.py's extension hook honours its switches. The compile (a few minutes on
two cores, cached by ninja in LORASC_BUILD_DIR) happens here, not in ``pip install``."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from lorasc_kernels import _build

ROOT = Path(__file__).resolve().parent.parent
OPS = ("lowrank_gemm", "dropout", "merge_lowrank_")

needs_toolchain = pytest.mark.skipif(
    _build.missing_toolchain() is not None,
    reason=f"cannot build the CUDA extension: {_build.missing_toolchain()}",
)


@pytest.fixture(scope="module")
def extension():
    from lorasc_kernels.backends import cuda

    module = _build.load_extension()
    cuda.ops()  # registers the fake kernels
    return module


@needs_toolchain
def test_every_op_is_bound_and_registered(extension):
    for name in OPS:
        assert callable(getattr(extension, name))
        schema = getattr(torch.ops.lorasc_cuda, name).default._schema
        assert schema.name == f"lorasc_cuda::{name}"
    merge = torch.ops.lorasc_cuda.merge_lowrank_.default._schema
    weight = merge.arguments[0]
    assert weight.name == "weight" and weight.alias_info.is_write
    assert not any(arg.alias_info for arg in merge.arguments[1:])
    assert merge.returns == []


@needs_toolchain
def test_fake_kernels_give_shapes(extension):
    p, q = torch.empty(37, 91, device="meta"), torch.empty(53, 91, device="meta")
    u, v = torch.empty(37, 5, device="meta"), torch.empty(53, 5, device="meta")
    out = torch.ops.lorasc_cuda.lowrank_gemm(p, q, None, u, v, 2.0, 0, 0, 0, 0.0, False,
                                             1, 7, 0, 0.1, True)
    assert out.shape == (37, 53) and out.device.type == "meta"
    x = torch.empty(37, 91, device="meta").t()
    assert torch.ops.lorasc_cuda.dropout(x, 7, 100, 1.5).is_contiguous()


@needs_toolchain
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e, t: e.lowrank_gemm(t(4, 8), t(3, 8), None, None, None, 1.0,
                                     0, 0, 0, 0.0, False, 0, 0, 0, 0.0, False),
         "p must be a CUDA tensor"),
        (lambda e, t: e.dropout(t(4, 8), 1, 2, 1.0), "x must be a CUDA tensor"),
        (lambda e, t: e.merge_lowrank_(t(4, 8), t(4, 2), t(2, 8), 1.0, True, 1, -1, 0.0, -1,
                                       0.0, 0),
         "weight must be a CUDA tensor"),
    ],
)
def test_ops_name_the_bad_argument(extension, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(extension, torch.randn)


def load_setup_py():
    spec = importlib.util.spec_from_file_location("lorasc_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


@needs_toolchain
def test_setup_builds_the_extension_with_a_cuda_toolchain(monkeypatch):
    monkeypatch.delenv("LORASC_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    extensions, cmdclass = load_setup_py().cuda_extensions()
    assert [e.name for e in extensions] == ["lorasc_kernels._C"]
    assert sorted(extensions[0].sources) == sorted(_build.extension_kwargs()["sources"])
    assert all((ROOT / source).is_file() for source in extensions[0].sources)
    assert "build_ext" in cmdclass
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == _build.DEFAULT_ARCH_LIST


def test_setup_switches(monkeypatch):
    setup_py = load_setup_py()
    monkeypatch.setenv("LORASC_SKIP_CUDA_BUILD", "1")
    assert setup_py.cuda_extensions() == ([], {})
    monkeypatch.delenv("LORASC_SKIP_CUDA_BUILD")
    monkeypatch.setattr(torch.version, "cuda", None)  # as with a CPU-only torch
    assert setup_py.cuda_extensions() == ([], {})
    monkeypatch.setenv("LORASC_FORCE_CUDA_BUILD", "1")
    with pytest.raises(RuntimeError, match="LORASC_FORCE_CUDA_BUILD=1 but torch is a CPU-only"):
        setup_py.cuda_extensions()


def test_cuda_backend_is_unavailable_for_cpu_tensors():
    from lorasc_kernels.backends import cuda

    assert "needs CUDA tensors" in cuda.unavailable_reason(torch.device("cpu"))
