"""The host side of a Triton launch: the scalars of a fused GEMM launch from one cached
lookup (:func:`~lorasc_kernels.backends.triton.configs.gemm_scalars`), and the device
switch of :func:`~lorasc_kernels.backends.triton.on_tensor_device`, left out where no
switch can be needed."""

import contextlib
import math
import struct

import pytest
import torch

pytest.importorskip("triton")

from lorasc_kernels.backends import triton as triton_backend  # noqa: E402
from lorasc_kernels.backends.triton import configs  # noqa: E402
from lorasc_kernels.formats.registry import float32_scalar  # noqa: E402


def _bits(value: float) -> bytes:
    return struct.pack("f", value)


def _expected(m, r, scale, dtype):
    return (
        configs.m_bucket(m),
        float32_scalar(scale),
        configs.rank_block(r),
        configs.dot_precision(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemm_scalars_are_the_four_helpers_values(dtype, monkeypatch):
    monkeypatch.setattr(configs, "_GEMM_SCALARS", {})
    for m, r, scale in [
        (1, 1, 0.5),
        (16, 16, 2.0),
        (17, 5, 1 / 3),
        (4096, 64, 1e-30),
        (3, 65, 1e39),
    ]:
        for _ in range(2):  # found, then kept
            got = configs.gemm_scalars(m, r, scale, dtype)
            assert got[0] == _expected(m, r, scale, dtype)[0]
            assert _bits(got[1]) == _bits(float32_scalar(scale))
            assert got[2:] == _expected(m, r, scale, dtype)[2:]


def test_gemm_scalars_follow_the_matmul_precision_and_the_sign_of_zero(monkeypatch):
    """The dot precision is read at each call (torch's setting may change between calls);
    a -0.0 scale after a 0.0 one keeps its sign bit; NaN scales stay NaN."""
    monkeypatch.setattr(configs, "_GEMM_SCALARS", {})
    before = torch.get_float32_matmul_precision()
    try:
        assert configs.gemm_scalars(8, 4, 0.5, torch.float32)[3] == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert configs.gemm_scalars(8, 4, 0.5, torch.float32)[3] == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert _bits(configs.gemm_scalars(8, 4, 0.0, torch.bfloat16)[1]) == _bits(0.0)
    assert _bits(configs.gemm_scalars(8, 4, -0.0, torch.bfloat16)[1]) == _bits(-0.0)
    assert math.isnan(configs.gemm_scalars(8, 4, math.nan, torch.bfloat16)[1])


def test_gemm_scalars_keep_a_bounded_number_of_calls(monkeypatch):
    monkeypatch.setattr(configs, "_GEMM_SCALARS", {})
    monkeypatch.setattr(configs, "_GEMM_SCALARS_MAX", 3)
    for m in range(1, 11):
        assert configs.gemm_scalars(m, 4, 0.5, torch.float16)[0] == configs.m_bucket(m)
        assert len(configs._GEMM_SCALARS) <= 3


class _OnCuda:
    """Stands in for a tensor on ``cuda:index`` (this machine may have no GPU)."""

    def __init__(self, index: int):
        self.device = torch.device("cuda", index)


def test_with_at_most_one_gpu_the_launcher_is_not_wrapped(monkeypatch):
    def launcher(tensor, value):
        return value

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert triton_backend.on_tensor_device(launcher) is launcher


def test_with_two_gpus_a_launch_runs_on_its_tensors_gpu(monkeypatch):
    """The wrapper makes the first argument's GPU current around the launch, and only when
    it is not the current one already."""
    switched = []

    @contextlib.contextmanager
    def device(target):
        switched.append(target)
        yield

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    run = triton_backend.on_tensor_device(lambda tensor, value: (value, list(switched)))
    assert run(_OnCuda(0), 7) == (7, [])
    assert run(_OnCuda(1), 8) == (8, [torch.device("cuda", 1)])
    assert run(torch.zeros(1), 9)[0] == 9 and len(switched) == 1
