"""The sm_90 gate of the C++ kernels: the CUTLASS GEMMs of the CUDA extension (built once by
``make test``, tests/backends/test_cuda_build.py) are real Hopper kernels in the built file:
their sm_90a SASS has warpgroup MMAs (HGMMA) of the right type and TMA loads (UTMALDG),
and no local memory (no STL/LDL, no stack frame). Read with ``cuobjdump`` from the
extension's own file, on a machine without a GPU."""

import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorasc_kernels import _build

pytest.importorskip("triton")  # the gate's cuobjdump is Triton's (tests/backends/sm90_gate.py)
from tests.backends.sm90_gate import _tool, sass_counts  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        _build.missing_toolchain() is not None,
        reason=f"cannot build the CUDA extension: {_build.missing_toolchain()}",
    ),
    pytest.mark.skipif(
        _build.cutlass_include() is None, reason=f"{_build.CUTLASS_PACKAGE} is not installed"
    ),
]

MAX_REGISTERS = 168  # the cooperative kernel's consumer warpgroups (setmaxnreg)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> dict[str, dict]:
    """Per CUTLASS translation unit (``cutlass_gemm_bf16_kmajor``, ...), its sm_90a cubin's
    kernel: SASS counts, HGMMA instructions, local-memory instructions, resource usage."""
    from lorasc_kernels.backends import cuda

    if "9.0a" not in _build._arch_list(None):
        pytest.skip(f"the build has no sm_90a (TORCH_CUDA_ARCH_LIST={_build._arch_list(None)})")
    module = _build.load_extension()
    cuda.extension_ops()
    folder = tmp_path_factory.mktemp("cubins")
    cuobjdump = _tool("cuobjdump")
    # One cubin per translation unit and architecture, named after the unit.
    subprocess.run([cuobjdump, "-xelf", "all", module.__file__], cwd=folder, check=True)
    found = {}
    for name in _build.CUTLASS_SOURCES:
        unit = Path(name).stem
        if not unit.startswith("cutlass_gemm_"):
            continue
        cubin = folder / f"{unit}.sm_90a.cubin"
        assert cubin.is_file(), f"no sm_90a code for {unit}: {sorted(folder.iterdir())}"
        usage = run(cuobjdump, "-res-usage", cubin)
        kernels = re.findall(r"Function (\S+):", usage)
        assert len(kernels) == 1 and "cutlass13device_kernel" in kernels[0], kernels
        sass = run(cuobjdump, "-sass", cubin)
        found[unit] = {
            "counts": sass_counts(SimpleNamespace(asm={"cubin": cubin.read_bytes()})),
            "hgmma": re.findall(r"\bHGMMA\.([^;]*)", sass),  # "64x256x16.F32 R24, ..."
            "local": re.findall(r"\b(?:STL|LDL)\b", sass),
            "resources": dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", usage.split(":", 2)[2])),
        }
    return found


def run(tool: str, flag: str, path: Path) -> str:
    return subprocess.run(
        [tool, flag, str(path)], capture_output=True, text=True, check=True
    ).stdout


def test_every_instance_is_built_for_sm90a(kernels):
    assert sorted(kernels) == [
        "cutlass_gemm_bf16_kmajor",
        "cutlass_gemm_bf16_nmajor",
        "cutlass_gemm_half_kmajor",
        "cutlass_gemm_half_nmajor",
    ]


def test_kernels_use_hgmma_and_tma(kernels):
    for unit, kernel in kernels.items():
        assert kernel["counts"]["UTMALDG"] > 0, unit
        assert kernel["counts"]["HGMMA"] > 0 and kernel["counts"]["HMMA"] == 0, unit
        # The 128 × 256 tile's warpgroup MMA, fp32 accumulators; bf16 is named, fp16 is
        # the default; q N-major is read transposed from shared memory (tnspB).
        expected = "64x256x16.F32.BF16" if "_bf16_" in unit else "64x256x16.F32"
        assert {opcode.split()[0] for opcode in kernel["hgmma"]} == {expected}, unit
        transposed = {"tnspB" in opcode for opcode in kernel["hgmma"]}
        assert transposed == {unit.endswith("_nmajor")}, unit


def test_kernels_have_no_local_memory(kernels):
    for unit, kernel in kernels.items():
        assert kernel["local"] == [], unit
        resources = kernel["resources"]
        assert resources["STACK"] == "0" and resources["LOCAL"] == "0", (unit, resources)
        assert 0 < int(resources["REG"]) <= MAX_REGISTERS, (unit, resources)
