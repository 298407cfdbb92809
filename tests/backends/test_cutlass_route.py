"""The CUTLASS sm90 route of the CUDA backend's ``lowrank_gemm`` on the CPU: which kernel
runs for which dtype, layout, alignment and device (``csrc/lorasc/cutlass_problem.h``, the
host build of the exact C++ the launch runs), the fallbacks by name, and the problem the
CUTLASS kernel is given (source term, pointers, strides) computed through its own
marshalling against float64. The kernels themselves run in tests/backends/test_cuda_gpu.py."""

from pathlib import Path

import pytest
import torch

from lorasc_kernels import _build
from tests.backend_params import host_build
from tests.helpers import TOLERANCE, rel_error

WMMA, CUTLASS_K_MAJOR, CUTLASS_N_MAJOR = 0, 1, 2
HOPPER = dict(major=9, minor=0, cutlass_built=True, sm90a_code=True, force_wmma=False)
NOISE, DROPOUT = 1, 2


@pytest.fixture(scope="module")
def host():
    return host_build()


def route(host, p, q, p_kind=0, q_kind=0, **target) -> tuple[int, str]:
    t = {**HOPPER, **target}
    return host.gemm_route(
        p, q, p_kind, q_kind, t["major"], t["minor"], t["cutlass_built"], t["sm90a_code"],
        t["force_wmma"],
    )  # fmt: skip


def operands(M, K, N, dtype=torch.bfloat16):
    """p (M, K) and q (N, K), both contiguous."""
    return torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_and_dx_layouts_take_cutlass(host, dtype):
    p, q = operands(37, 96, 56, dtype)
    assert route(host, p, q) == (CUTLASS_K_MAJOR, "cutlass")
    weight = torch.randn(40, 96, dtype=dtype)  # dX: q = Wᵀ (96, 40), a view with strides (1, 96)
    assert route(host, torch.randn(37, 40, dtype=dtype), weight.t()) == (CUTLASS_N_MAJOR, "cutlass")


def test_each_fallback_has_its_name(host):
    p, q = operands(37, 96, 56)
    assert route(host, p, q, force_wmma=True) == (WMMA, "forced_wmma")
    assert route(host, p, q, cutlass_built=False) == (WMMA, "not_built")
    assert route(host, p.float(), q.float()) == (WMMA, "dtype")
    assert route(host, p, q, q_kind=NOISE) == (WMMA, "transform")
    assert route(host, p, q, p_kind=DROPOUT) == (WMMA, "transform")
    assert route(host, *operands(37, 100, 56)) == (WMMA, "p_layout")  # K % 8
    assert route(host, p[:, 1:89], q[:, :88]) == (WMMA, "p_layout")  # p's address: 2 bytes off
    assert route(host, p.t().contiguous().t(), q) == (WMMA, "p_layout")  # p column-major
    assert route(host, p, torch.randn(56, 192, dtype=p.dtype)[:, ::2]) == (WMMA, "q_layout")
    assert route(host, p, torch.randn(100, 96, dtype=p.dtype)) == (WMMA, "n_alignment")
    weight = torch.randn(40, 50, dtype=p.dtype)  # dX: q = Wᵀ, column stride 50: not 16-byte
    assert route(host, torch.randn(37, 40, dtype=p.dtype), weight.t()) == (WMMA, "q_layout")
    for major, minor in [(8, 0), (8, 9), (10, 0), (12, 0)]:
        assert route(host, p, q, major=major, minor=minor) == (WMMA, "not_sm90")
    assert route(host, p, q, sm90a_code=False) == (WMMA, "no_sm90a_code")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["forward", "dx"])
@pytest.mark.parametrize(("bias", "rank"), [(True, 5), (False, 16), (True, 0), (False, 0)])
def test_cutlass_problem_computes_the_fused_linear(host, dtype, layout, bias, rank):
    """M = 133 (no multiple of the 128-row tile), K and N multiples of 8, scale 1.7."""
    M, K, N = 133, 72, 40
    p = torch.randn(M, K, dtype=dtype)
    if layout == "forward":
        q = torch.randn(N, K, dtype=dtype)
    else:
        q = torch.randn(K, N + 8, dtype=dtype)[:, :N].t()  # Wᵀ of a padded W: strides (1, N + 8)
    b = torch.randn(N, dtype=dtype) if bias else None
    u = torch.randn(M, rank, dtype=dtype) if rank else None
    v = torch.randn(N, rank, dtype=dtype)[:, :rank] if rank else None
    expected = p.double() @ q.double().t()
    if bias:
        expected += b.double()
    if rank:
        expected += 1.7 * (u.double() @ v.double().t())
    out = host.emulate_cutlass_gemm(p, q, b, u, v, 1.7)
    assert out.dtype == dtype and out.shape == (M, N) and out.is_contiguous()
    assert rel_error(out, expected) < TOLERANCE[dtype]
    # One rounding of the fp32 result: within half an ulp of it (plus fp32 summation error).
    assert ((out.double() - expected).abs() <= expected.abs() * 2.0**-8 + 1e-3).all()
    wmma = host.emulate_lowrank_gemm(p, q, b, u, v, 1.7, 0, 0, 0, 0.0, False, 0, 0, 0, 0.0, False)
    assert rel_error(out, wmma.double()) < TOLERANCE[dtype]


def test_exact_inputs_round_once_to_nearest(host):
    """Small integers: every product and sum is exact in fp32, so out is the float64 result
    rounded once to bf16, bit for bit."""
    M, K, N, r = 19, 64, 24, 3

    def integers(*shape):
        return torch.randint(-8, 9, shape).to(torch.bfloat16)

    p, q, b, u, v = integers(M, K), integers(N, K), integers(N), integers(M, r), integers(N, r)
    out = host.emulate_cutlass_gemm(p, q, b, u, v, 0.5)
    exact = p.double() @ q.double().t() + b.double() + 0.5 * (u.double() @ v.double().t())
    assert torch.equal(out.view(torch.int16), exact.to(torch.bfloat16).view(torch.int16))


def test_refused_problem_names_its_fallback(host):
    p, q = operands(8, 12, 16)
    with pytest.raises(RuntimeError, match="refuse this problem: p_layout"):
        host.emulate_cutlass_gemm(p, q, None, None, None, 1.0)


def fake_nvcc(folder: Path, version_line: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nvcc = folder / "nvcc"
    nvcc.write_text(
        f"#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\necho '{version_line}'\n"
    )
    nvcc.chmod(0o755)
    return nvcc


def test_sm90a_is_built_only_where_the_toolkit_supports_it(tmp_path):
    new = fake_nvcc(tmp_path / "new", "Cuda compilation tools, release 12.4, V12.4.131")
    old = fake_nvcc(tmp_path / "old", "Cuda compilation tools, release 11.8, V11.8.89")
    assert _build.supports_sm90a(new) and not _build.supports_sm90a(old)
    assert not _build.supports_sm90a(tmp_path / "missing")


def test_arch_list_follows_the_toolkit(monkeypatch):
    if _build.find_cuda_home().path is None:
        pytest.skip("no CUDA toolkit")
    monkeypatch.setattr(_build, "supports_sm90a", lambda nvcc: True)
    assert _build.default_arch_list() == _build.SM90A_ARCH_LIST == "8.0;9.0a"
    monkeypatch.setattr(_build, "supports_sm90a", lambda nvcc: False)
    assert _build.default_arch_list() == _build.DEFAULT_ARCH_LIST == "8.0;9.0"


def test_cutlass_units_only_with_their_headers(monkeypatch):
    monkeypatch.setattr(_build, "cutlass_include", lambda: None)
    kwargs = _build.extension_kwargs()
    assert kwargs["sources"] == [f"csrc/{name}" for name in _build.CUDA_SOURCES]
    assert "-DLORASC_WITH_CUTLASS" not in kwargs["extra_compile_args"]["nvcc"]
    assert "no CUTLASS kernels" in _build.build_estimate()
    headers = Path(_build.CSRC)  # any folder: only its path is passed on
    monkeypatch.setattr(_build, "cutlass_include", lambda: headers)
    kwargs = _build.extension_kwargs()
    units = [name for name in _build.CUTLASS_SOURCES if name.startswith("cutlass_gemm_")]
    assert len(units) == 4 and all(f"csrc/{name}" in kwargs["sources"] for name in units)
    assert all((_build.CSRC / name).is_file() for name in _build.CUTLASS_SOURCES)
    assert str(headers) in kwargs["include_dirs"]
    for flags in kwargs["extra_compile_args"].values():
        assert "-DLORASC_WITH_CUTLASS" in flags
    monkeypatch.setenv("MAX_JOBS", "1")
    assert "4 CUTLASS sm90a kernels" in _build.build_estimate()


def test_cutlass_headers_come_from_the_pinned_package():
    include = _build.cutlass_include()
    if include is None:
        pytest.skip(f"{_build.CUTLASS_PACKAGE} is not installed")
    assert (include / "cutlass" / "version.h").is_file()
    version = (include / "cutlass" / "version.h").read_text()
    major, minor = _build.CUTLASS_PACKAGE.split("==")[1].split(".")[:2]
    assert f"#define CUTLASS_MAJOR {major}" in version
    assert f"#define CUTLASS_MINOR {minor}" in version


def test_one_cutlass_pin_everywhere():
    root = _build.CSRC.parent
    for name in ("Makefile", "pyproject.toml"):
        assert _build.CUTLASS_PACKAGE in (root / name).read_text(), name


def test_dx_with_n_off_eight_names_the_alignment(host):
    weight = torch.randn(48, 44, dtype=torch.bfloat16)[:, :36]  # Wᵀ (36, 48), strides (1, 44)
    p = torch.randn(5, 48, dtype=torch.bfloat16)
    assert route(host, p, weight.t()) == (WMMA, "q_layout")  # column stride 44: not 16-byte
    weight = torch.randn(48, 40, dtype=torch.bfloat16)[:, :36]  # strides (1, 40), N = 36
    assert route(host, p, weight.t()) == (WMMA, "n_alignment")
