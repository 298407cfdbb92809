"""Compile every Triton kernel of the package for sm_90 on a machine without a GPU.

``python tests/backends/sm90_gate.py`` (run by ``tests/backends/test_sm90_compile.py`` with
``TRITON_INTERPRET=0``) prints one JSON line per compile. Steps:

1. **Kernels**: every ``triton.jit`` or ``triton.autotune`` object in the modules of
   :data:`PACKAGE`.
2. **Launches**: the linear's forward and backward (``lorasc_kernels.backends.composition`` over the
   backend's primitives) and its ``merge_`` run on small CPU tensors over
   :func:`exercise`'s choices (fused GEMM variant, dtypes, fp32 matmul precision, rank,
   rows, bias, noise, dropout, rounding) with every kernel replaced by a recorder, so each
   launch's argument types, constexprs and options are the launchers' own, specialized as
   Triton's launcher does (an int equal to 1 becomes a constant, one divisible by 16 and a
   16-byte aligned pointer get the divisibility hint that lets loads vectorize). Autotuned
   kernels get the GPU configs (``TRITON_INTERPRET=0``), pruned by their own
   ``early_config_prune``.
3. **Representative subset** (:func:`plan`), per kernel and argument types: (a) every
   autotune config with the heaviest launch (most flags on, widest rank block); for
   :data:`HOT_OPERAND` operands also (b) every config with the lightest launch (the plain
   forward at the narrowest rank block) and (c) every combination of flags (rank block at
   its widest) with the config of the smallest tile.
4. **Compile** for ``GPUTarget("cuda", 90, 32)``: shared memory from the metadata, register
   spills from ``ptxas -v``, ``fma`` count in the PTX, matrix-multiply instructions in the
   SASS (``cuobjdump -sass``).
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "lorasc_kernels.backends.triton"
TARGET = ("cuda", 90, 32)
SHARED_LIMIT_BYTES = 227 * 1024
# The operand type of the GPU problems (bf16 weights): its every flag combination is compiled.
HOT_OPERAND = "bf16"
# Compile only the kernels whose "module:name" starts with this variable's value (a test
# file that checks one module's kernels); unset: every kernel.
ONLY = "LORASC_GATE_ONLY"
# The fused GEMM variants with a Triton kernel, each forced in turn through the dispatch's
# switch (the third variant, addmm, is cuBLAS).
FUSED_VARIANTS = ("tiled", "persistent")


@dataclass
class Launch:
    """One distinct launch: kernel ``module:name``, argument types, the kernel's constexprs
    (its flags), the arguments Triton specializes (equal to 1: a constant; divisible by 16:
    an alignment hint), and options."""

    kernel: str
    signature: dict
    constexprs: dict
    specialized: dict
    divisible: list
    options: dict
    named_args: dict = field(repr=False, default_factory=dict)

    def key(self) -> str:
        return json.dumps(
            [
                self.kernel,
                self.signature,
                self.constexprs,
                self.specialized,
                self.divisible,
                self.options,
            ],
            sort_keys=True,
            default=str,
        )


def kernels() -> dict[str, object]:
    """``"module:attribute"`` → Triton kernel object, for every kernel of :data:`PACKAGE`:
    every ``triton.autotune`` object and every ``triton.jit`` function that no other one
    calls (those are device helpers, compiled inside the kernels that call them)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    package = importlib.import_module(PACKAGE)
    found = {}
    for info in pkgutil.walk_packages(package.__path__, f"{PACKAGE}."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, Autotuner | JITFunction):
                if all(value is not other for other in found.values()):
                    found[f"{info.name}:{name}"] = value
    sources = [jit_function(value).src for value in found.values()]
    return {
        name: value
        for name, value in found.items()
        if isinstance(value, Autotuner)
        or not any(
            re.search(rf"\b{value.fn.__name__}\(", source)
            for source in sources
            if source is not value.src
        )
    }


def jit_function(kernel):
    """The ``JITFunction`` of a kernel (under its autotuner, if any)."""
    from triton.runtime.autotuner import Autotuner

    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def specialization(param, value) -> tuple[str, object]:
    """``(type, attribute)`` that Triton's launcher gives ``value`` for kernel parameter
    ``param``: ``("constexpr", 1)`` for an int equal to 1, ``(type, "D")`` for an int or a
    pointer divisible by 16, unless the kernel opts the parameter out."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(
        BaseBackend,
        value,
        False,
        not param.do_not_specialize,
        not param.do_not_specialize_on_alignment,
    )[:2]


class Recorder:
    """Stands in for a kernel: ``recorder[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, name: str, kernel, launches: dict):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        return self.record

    def record(self, *args, **kwargs):
        fn = jit_function(self.kernel)
        values = dict(zip(fn.arg_names, args, strict=False))
        options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
        values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
        params = {p.name: p for p in fn.params}
        signature, specialized, divisible = {}, {}, []
        for name, value in values.items():
            if params[name].is_constexpr:
                signature[name] = "constexpr"
                continue
            kind, attribute = specialization(params[name], value)
            signature[name] = kind
            if kind == "constexpr":
                specialized[name] = attribute
            elif attribute == "D":
                divisible.append(name)
        launch = Launch(
            kernel=self.name,
            signature=signature,
            constexprs={
                name: values[name]
                for name in params
                if params[name].is_constexpr and name in values
            },
            specialized=specialized,
            divisible=divisible,
            options=options,
            named_args=values,
        )
        self.launches.setdefault(launch.key(), launch)


def exercise(backend) -> None:
    """Run the backend's entry points over the choices a user can make, on CPU tensors."""
    import torch

    from lorasc_kernels.backends import composition
    from lorasc_kernels.backends.specs import LinearSpec, MergeSpec, NoiseSpec
    from lorasc_kernels.backends.triton import gemm_dispatch
    from lorasc_kernels.formats.registry import KERNEL_DTYPES

    generator = torch.Generator().manual_seed(0)
    # fp32 matmul precision changes fp32 launches only (3×tf32 or tf32 dots).
    choices = [
        (dtype, precision)
        for dtype in KERNEL_DTYPES
        for precision in (("highest", "high") if dtype == torch.float32 else ("highest",))
    ]
    K, N = 64, 48
    for variant, (dtype, precision), rank, rows in itertools.product(
        FUSED_VARIANTS, choices, (5, 17, 64), (64, 2048)
    ):
        torch.set_float32_matmul_precision(precision)
        x = torch.randn(rows, K, generator=generator).to(dtype)
        weight = torch.randn(N, K, generator=generator).to(dtype)
        lora_A = torch.randn(rank, K, generator=generator).to(dtype)
        lora_B = torch.randn(N, rank, generator=generator).to(dtype)
        for bias, noise, dropout in itertools.product(
            (None, weight[:, 0].clone()), (None, 11), (0.0, 0.1)
        ):
            spec = LinearSpec.of(2.0, dropout, 7, noise, 0.05)
            with gemm_dispatch.forced_mode(variant):  # where it applies, else the tiled kernel
                y, xa = composition.linear_forward(backend, x, weight, bias, lora_A, lora_B, spec)
                composition.linear_backward(
                    backend, torch.ones_like(y), x, xa, weight, lora_A, lora_B, spec, (True,) * 5
                )
    torch.set_float32_matmul_precision("highest")
    for weight_dtype, lora_dtype in itertools.product(KERNEL_DTYPES, repeat=2):
        weight = torch.randn(64, 96, generator=generator).to(weight_dtype)
        lora_B = torch.randn(64, 16, generator=generator).to(lora_dtype)
        lora_A = torch.randn(16, 96, generator=generator).to(lora_dtype)
        for rounding, remove, add in itertools.product(
            ("nearest", "stochastic"), (None, (3, 0.01)), (None, (4, 0.01))
        ):
            backend.merge_(
                weight,
                lora_B,
                lora_A,
                MergeSpec(0.5, rounding, 5, remove and NoiseSpec(*remove), add and NoiseSpec(*add)),
            )
    exercise_fp8(backend, generator)


def exercise_fp8(backend, generator) -> None:
    """Scaled weights of every registered format (fp8 with per-row scales): the linear over
    bf16 inputs (the formats' use), by each fused GEMM variant, and the scaled merge."""
    import torch

    from lorasc_kernels.backends import composition
    from lorasc_kernels.backends.specs import LinearSpec, MergeSpec, NoiseSpec
    from lorasc_kernels.backends.triton import gemm_dispatch
    from lorasc_kernels.formats.quantize import quantize
    from lorasc_kernels.formats.registry import SCALED_DTYPES

    x = torch.randn(64, 64, generator=generator).to(torch.bfloat16)
    lora_A = torch.randn(16, 64, generator=generator).to(torch.bfloat16)
    lora_B = torch.randn(48, 16, generator=generator).to(torch.bfloat16)
    for dtype in SCALED_DTYPES:
        weight = quantize(torch.randn(48, 64, generator=generator), dtype)
        for variant, bias, dropout in itertools.product(
            FUSED_VARIANTS, (None, lora_B[:, 0].clone()), (0.0, 0.1)
        ):
            spec = LinearSpec.of(2.0, dropout, 7, None, 0.0)
            with gemm_dispatch.forced_mode(variant):
                y, xa = composition.linear_forward(backend, x, weight, bias, lora_A, lora_B, spec)
                composition.linear_backward(
                    backend,
                    torch.ones_like(y),
                    x,
                    xa,
                    weight,
                    lora_A,
                    lora_B,
                    spec,
                    (True, False, True, True, True),
                )
        for rounding, noise in itertools.product(("nearest", "stochastic"), (None, (3, 0.01))):
            noise = noise and NoiseSpec(*noise)
            backend.merge_(weight, lora_B, lora_A, MergeSpec(0.5, rounding, 5, noise, noise))
    exercise_fp8_compute(generator)


def exercise_fp8_compute(generator) -> None:
    """The fp8 compute mode's primitives (``backends/triton/fp8_compute.py``) as the linear's
    forward and dX call them, over every input dtype and weight format: the rows quantized
    with the thin product (with and without dropout) or without, the GEMM forward (with and
    without bias) and dX (with and without the rank term's dropout)."""
    import torch

    from lorasc_kernels.backends.specs import DropoutSpec
    from lorasc_kernels.backends.triton import fp8_compute as backend
    from lorasc_kernels.formats.quantize import quantize
    from lorasc_kernels.formats.registry import KERNEL_DTYPES, SCALED_DTYPES

    for dtype, weight_dtype in itertools.product(KERNEL_DTYPES, SCALED_DTYPES):
        x = torch.randn(64, 64, generator=generator).to(dtype)
        dy = torch.randn(64, 48, generator=generator).to(dtype)
        lora_A = torch.randn(16, 64, generator=generator).to(dtype)
        lora_B = torch.randn(48, 16, generator=generator).to(dtype)
        weight = quantize(torch.randn(48, 64, generator=generator), weight_dtype)
        for bias, dropout in itertools.product((None, lora_B[:, 0].clone()), (None, 0.1)):
            dropout = dropout and DropoutSpec(7, dropout)
            rows, xa = backend.quantize_rows(x, None, lora_A, dropout)
            backend.scaled_rows_gemm(rows, weight, bias, xa, lora_B, 2.0, dtype)
            grads, dy_b = backend.quantize_rows(dy, weight.scale, lora_B.t())
            backend.scaled_rows_gemm(grads, weight, None, dy_b, lora_A, 2.0, dtype, True, dropout)
        backend.quantize_rows(dy, weight.scale)  # dX alone: no thin product


def record_launches(found: dict) -> list[Launch]:
    """Every distinct launch that :func:`exercise` makes, kernels replaced by recorders."""
    launches: dict[str, Launch] = {}
    patched = []
    for module_name in {name.split(":")[0] for name in found}:
        module = sys.modules[module_name]
        for attribute, value in list(vars(module).items()):
            for name, kernel in found.items():
                if value is kernel:
                    patched.append((module, attribute, value))
                    setattr(module, attribute, Recorder(name, kernel, launches))
    try:
        exercise(importlib.import_module(PACKAGE))
    finally:
        for module, attribute, value in patched:
            setattr(module, attribute, value)
    return list(launches.values())


def configs_of(kernel, launch: Launch) -> list:
    """The autotune configs this launch would tune (pruned as the autotuner prunes), or
    ``[None]`` for a kernel without autotuning."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel, Autotuner):
        return [None]
    configs = list(kernel.configs)
    prune = getattr(kernel, "early_config_prune", None)
    if prune is not None:
        configs = prune(configs, launch.named_args)
    return configs


def _weight(launch: Launch) -> tuple:
    """How heavy a launch is: flags on, then the sum of its integer constexprs."""
    values = launch.constexprs.values()
    return (
        sum(v is True for v in values),
        sum(v for v in values if isinstance(v, int) and not isinstance(v, bool)),
    )


def _tile(config) -> int:
    return math.prod(v for v in config.kwargs.values() if isinstance(v, int))


def _job(launch: Launch, config, reason: str) -> dict:
    constexprs = {**launch.constexprs, **launch.specialized}
    options = dict(launch.options)
    signature = dict(launch.signature)
    config_text = "fixed"
    if config is not None:
        constexprs.update(config.kwargs)
        signature.update({name: "constexpr" for name in config.kwargs})
        options.update(num_warps=config.num_warps, num_stages=config.num_stages)
        config_text = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
        config_text += f", warps={config.num_warps}, stages={config.num_stages}"
    flags = {k: v for k, v in launch.constexprs.items()}
    return {
        "kernel": launch.kernel,
        "signature": signature,
        "constexprs": constexprs,
        "divisible": launch.divisible,
        "options": options,
        "config": config_text,
        "flags": flags,
        "reason": reason,
        "operand": operand_type(launch),
    }


def operand_type(launch: Launch) -> str:
    """The element type of the launch's first pointer argument (its data type)."""
    return next(t for t in launch.signature.values() if t.startswith("*")).lstrip("*")


def plan(found: dict, launches: list[Launch]) -> list[dict]:
    """The representative subset of compiles (module docstring, step 3), without repeats."""
    jobs = {}

    def add(launch, config, reason):
        job = _job(launch, config, reason)
        key = json.dumps(
            [job["kernel"], job["signature"], job["constexprs"], job["divisible"], job["options"]],
            sort_keys=True,
            default=str,
        )
        jobs.setdefault(key, job)

    groups: dict[tuple, list[Launch]] = {}
    for launch in launches:
        text_constexprs = sorted((k, v) for k, v in launch.constexprs.items() if isinstance(v, str))
        group = (launch.kernel, json.dumps([sorted(launch.signature.items()), text_constexprs]))
        groups.setdefault(group, []).append(launch)
    for members in groups.values():
        heaviest = max(members, key=_weight)
        for config in configs_of(found[heaviest.kernel], heaviest):
            add(heaviest, config, "every config, heaviest launch")
        if operand_type(heaviest) == HOT_OPERAND:
            lightest = min(members, key=_weight)
            for config in configs_of(found[lightest.kernel], lightest):
                add(lightest, config, f"every config, lightest {HOT_OPERAND} launch")
            widest: dict[str, Launch] = {}
            for launch in members:
                flags = json.dumps(
                    sorted(
                        (k, v)
                        for k, v in launch.constexprs.items()
                        if not isinstance(v, int) or isinstance(v, bool)
                    ),
                    default=str,
                )
                if flags not in widest or _weight(launch) > _weight(widest[flags]):
                    widest[flags] = launch
            for launch in widest.values():
                configs = configs_of(found[launch.kernel], launch)
                add(
                    launch,
                    min(configs, key=lambda c: 0 if c is None else _tile(c)),
                    f"every {HOT_OPERAND} flag combination, smallest tile",
                )
    return list(jobs.values())


def _tool(name: str) -> str:
    """A CUDA binary tool: Triton's bundled copy, else the one on ``PATH``."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.is_file() else (shutil.which(name) or name)


def spill_bytes(compiled) -> int:
    """Bytes of register spill stores of a compiled kernel: none when ``cuobjdump
    -res-usage`` shows no stack frame, else what ``ptxas -v`` reports for its PTX."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder, "kernel.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if re.search(r"STACK:0\b", usage):
            return 0
        source = Path(folder, "kernel.ptx")
        source.write_text(compiled.asm["ptx"])
        arch = f"-arch=sm_{TARGET[1]}a"
        result = subprocess.run(
            [_tool("ptxas"), arch, "-v", str(source), "-o", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        )
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", result.stderr))


# Instructions counted in the SASS: Hopper's warpgroup MMA on 16-bit (HGMMA) and fp8
# (QGMMA) operands, the warp-level MMA of earlier GPUs, fp32 fused multiply-adds on the CUDA
# cores, TMA tile loads, and local-memory loads and stores (spills, stack arrays).
SASS_OPCODES = ("HGMMA", "QGMMA", "HMMA", "FFMA", "UTMALDG", "LDL", "STL")


def sass_counts(compiled) -> dict[str, int]:
    """How many of each of :data:`SASS_OPCODES` the compiled kernel's SASS holds."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder, "kernel.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    counts = {opcode: len(re.findall(rf"\b{opcode}\b", sass)) for opcode in SASS_OPCODES}
    return {**counts, "largest_loop": largest_loop(sass)}


def largest_loop(sass: str) -> dict[str, int]:
    """Of the innermost loops of ``sass`` (each from a backward branch's target to the
    branch, holding no other loop), the one with the most instructions: its
    ``instructions`` per iteration, its 16-bit global loads (``u16_loads``), its
    shared-memory stores (``shared_stores``) and its float32 adds (``fp32_adds``); zeros
    when there is no loop."""
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)
    addresses = [(int(address, 16), text) for address, text in lines]
    loops = [
        (int(target, 16), address)
        for address, text in addresses
        for target in re.findall(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if int(target, 16) < address
    ]
    if not loops:
        return {"instructions": 0, "u16_loads": 0, "shared_stores": 0, "fp32_adds": 0}
    innermost = [
        (start, end)
        for start, end in loops
        if not any(
            start <= inner[0] and inner[1] <= end and inner != (start, end) for inner in loops
        )
    ]
    start, end = max(innermost, key=lambda loop: loop[1] - loop[0])
    body = [text for address, text in addresses if start <= address <= end]
    return {
        "instructions": len(body),
        "u16_loads": sum(bool(re.search(r"\bLDG\S*\.(U16|S16)\b", text)) for text in body),
        "shared_stores": sum(bool(re.search(r"\bSTS\b", text)) for text in body),
        "fp32_adds": sum(bool(re.search(r"\bFADD\b", text)) for text in body),
    }


def compile_job(job: dict) -> dict:
    """Compile one job for sm_90; the job with ``shared``, ``spill_bytes``, ``fma`` (in the
    PTX) and ``sass`` (:func:`sass_counts`) added, or ``error``."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    module_name, attribute = job["kernel"].split(":")
    fn = jit_function(getattr(importlib.import_module(module_name), attribute))
    attrs = {(fn.arg_names.index(name),): BaseBackend.parse_attr("D") for name in job["divisible"]}
    source = ASTSource(fn, job["signature"], job["constexprs"], attrs)
    start = time.perf_counter()
    try:
        compiled = triton.compile(source, target=GPUTarget(*TARGET), options=job["options"])
    except Exception as error:  # reported, and the gate fails on it
        return {**job, "error": f"{type(error).__name__}: {error}"[:2000]}
    return {
        **job,
        "shared": compiled.metadata.shared,
        "spill_bytes": spill_bytes(compiled),
        "fma": len(re.findall(r"\bfma\.", compiled.asm["ptx"])),
        "sass": sass_counts(compiled),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run with TRITON_INTERPRET=0: the gate needs the GPU configs", file=sys.stderr)
        return 2
    found = kernels()
    launches = record_launches(found)
    only = os.environ.get(ONLY)
    if only:  # a test file's own kernels (each was launched: the check below holds)
        found = {name: kernel for name, kernel in found.items() if name.startswith(only)}
        launches = [launch for launch in launches if launch.kernel in found]
    launched = {launch.kernel for launch in launches}
    for name in sorted(set(found) - launched):
        print(
            json.dumps(
                {
                    "kernel": name,
                    "error": "never launched by exercise() in "
                    "tests/backends/sm90_gate.py: add the choices that launch it there",
                }
            )
        )
    jobs = plan(found, launches)
    workers = int(os.environ.get("LORASC_GATE_JOBS", min(2, os.cpu_count() or 1)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(compile_job, jobs):
            print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
