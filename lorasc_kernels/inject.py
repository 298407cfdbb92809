"""``inject_lorasc``: put ``LoRASCLinear`` in place of a model's ``nn.Linear`` layers."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _checks as checks
from .backends import BACKENDS
from .formats.quantize import format_dtype
from .layer import LoRASCLinear

__all__ = ["LoRASCConfig", "inject_lorasc", "lorasc_layers", "replace_submodule"]

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")

logger = logging.getLogger("lorasc_kernels")


@dataclass
class LoRASCConfig:
    """Which layers get a LoRASC adapter, and its shape.

    ``target_modules`` follows PEFT: a list of names matched against the end of each
    module's dotted name (``"q_proj"`` matches ``"layers.0.attn.q_proj"``), a regex
    string matched against the full name, or ``"all-linear"`` (every ``nn.Linear`` except
    the output layer ``model.get_output_embeddings()``, as in PEFT: it is often tied to the
    input embeddings, which a merge must not change).

    ``trainable`` names modules (matched as a ``target_modules`` list) whose parameters stay
    trainable, as PEFT's ``modules_to_save`` (trained in place, not copied); ``bias``
    (PEFT's): ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (the adapted
    layers' biases train). :meth:`from_peft` builds one from a ``peft.LoraConfig``.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ALL_LINEAR)
    backend: str = "auto"
    lora_dtype: torch.dtype | None = None
    weight_format: str | None = None  # "fp8_e4m3" or "fp8_e5m2": quantized targets (docs/fp8.md)
    compute: str | None = None  # "fp8" (with a weight_format): GEMMs on fp8 operands (fp8.md)
    trainable: list[str] = field(default_factory=list)
    bias: str = "none"

    @classmethod
    def from_peft(cls, lora_config, **kwargs) -> LoRASCConfig:
        """The config of ``lora_config`` (a ``peft.LoraConfig``)'s adapters; ``kwargs`` set
        the fields PEFT has no word for (``backend``, ``lora_dtype``, ``weight_format``,
        ``compute``).
        See :func:`lorasc_kernels.integrations.peft.lorasc_config_kwargs`."""
        from .integrations.peft import lorasc_config_kwargs

        return cls(**lorasc_config_kwargs(lora_config), **kwargs)

    def __post_init__(self):
        self.r = checks.check_int("r", self.r, 1)
        self.lora_alpha = checks.check_float("lora_alpha", self.lora_alpha)
        self.lora_dropout = checks.check_probability("lora_dropout", self.lora_dropout)
        checks.check_choice("backend", self.backend, BACKENDS)
        checks.check_layer_dtype("lora_dtype", self.lora_dtype)
        if self.weight_format is not None:
            format_dtype(self.weight_format)
        LoRASCLinear.check_compute(self.compute, self.weight_format, None)
        checks.check_choice("bias", self.bias, BIAS_MODES)
        if not isinstance(self.trainable, (list, tuple, set)) or not all(
            isinstance(name, str) and name for name in self.trainable
        ):
            raise TypeError(f"trainable must be a list of module names, got {self.trainable!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ValueError("target_modules must not be empty")
            if targets != ALL_LINEAR:
                try:
                    re.compile(targets)
                except re.error as error:
                    raise ValueError(f"target_modules is not a valid regex: {error}") from None
        elif isinstance(targets, (list, tuple, set)):
            if not targets:
                raise ValueError("target_modules must not be an empty list")
            for name in targets:
                if not isinstance(name, str) or not name:
                    raise TypeError(f"target_modules must hold non-empty strs, got {name!r}")
        else:
            raise TypeError(
                f"target_modules must be a list of names or a regex str, "
                f"got {type(targets).__name__}"
            )

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` (dotted path) is targeted."""
        targets = self.target_modules
        if targets == ALL_LINEAR:
            return True
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(_ends_with(name, t) for t in targets)

    def unmatched(self, names) -> list[str]:
        """The entries of a ``target_modules`` list that match none of ``names`` (none for a
        regex or ``"all-linear"``)."""
        if isinstance(self.target_modules, str):
            return []
        return [t for t in self.target_modules if not any(_ends_with(n, t) for n in names)]


def _ends_with(name: str, target: str) -> bool:
    """PEFT's suffix rule: ``name`` is ``target`` or ends with ``"." + target``."""
    return name == target or name.endswith("." + target)


def _module_paths(model: nn.Module, kind: type) -> dict[str, nn.Module]:
    """Every module of type ``kind`` in ``model`` under each of its dotted paths."""
    return {
        name: module
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, kind)
    }


def _check_registered_once(paths: dict[str, nn.Module], names) -> None:
    """``ValueError`` naming two paths when a module of ``names`` has another path in
    ``paths``: a merge would reach it once, a replacement only one of its paths."""
    by_module: dict[int, list[str]] = {}
    for name, module in paths.items():
        by_module.setdefault(id(module), []).append(name)
    for name in names:
        both = by_module[id(paths[name])]
        if len(both) > 1:
            raise ValueError(
                f"one {type(paths[name]).__name__} is registered under two module paths, "
                f"{checks.layer_label(both[0])} and {checks.layer_label(both[1])}: give each "
                "path its own layer"
            )


def _some(names) -> str:
    """The first ten of ``names``, comma-separated ("none" if empty)."""
    return ", ".join(list(names)[:10]) or "none"


def lorasc_layers(model: nn.Module) -> dict[str, LoRASCLinear]:
    """Every ``LoRASCLinear`` in ``model`` by its dotted name; ``ValueError`` if one has two."""
    paths = _module_paths(model, LoRASCLinear)
    _check_registered_once(paths, paths)
    return paths


def replace_submodule(root: nn.Module, name: str, make) -> nn.Module:
    """Put ``make(current)`` in place of ``root``'s submodule at the dotted path ``name``
    (not ``""``) and return it; ``make`` may return ``current`` to leave it."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    module = make(getattr(parent, child))
    setattr(parent, child, module)
    return module


def inject_lorasc(model: nn.Module, config) -> dict[str, LoRASCLinear]:
    """Replace the targeted ``nn.Linear`` modules of ``model`` in place; freeze the rest.

    ``config`` is a :class:`LoRASCConfig` or a ``peft.LoraConfig`` (read by
    :meth:`LoRASCConfig.from_peft`). Each new layer shares its linear's weight and bias
    storage. Every parameter except the ``lora_A``/``lora_B`` of every ``LoRASCLinear``
    (new or already there), and those ``config.trainable`` and ``config.bias`` keep
    trainable, gets ``requires_grad=False``. Returns the new layers by name; raises
    ``ValueError`` (listing the linear layers found) when nothing matches, saying so when
    the targets are ``LoRASCLinear`` already. Warns on the ``lorasc_kernels`` logger about
    a ``target_modules`` list entry that matches no linear layer, and about targeted layers
    that are ``LoRASCLinear`` already (left as they are). Every targeted layer is checked
    before the model changes: a failure leaves it as it was. A model with PEFT LoRA layers
    is refused: drive it with ``Cascade`` as it is.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(config).__name__ == "LoraConfig" and type(config).__module__.startswith("peft"):
        config = LoRASCConfig.from_peft(config)
    if not isinstance(config, LoRASCConfig):
        raise TypeError(
            f"config must be a LoRASCConfig or a peft.LoraConfig, got {type(config).__name__}"
        )
    names, wanted = _prepare(model, config)
    # The targets are looked up by name as each is converted: no reference keeps an
    # original alive, so an fp8 conversion holds one original layer at a time.
    layers = {}
    for name in names:
        layer = replace_submodule(
            model,
            name,
            lambda linear: LoRASCLinear.from_linear(
                linear,
                r=config.r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                backend=config.backend,
                lora_dtype=config.lora_dtype,
                weight_format=config.weight_format,
                compute=config.compute,
            ),
        )
        if config.bias == "lora_only" and layer.bias is not None:
            layer.bias.requires_grad_(True)
        layers[name] = layer
    for name, parameter in model.named_parameters():
        if name in wanted and (name == "bias" or name.endswith(".bias")):
            parameter.requires_grad_(True)
    return layers


def _prepare(model: nn.Module, config: LoRASCConfig) -> tuple[list[str], set[str]]:
    """Every check of :func:`inject_lorasc` and the ``requires_grad`` flags it sets before
    converting; returns the paths of the linears to convert and the names of the
    parameters that must train afterwards (the biases ``from_linear`` freezes)."""
    _refuse_peft_layers(model)
    output_layer = None
    if config.target_modules == ALL_LINEAR and hasattr(model, "get_output_embeddings"):
        output_layer = model.get_output_embeddings()
    paths = _module_paths(model, nn.Linear)
    linears = {
        name: module
        for name, module in paths.items()
        if type(module) is nn.Linear and name and module is not output_layer
    }
    chosen = {name: module for name, module in linears.items() if config.matches(name)}
    _check_registered_once(paths, chosen)
    already = [
        name
        for name, module in paths.items()
        if isinstance(module, LoRASCLinear) and config.matches(name)
    ]
    if not chosen and already:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched only layers that are "
            f"LoRASCLinear already (inject_lorasc ran on this model): {_some(already)}; "
            "target other layers, or finalize the Cascade to get nn.Linear layers back"
        )
    if not chosen:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no nn.Linear; "
            f"linear layers in the model: {_some(linears)}"
        )
    for target in config.unmatched([*linears, *already]):
        logger.warning(
            "target_modules entry %r matched no nn.Linear of the model; linear layers: %s",
            target,
            _some(linears),
        )
    if already:
        logger.warning(
            "inject_lorasc: %d targeted layers are LoRASCLinear already and stay as they are: %s",
            len(already),
            _some(already),
        )
    for name, module in chosen.items():
        with checks.naming_layer(name):
            LoRASCLinear.check_linear(module, config.weight_format)
            weight = module.weight.detach()  # quantized later: finite, known before any change
            if (
                config.weight_format is not None
                and not weight.is_meta
                and not bool(torch.isfinite(weight).all())
            ):
                raise ValueError(
                    "linear.weight has non-finite values: it cannot be quantized "
                    f"to weight_format={config.weight_format!r}"
                )
        if config.r > min(module.in_features, module.out_features):
            raise ValueError(
                f"r={config.r} exceeds min(in, out)="
                f"{min(module.in_features, module.out_features)} of layer {name!r}"
            )
    trainable = {
        name: module
        for name, module in model.named_modules()
        if name and any(_ends_with(name, t) for t in config.trainable)
    }
    missing = [t for t in config.trainable if not any(_ends_with(n, t) for n in trainable)]
    if missing:
        raise ValueError(f"trainable names {missing} match no module of the model")
    adapted = [name for name in trainable if name in chosen]
    if adapted:
        raise ValueError(
            f"trainable names match adapted layers {adapted}: their weight is the frozen base "
            "the cascades merge into; train their biases with bias='lora_only' or 'all'"
        )
    fast = {
        id(p)
        for layer in paths.values()
        if isinstance(layer, LoRASCLinear)
        for p in (layer.lora_A, layer.lora_B)
    }
    for parameter in model.parameters():
        if id(parameter) not in fast:
            parameter.requires_grad_(False)
    for module in trainable.values():
        module.requires_grad_(True)
    if config.bias == "all":
        for name, parameter in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                parameter.requires_grad_(True)
    # from_linear freezes the bias it takes over: a trained one trains again below
    wanted = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return list(chosen), wanted


def _refuse_peft_layers(model: nn.Module) -> None:
    """A model with PEFT LoRA layers would get LoRA on LoRA: say which route to take."""
    from .integrations.peft import peft_lora_modules

    names = list(peft_lora_modules(model))
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ValueError(
            f"model has PEFT LoRA layers ({shown}): "
            "inject_lorasc would stack LoRA on LoRA. Drive the PEFT model as it is with "
            "Cascade(model, optimizer) or LoRASCCallback (the PEFT route), or inject into the "
            "base model instead of calling get_peft_model"
        )
