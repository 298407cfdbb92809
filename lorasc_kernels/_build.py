"""Building the CUDA extension in ``csrc/``: one list of sources and flags for both paths.

* ``setup.py`` builds ``lorasc_kernels._C`` from :func:`extension_kwargs` when torch is
  importable in the build environment (``pip install --no-build-isolation``) and a CUDA
  build, and nvcc is found (``LORASC_SKIP_CUDA_BUILD=1`` skips it,
  ``LORASC_FORCE_CUDA_BUILD=1`` makes a missing toolchain an error).
* Otherwise (``pip install .`` builds without torch, so without the extension)
  :func:`load_extension` compiles the same sources with ``torch.utils.cpp_extension.load``
  (ninja) at first use, saying so in a warning, into a cache folder
  (``LORASC_BUILD_DIR``, default ``~/.cache/lorasc_kernels``), for ``TORCH_CUDA_ARCH_LIST``
  or, if unset, the capability of the given device (Hopper as 9.0a) or
  :func:`default_arch_list` (sm_80 and sm_90a; sm_90 where the toolkit lacks sm_90a).
* With the ``nvidia-cutlass`` package's headers (:data:`CUTLASS_PACKAGE`) the extension
  also holds the CUTLASS sm90a GEMMs (:data:`CUTLASS_SOURCES`, ``-DLORASC_WITH_CUTLASS``);
  without them it is built with the WMMA kernels alone.
* :func:`load_host_check` compiles the shared element-wise headers with the host C++
  compiler, for the bit-exactness tests on machines without a GPU.

* :func:`find_cuda_home` says which CUDA toolkit the build uses, and why every other
  candidate was rejected; ``python -m lorasc_kernels._build --cuda-home`` prints it (the
  GPU check exports it), ``--build`` builds the extension once and prints its file.
* ``LORASC_CUDA_EXTENSION=<file>`` makes :func:`load_extension` load that prebuilt file and
  never compile (a missing file is an error naming it): one build per GPU check run.

Nothing here runs at import time.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

__all__ = [
    "CSRC",
    "CUDA_SOURCES",
    "DEFAULT_ARCH_LIST",
    "SM90A_ARCH_LIST",
    "CUTLASS_SOURCES",
    "CUTLASS_PACKAGE",
    "cutlass_include",
    "default_arch_list",
    "supports_sm90a",
    "build_estimate",
    "CudaHome",
    "extension_kwargs",
    "find_cuda_home",
    "toolkit_problem",
    "real_nvcc",
    "missing_toolchain",
    "load_extension",
    "load_host_check",
]

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CUDA_SOURCES = ("bindings.cpp", "fused_linear.cu", "merge.cu")
# The CUTLASS sm90a kernels of lowrank_gemm, one per translation unit (MAX_JOBS builds them
# side by side), and the probe that tells whether a device runs the sm_90a code. Built when
# the nvidia-cutlass package's headers are found (CUTLASS_PACKAGE, a test dependency).
CUTLASS_SOURCES = (
    "cutlass_gemm_bf16_kmajor.cu",
    "cutlass_gemm_bf16_nmajor.cu",
    "cutlass_gemm_half_kmajor.cu",
    "cutlass_gemm_half_nmajor.cu",
    "cutlass_probe.cu",
)
CUTLASS_PACKAGE = "nvidia-cutlass==4.2.0.0"
HOST_CHECK_SOURCES = ("host_check.cpp",)
# Ampere and Hopper. The WMMA kernels use no Hopper-only instruction; the CUTLASS kernels
# need sm_90a (wgmma, TMA), so Hopper is built as 9.0a when the toolkit supports it.
DEFAULT_ARCH_LIST = "8.0;9.0"
SM90A_ARCH_LIST = "8.0;9.0a"

# The C++ standard is torch's own (C++17 or C++20 by version). -ffp-contract=off: the host
# build must not fuse the reference's separate multiply and add.
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]

# The module name of the extension compiled at first use (its file: JIT_NAME.so).
JIT_NAME = "lorasc_kernels_cuda"
# The prebuilt extension file that load_extension loads instead of compiling.
PREBUILT_ENV = "LORASC_CUDA_EXTENSION"
# torch < 2.14 waits for a `lock` file in the build folder to disappear; a killed build
# leaves it behind. One older than this many seconds is taken as stale and removed.
STALE_LOCK_S = float(os.environ.get("LORASC_STALE_LOCK_S", 600))

logger = logging.getLogger(__name__)
_loaded: ModuleType | None = None


class CudaHome(NamedTuple):
    """The CUDA toolkit chosen for the build: ``path`` (None: none found), where it came
    from, and each rejected candidate with the reason."""

    path: Path | None
    source: str
    rejected: tuple[tuple[str, str], ...]

    def report(self) -> str:
        """Several lines: the choice, then every rejected candidate and why."""
        chosen = f"CUDA_HOME={self.path} ({self.source})" if self.path else "no CUDA toolkit"
        lines = [f"CUDA toolkit: {chosen}"]
        lines += [f"  rejected {candidate}: {reason}" for candidate, reason in self.rejected]
        return "\n".join(lines)


def cutlass_include() -> Path | None:
    """The CUTLASS C++ headers of the ``nvidia-cutlass`` package
    (``cutlass_library/source/include``), or None when it is not installed."""
    spec = importlib.util.find_spec("cutlass_library")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        include = Path(folder) / "source" / "include"
        if (include / "cutlass" / "cutlass.h").is_file() and (include / "cute").is_dir():
            return include
    return None


def sources() -> list[str]:
    """File names in ``csrc/`` of the extension: the CUTLASS ones with their headers."""
    return [*CUDA_SOURCES, *(CUTLASS_SOURCES if cutlass_include() else ())]


def _defines() -> list[str]:
    return ["-DLORASC_WITH_CUTLASS"] if cutlass_include() else []


def include_dirs() -> list[str]:
    return [str(CSRC), *([str(cutlass_include())] if cutlass_include() else [])]


def extension_kwargs() -> dict:
    """Sources (relative to the repository root) and flags of ``lorasc_kernels._C``."""
    return {
        "sources": [f"csrc/{name}" for name in sources()],
        "include_dirs": include_dirs(),
        "extra_compile_args": {"cxx": CXX_FLAGS + _defines(), "nvcc": NVCC_FLAGS + _defines()},
    }


# Compile time of one translation unit on one core of a 2-core machine (nvcc 13.0, sm_80
# and sm_90a): the WMMA kernels and bindings (three units together), each CUTLASS GEMM unit
# (about 4.5 GB of memory each), the probe.
BUILD_S_WMMA = 110
BUILD_S_PER_CUTLASS_UNIT = 90
BUILD_S_PROBE = 25


def build_estimate() -> str:
    """About how long the build takes: :data:`BUILD_S_*` spread over ``MAX_JOBS`` (else the
    CPU count) parallel compiles, no more than the CPUs."""
    cpus = os.cpu_count() or 1
    jobs = max(1, min(int(os.environ.get("MAX_JOBS") or cpus), cpus))
    units = len(CUTLASS_SOURCES) - 1 if cutlass_include() else 0  # less the probe
    seconds = BUILD_S_WMMA + (units * BUILD_S_PER_CUTLASS_UNIT + BUILD_S_PROBE if units else 0)
    what = f"{units} CUTLASS sm90a kernels" if units else "no CUTLASS kernels"
    return f"about {seconds / jobs / 60:.0f} min on {jobs} core(s), {what}"


def supports_sm90a(nvcc: Path) -> bool:
    """Whether ``nvcc`` compiles for sm_90a: CUDA 12.0 and later (``nvcc --version``)."""
    try:
        result = subprocess.run(
            [str(nvcc), "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return False
    found = re.search(r"release (\d+)\.(\d+)", result.stdout)
    return found is not None and int(found.group(1)) >= 12


def default_arch_list() -> str:
    """:data:`SM90A_ARCH_LIST` when the toolkit of :func:`find_cuda_home` supports sm_90a,
    else :data:`DEFAULT_ARCH_LIST` (the CUTLASS kernels then never run)."""
    home = find_cuda_home().path
    return SM90A_ARCH_LIST if home and supports_sm90a(home / "bin" / "nvcc") else DEFAULT_ARCH_LIST


def toolkit_problem(root: Path) -> str | None:
    """Why ``root`` is not a usable CUDA toolkit (no ``bin/nvcc``, no
    ``include/cuda_runtime.h``, no ``libcudart`` under ``lib64/``, ``lib/`` or
    ``targets/*/lib/``), or None."""
    if not (root / "bin" / "nvcc").is_file():
        return f"no {root / 'bin' / 'nvcc'}"
    if not (root / "include" / "cuda_runtime.h").is_file():
        return f"no {root / 'include' / 'cuda_runtime.h'}"
    libraries = [root / "lib64", root / "lib", *sorted(root.glob("targets/*/lib"))]
    if not any(any(folder.glob("libcudart.so*")) for folder in libraries):
        return "no libcudart.so* in " + ", ".join(str(folder) for folder in libraries)
    return None


def real_nvcc(nvcc: Path, depth: int = 4) -> Path:
    """The nvcc binary that ``nvcc`` runs, through symbolic links and wrapper scripts.

    Asks it first (``nvcc --dryrun`` prints its own folder as ``_HERE_``); if that gives
    nothing, a shell script's first absolute path to another ``nvcc`` is followed.
    """
    path = Path(os.path.realpath(nvcc))
    here = _dryrun_folder(path)
    if here is not None and (here / "nvcc").is_file():
        return Path(os.path.realpath(here / "nvcc"))
    if depth > 0 and _is_script(path):
        for target in re.findall(r"(/[^\s\"'`;|&<>()]*/nvcc)\b", path.read_text(errors="replace")):
            if Path(target).is_file() and Path(os.path.realpath(target)) != path:
                return real_nvcc(Path(target), depth - 1)
    return path


def _is_script(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(2) == b"#!"


def _dryrun_folder(nvcc: Path) -> Path | None:
    """The ``_HERE_`` folder that ``nvcc --dryrun`` reports, or None."""
    command = [str(nvcc), "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^#\$ _HERE_=(.+)$", result.stdout + result.stderr, re.MULTILINE)
    return Path(found.group(1).strip()) if found else None


def _nvccs_on_path() -> list[Path]:
    """Every executable ``nvcc`` on ``PATH``, in order (``which -a nvcc``)."""
    found = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / "nvcc"
        if candidate.is_file() and os.access(candidate, os.X_OK) and candidate not in found:
            found.append(candidate)
    return found


def _pip_toolkits() -> list[Path]:
    """Toolkit folders of the ``nvidia-*`` pip packages (``nvidia/cu13``, ``nvidia/cu12``,
    ``nvidia/cuda_nvcc``) in this interpreter's site-packages."""
    roots = dict.fromkeys(
        Path(p)
        for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path)
        if p
    )
    return [
        folder
        for root in roots
        for name in ("cu13", "cu12", "cuda_nvcc")
        if (folder := root / "nvidia" / name).is_dir()
    ]


def _candidates():
    """``(where it came from, toolkit folder)`` of each place a toolkit may be, in order;
    lazily, so that a valid ``CUDA_HOME`` asks no ``nvcc``."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            yield f"{name}={os.environ[name]}", Path(os.environ[name])
    for nvcc in _nvccs_on_path():
        real = real_nvcc(nvcc)
        via = f" (runs {real})" if real != nvcc else ""
        yield f"nvcc on PATH {nvcc}{via}", real.parent.parent
    yield "/usr/local/cuda", Path("/usr/local/cuda")
    for folder in _pip_toolkits():
        yield f"pip package toolkit {folder}", folder


def find_cuda_home() -> CudaHome:
    """The CUDA toolkit to build with: the first valid of ``CUDA_HOME`` (or ``CUDA_PATH``),
    each ``nvcc`` on ``PATH`` followed to its real binary (links and wrappers: a wrapper
    such as ``/usr/local/bin/nvcc`` would make torch guess ``/usr/local``),
    ``/usr/local/cuda``, then the ``nvidia-*`` pip packages' toolkit.

    Valid means :func:`toolkit_problem` finds nothing. The path is the real one (links
    resolved), so every route to one toolkit gives the same build commands.
    """
    rejected = []
    for source, root in _candidates():
        problem = toolkit_problem(root)
        if problem is None:
            return CudaHome(Path(os.path.realpath(root)), source, tuple(rejected))
        rejected.append((source, problem))
    return CudaHome(None, "", tuple(rejected))


def _use_cuda_home() -> CudaHome:
    """:func:`find_cuda_home`, exported as ``CUDA_HOME`` to torch's extension builder."""
    home = find_cuda_home()
    logger.info("%s", home.report())
    if home.path is not None:
        os.environ["CUDA_HOME"] = str(home.path)  # before torch's own guess at its import
        from torch.utils import cpp_extension

        cpp_extension.CUDA_HOME = str(home.path)  # read when the build commands are made
    return home


def missing_toolchain() -> str | None:
    """Why the extension cannot be compiled here (CPU torch, no CUDA toolkit), or None.

    Points torch's extension builder at the toolkit of :func:`find_cuda_home`.
    """
    if torch.version.cuda is None:
        return "torch is a CPU-only build (the CUDA backend needs a CUDA build of torch)"
    home = _use_cuda_home()
    if home.path is None:
        return "no CUDA toolkit found: install it or set CUDA_HOME; " + "; ".join(
            f"{c}: {r}" for c, r in home.rejected
        )
    if not all((CSRC / name).is_file() for name in (*CUDA_SOURCES, *CUTLASS_SOURCES)):
        return f"the CUDA sources are missing from {CSRC} (install from a source checkout)"
    return None


def _arch_list(device: torch.device | None) -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        hopper_a = (major, minor) == (9, 0) and default_arch_list() == SM90A_ARCH_LIST
        return "9.0a" if hopper_a else f"{major}.{minor}"
    return default_arch_list()


def _build_dir(tag: str) -> Path:
    root = Path(os.environ.get("LORASC_BUILD_DIR", Path.home() / ".cache" / "lorasc_kernels"))
    path = root / re.sub(r"[^A-Za-z0-9_.-]", "_", f"torch{torch.__version__}-{tag}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def clear_stale_lock(build_dir: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove ``build_dir/lock`` if older than ``max_age_s``; whether it was removed.

    torch before 2.14 takes the file's existence as "a build is running" and waits for it
    to go, forever after a killed build; later torch locks the file instead (the kernel
    drops the lock with its holder), so only a torch without ``cpp_extension.FileLock``
    calls this.
    """
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= max_age_s:
        return False
    logger.warning(
        "removing %s, %.0f s old: a killed build left it (LORASC_STALE_LOCK_S=%g)",
        lock,
        age,
        max_age_s,
    )
    lock.unlink(missing_ok=True)
    return True


def load_extension(device: torch.device | None = None, verbose: bool = False) -> ModuleType:
    """The compiled extension: ``$LORASC_CUDA_EXTENSION`` if set, else
    ``lorasc_kernels._C`` if installed, else built and cached.

    Loading registers the ``torch.ops.lorasc_cuda`` ops. Raises ``RuntimeError`` saying
    what is missing when it cannot be loaded or built.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    if os.environ.get(PREBUILT_ENV):
        _loaded = _load_prebuilt(Path(os.environ[PREBUILT_ENV]))
        return _loaded
    try:
        from lorasc_kernels import _C  # built by setup.py
    except ImportError:
        reason = missing_toolchain()
        if reason is not None:
            raise RuntimeError(f"cannot build the CUDA extension: {reason}") from None
        _C = _compile(_arch_list(device), verbose)
    _loaded = _C
    return _C


def _load_prebuilt(path: Path) -> ModuleType:
    """The extension module in the file ``path``, never compiled here."""
    if not path.is_file():
        raise RuntimeError(
            f"{PREBUILT_ENV}={path} does not exist (its build failed or did not "
            "run); not building the CUDA extension again"
        )
    spec = importlib.util.spec_from_file_location(path.name.split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(arch_list: str, verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    build_dir = _build_dir(f"cu{torch.version.cuda}-sm{arch_list}")
    if not (build_dir / f"{JIT_NAME}.so").is_file():
        logger.warning(
            "lorasc_kernels: compiling the CUDA extension at its first use, for "
            "TORCH_CUDA_ARCH_LIST=%s into %s (once; %s)",
            arch_list,
            build_dir,
            build_estimate(),
        )
    if not hasattr(cpp_extension, "FileLock"):
        clear_stale_lock(build_dir)
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        return cpp_extension.load(
            name=JIT_NAME,
            sources=[str(CSRC / name) for name in sources()],
            extra_include_paths=include_dirs(),
            extra_cflags=CXX_FLAGS + _defines(),
            extra_cuda_cflags=NVCC_FLAGS + _defines(),
            build_directory=str(build_dir),
            verbose=verbose,
        )
    finally:
        if previous is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def load_host_check(verbose: bool = False) -> ModuleType:
    """Host (g++) build of ``csrc/lorasc/*.cuh`` with a few test entry points."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name="lorasc_host_check",
        sources=[str(CSRC / name) for name in HOST_CHECK_SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cflags=CXX_FLAGS,
        build_directory=str(_build_dir("host")),
        verbose=verbose,
    )


def main(argv=None) -> int:
    """``--cuda-home``: print the toolkit (the reasons on stderr); ``--build``: build the
    extension (for the visible GPU, else ``TORCH_CUDA_ARCH_LIST`` or sm_80 and sm_90a) and
    print its file, for ``LORASC_CUDA_EXTENSION``."""
    parser = argparse.ArgumentParser(
        prog="python -m lorasc_kernels._build", description=main.__doc__
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--cuda-home", action="store_true")
    action.add_argument("--build", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    if args.cuda_home:
        home = find_cuda_home()
        print(home.report(), file=sys.stderr)
        if home.path is None:
            return 1
        print(home.path)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.pop(PREBUILT_ENV, None)  # this is the build that such a file comes from
    start = time.perf_counter()
    device = torch.device("cuda") if torch.cuda.is_available() else None
    try:
        module = load_extension(device, verbose=args.verbose)
    except RuntimeError as error:
        print(f"build failed: {error}", file=sys.stderr)
        return 1
    print(f"CUDA extension ready in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(module.__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
