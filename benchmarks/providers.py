"""The implementations of one LoRA linear layer that the benchmark tables compare.

Every provider is an ``nn.Module`` mapping ``x`` (..., K) to
``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` with ``W`` (N, K) and ``b`` frozen, ``A`` (r, K) and
``B`` (N, r) trainable, except the floor, which is the frozen linear alone. All of a
problem's providers share one ``W`` storage and start from the same ``A`` and ``B``.

Providers (see :func:`provider_names`):

* ``floor``: frozen ``nn.Linear`` (``F.linear``); its backward computes only ``dX = dY W``.
* ``peft``: PEFT's LoRA ``Linear`` built by ``get_peft_model`` on a one-layer model, with
  PEFT's defaults (over an fp16/bf16 weight its LoRA factors are fp32 and ``x`` is cast).
* ``addmm``: a hand-written autograd Function with ``addmm``/``addmm_`` (no fused kernel).
* ``compile``: ``torch.compile`` of the eager LoRA ``F.linear(x, W, b) + s · B(A(x))``.
* ``ours-<backend>``: :class:`lorasc_kernels.LoRASCLinear` with ``backend`` one of
  ``torch | triton | cuda``; ``ours-<backend>+noise`` adds fused cascade noise. On Triton
  the GEMM variant is the dispatch's measured pick (docs/hopper.md);
  ``ours-triton@<variant>`` forces one of :data:`TRITON_VARIANTS`.

A provider that cannot run here (its backend unavailable, PEFT not installed) raises
:class:`ProviderUnavailable` and is skipped with the reason; any other error, or a wrong
output, is a failure (:func:`build_checked`, :func:`check_runs`): the family's rows are
still written, then it raises :class:`ProviderFailures` naming every failed provider.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorasc_kernels import LoRASCLinear
from lorasc_kernels.backends import reference, resolve_backend

__all__ = [
    "ProviderUnavailable",
    "ProviderFailures",
    "Problem",
    "Tensors",
    "AddmmLoRAFunction",
    "AddmmLoRALinear",
    "EagerLoRALinear",
    "NOISE_LAMBDA",
    "NOISE_SEED",
    "TRITON_VARIANTS",
    "provider_names",
    "without_backends",
    "build",
    "expected_output",
    "tolerance",
    "trainable",
    "build_checked",
    "pinned",
    "variant_pinned",
    "variant_of",
    "check_runs",
    "raise_failures",
]

# Fused-noise rows use the method's default noise: λ · std(W) · U(-½, ½).
NOISE_LAMBDA = 0.15
NOISE_SEED = 1234

OUR_BACKENDS = ("torch", "triton", "cuda")

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Relative Frobenius error against float32 math above which a provider is not timed
# (docs/design.md §7 tolerances; fp32 allows tf32 matmuls on GPU).
_TOLERANCE = {torch.float32: 5e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


class ProviderUnavailable(RuntimeError):
    """The provider cannot run on this machine (not a failure): a skip with this reason."""


class ProviderFailures(RuntimeError):
    """Providers that raised or computed a wrong result; the message names each one."""


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error of a provider's output that still counts as correct."""
    return _TOLERANCE[dtype]


@dataclass(frozen=True)
class Problem:
    """One benchmark case: ``x`` (M, K) through a rank-``r`` LoRA of an (N, K) weight."""

    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype
    device: str
    bias: bool = False

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def label(self) -> str:
        return f"{self.M}x{self.K}x{self.N} r{self.r} {self.dtype_name}"

    def flops(self, mode: str, lora: bool) -> float:
        """Floating-point operations of ``mode``: ``forward | backward | forward+backward``,
        or ``train step`` (forward+backward; the optimizer's elementwise work not counted).

        Frozen part: ``x Wᵀ`` forward, ``dX = dY W`` backward (2MNK each). LoRA part:
        ``x Aᵀ``, ``(x Aᵀ) Bᵀ`` forward (2Mr(K+N)); ``dY B``, ``(dY B) A``, ``dA``, ``dB``
        backward (4Mr(K+N)).
        """
        frozen = 2.0 * self.M * self.N * self.K
        lowrank = 2.0 * self.M * self.r * (self.K + self.N) if lora else 0.0
        forward, backward = frozen + lowrank, frozen + 2.0 * lowrank
        return {
            "forward": forward,
            "backward": backward,
            "forward+backward": forward + backward,
            "train step": forward + backward,
        }[mode]


@dataclass
class Tensors:
    """Fresh random inputs of a :class:`Problem` (never zeros: ``B`` is nonzero too)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    grad_out: torch.Tensor
    scale: float

    @classmethod
    def draw(cls, problem: Problem, seed: int = 0) -> Tensors:
        generator = torch.Generator(device=problem.device).manual_seed(seed)
        p = problem

        def randn(*shape, std=1.0):
            values = torch.randn(*shape, generator=generator, device=p.device) * std
            return values.to(p.dtype)

        return cls(
            x=randn(p.M, p.K).requires_grad_(),
            weight=randn(p.N, p.K, std=p.K**-0.5),
            bias=randn(p.N) if p.bias else None,
            lora_A=randn(p.r, p.K, std=p.K**-0.5),
            lora_B=randn(p.N, p.r, std=p.r**-0.5),
            grad_out=randn(p.M, p.N),
            scale=2.0,
        )

    @property
    def noise_scale(self) -> float:
        return NOISE_LAMBDA * float(self.weight.float().std())


class AddmmLoRAFunction(torch.autograd.Function):
    """LoRA linear on 2-D ``x`` from ``addmm``/``addmm_`` calls; saves ``x`` and ``x Aᵀ``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale):
        y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
        xa = x @ lora_A.t()
        y.addmm_(xa, lora_B.t(), alpha=scale)
        ctx.save_for_backward(x, xa, weight, lora_A, lora_B)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scale
        dy_b = dy @ lora_B
        dx = (dy @ weight).addmm_(dy_b, lora_A, alpha=s)
        d_a = torch.addmm(lora_A, dy_b.t(), x, beta=0, alpha=s)
        d_b = torch.addmm(lora_B, dy.t(), xa, beta=0, alpha=s)
        return dx, None, None, d_a, d_b, None


def _frozen_linear(tensors: Tensors) -> nn.Linear:
    """An ``nn.Linear`` sharing ``tensors``' weight and bias storage, frozen."""
    out_features, in_features = tensors.weight.shape
    linear = nn.Linear(
        in_features,
        out_features,
        bias=tensors.bias is not None,
        device="meta",
        dtype=tensors.weight.dtype,
    )
    linear.weight = nn.Parameter(tensors.weight, requires_grad=False)
    if tensors.bias is not None:
        linear.bias = nn.Parameter(tensors.bias, requires_grad=False)
    return linear


class _LoRAModule(nn.Module):
    """A frozen ``base`` linear plus trainable copies of ``tensors``' ``A`` and ``B``."""

    def __init__(self, tensors: Tensors):
        super().__init__()
        self.base = _frozen_linear(tensors)
        self.lora_A = nn.Parameter(tensors.lora_A.detach().clone())
        self.lora_B = nn.Parameter(tensors.lora_B.detach().clone())
        self.scale = tensors.scale


class AddmmLoRALinear(_LoRAModule):
    """LoRA linear through :class:`AddmmLoRAFunction`."""

    def forward(self, x):
        y = AddmmLoRAFunction.apply(
            x.reshape(-1, x.shape[-1]),
            self.base.weight,
            self.base.bias,
            self.lora_A,
            self.lora_B,
            self.scale,
        )
        return y.reshape(*x.shape[:-1], y.shape[-1])


class EagerLoRALinear(_LoRAModule):
    """The textbook eager LoRA ``F.linear(x, W, b) + s · (x Aᵀ) Bᵀ`` (what compile gets)."""

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


class _OneLayer(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _peft_linear(tensors: Tensors) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ProviderUnavailable(f"peft is not installed ({error})") from None

    r = tensors.lora_A.shape[0]
    config = LoraConfig(
        r=r, lora_alpha=tensors.scale * r, lora_dropout=0.0, target_modules=["proj"]
    )
    layer = get_peft_model(_OneLayer(_frozen_linear(tensors)), config).base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(tensors.lora_A)
        layer.lora_B["default"].weight.copy_(tensors.lora_B)
    return layer


def _compiled_eager(tensors: Tensors) -> nn.Module:
    torch._dynamo.reset()  # a fresh cache per problem: no silent fallback at the recompile limit
    return torch.compile(EagerLoRALinear(tensors))


def variant_of(name: str) -> str | None:
    """The Triton GEMM variant provider ``name`` forces (``ours-triton@tiled``: tiled), else
    None (the dispatch's choice)."""
    return name.partition("@")[2] or None


@contextlib.contextmanager
def variant_pinned(variant: str | None):
    """The Triton GEMM dispatch's mode set to ``variant`` inside (None: its default, the
    dispatch's choice), restored after (``gemm_dispatch.forced_mode``)."""
    from lorasc_kernels.backends.triton import gemm_dispatch

    with gemm_dispatch.forced_mode(variant):
        yield


def pinned(fn, variant: str | None):
    """``fn`` run under :func:`variant_pinned`. Every provider's timed callable is wrapped
    alike, so each pays the same switch, and providers timed in turns never use
    another's variant."""

    def run():
        with variant_pinned(variant):
            return fn()

    return run


def _ours(tensors: Tensors, backend: str, noise: bool) -> LoRASCLinear:
    try:
        resolve_backend(backend, tensors.weight.device)
    except RuntimeError as error:  # says what is missing
        raise ProviderUnavailable(str(error)) from None
    r = tensors.lora_A.shape[0]
    layer = LoRASCLinear.from_linear(
        _frozen_linear(tensors), r=r, lora_alpha=tensors.scale * r, backend=backend
    )
    with torch.no_grad():
        layer.lora_A.copy_(tensors.lora_A)
        layer.lora_B.copy_(tensors.lora_B)
    if noise:
        layer.set_noise(NOISE_SEED, tensors.noise_scale)
    return layer


_BUILDERS: dict[str, Callable[[Tensors], nn.Module]] = {
    "floor": _frozen_linear,
    "peft": _peft_linear,
    "addmm": AddmmLoRALinear,
    "compile": _compiled_eager,
}
for _backend in OUR_BACKENDS:
    _BUILDERS[f"ours-{_backend}"] = lambda t, b=_backend: _ours(t, b, noise=False)
    _BUILDERS[f"ours-{_backend}+noise"] = lambda t, b=_backend: _ours(t, b, noise=True)
# The Triton GEMM variants that the dispatch chooses from, forced (the third is ``addmm``).
TRITON_VARIANTS = ("tiled", "persistent")
for _variant in TRITON_VARIANTS:
    # the variant is forced where the provider runs: pinned(..., variant_of(name))
    _BUILDERS[f"ours-triton@{_variant}"] = lambda t: _ours(t, "triton", False)


def provider_names(
    backends=OUR_BACKENDS, compile_: bool = True, noise: bool = True, triton_variants: bool = False
) -> list[str]:
    """Provider names in table order: floor, baselines, then ours per backend (with
    ``triton_variants``, Triton's forced GEMM variants after its dispatched one)."""
    names = ["floor", "peft", "addmm"] + (["compile"] if compile_ else [])
    for backend in backends:
        names.append(f"ours-{backend}")
        if noise:
            names.append(f"ours-{backend}+noise")
        if backend == "triton" and triton_variants:
            names += [f"ours-triton@{variant}" for variant in TRITON_VARIANTS]
    return names


def dispatch_choices() -> list[str]:
    """What the Triton GEMM dispatch has measured and chosen in this process so far, one
    line per problem, each line once."""
    dispatch = sys.modules.get("lorasc_kernels.backends.triton.gemm_dispatch")
    chosen = {} if dispatch is None else dispatch.DISPATCH.chosen
    lines = [
        f"gemm dispatch: {key}: {variant}"
        for key, variant in chosen.items()
        if key not in _REPORTED_CHOICES
    ]
    _REPORTED_CHOICES.update(chosen)
    return lines


_REPORTED_CHOICES: set = set()


def without_backends(names: list[str], backends) -> list[str]:
    """``names`` less our providers on any of ``backends`` (e.g. a CUDA build that failed)."""
    return [
        name
        for name in names
        if not any(name.split("+")[0].split("@")[0] == f"ours-{backend}" for backend in backends)
    ]


def build(name: str, tensors: Tensors) -> nn.Module:
    """The provider ``name`` as a module over ``tensors``; raises if it cannot run here."""
    return _BUILDERS[name](tensors)


def expected_output(name: str, tensors: Tensors) -> torch.Tensor:
    """What provider ``name`` must output, in float32 (noise as the reference draws it)."""
    t = tensors
    weight = t.weight
    if name.endswith("+noise"):
        weight = reference.noisy_weight(weight, NOISE_SEED, t.noise_scale)
    x = t.x.detach().float()
    y = x @ weight.float().t()
    if t.bias is not None:
        y += t.bias.float()
    if name != "floor":
        y += t.scale * (x @ t.lora_A.float().t()) @ t.lora_B.float().t()
    return y


def trainable(module: nn.Module) -> list[torch.Tensor]:
    """The parameters of ``module`` that get gradients (the LoRA factors)."""
    return [p for p in module.parameters() if p.requires_grad]


_reported: set[str] = set()


def _report_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        print(message, flush=True)


def _fail(failures: list[str], name: str, where: str, why: str) -> None:
    """Print and record that provider ``name`` failed (``where``: the problem)."""
    message = f"FAILED provider {name} on {where}: {why}".splitlines()[0]
    print(message, flush=True)
    failures.append(message)


def build_checked(names: list[str], tensors: Tensors, failures: list[str]) -> dict[str, nn.Module]:
    """The providers among ``names`` that run here and compute the right output.

    Unavailable ones (:class:`ProviderUnavailable`) are left out with a printed reason.
    One that raises, or whose output is off by more than :func:`tolerance`, is left out
    and recorded in ``failures``, so no table ever times a wrong or absent kernel and no
    failure passes for a skip.
    """
    modules = {}
    limit = tolerance(tensors.x.dtype)
    where = "x".join(str(n) for n in tensors.x.shape) + f" {DTYPE_NAMES[tensors.x.dtype]}"
    for name in names:
        try:
            module = build(name, tensors)
            # with grad: compiles the training graph
            forward = functools.partial(module, tensors.x)
            output = pinned(forward, variant_of(name))().detach().float()
        except ProviderUnavailable as error:
            _report_once(f"skip {name}: {error}".splitlines()[0])
            continue
        except Exception as error:  # a failure: reported by name, the others still run
            _fail(failures, name, where, f"{type(error).__name__}: {error}")
            continue
        expected = expected_output(name, tensors)
        error = float((output - expected).norm() / expected.norm())
        if not error <= limit:
            _fail(failures, name, where, f"relative error {error:.2e} > {limit:.0e}")
            continue
        modules[name] = module
    return modules


def check_runs(fns: dict, where: str, failures: list[str]) -> dict:
    """The callables of ``fns`` (name → callable) that run once without raising; the
    others are recorded in ``failures``."""
    running = {}
    for name, fn in fns.items():
        try:
            fn()
        except Exception as error:  # a failure: reported by name, the others still run
            _fail(failures, name, where, f"{type(error).__name__}: {error}")
            continue
        running[name] = fn
    return running


def raise_failures(failures: list[str]) -> None:
    """Raise :class:`ProviderFailures` listing ``failures``, if any."""
    if failures:
        raise ProviderFailures(f"{len(failures)} provider failure(s):\n" + "\n".join(failures))
