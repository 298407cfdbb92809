"""PEFT's LoRA under LoRASC: its configs for :func:`~lorasc_kernels.inject_lorasc`, its
models under a :class:`~lorasc_kernels.Cascade`, and its layers on the fused kernel.

Three ways in for a PEFT/TRL pipeline:

* ``LoRASCConfig.from_peft(lora_config)`` (or ``inject_lorasc(model, lora_config)``):
  the same adapters as ``LoRASCLinear`` layers (:func:`lorasc_config_kwargs`);
* ``Cascade(peft_model, optimizer)`` / ``LoRASCCallback`` on a ``get_peft_model`` model
  (``SFTTrainer(peft_config=...)`` makes one): each PEFT ``lora.Linear`` is driven through
  :class:`PeftLoraLayer`; at each boundary its adapter is merged into ``base_layer.weight``
  with this package's merge (stochastic rounding), ``lora_A``/``lora_B`` are drawn again as
  PEFT initialises them and their optimizer state is dropped;
* :func:`use_fused_kernels` (in the spirit of Liger's ``apply_liger_kernel_to_*``): the
  forward of every PEFT ``lora.Linear`` runs :func:`~lorasc_kernels.lorasc_linear`, the
  fused kernel of ``LoRASCLinear``.

Only what LoRASC can honour is taken; anything else is refused by name (DoRA, bias
adapters, other initialisations, several or merged adapters, non-``nn.Linear`` bases).
"""

from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path

import torch
from torch import nn

from .. import _checks as checks
from .._files import atomic_write
from ..distributed import full_tensor, init_rows, local_row_block
from ..functional import lorasc_linear

__all__ = [
    "PeftLoraLayer",
    "lorasc_config_kwargs",
    "peft_lora_layers",
    "peft_lora_modules",
    "use_fused_kernels",
    "base_weights",
    "load_base_weights",
    "plain_model",
    "keep_base_weights_in_saves",
]

# Where a PEFT model (``get_peft_model``) holds its base model: ``peft_model.base_model.model``.
PEFT_PREFIX = "base_model.model."

# LoraConfig fields taken as they are, and the values of the others that change nothing.
_TAKEN = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "modules_to_save",
    "bias",
    "use_rslora",
    "task_type",
    "peft_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "peft_version",  # bookkeeping: which PEFT wrote a saved config
    "auto_mapping",
)
_INITS = (True, "gaussian")


def lorasc_config_kwargs(lora_config) -> dict:
    """The ``LoRASCConfig`` arguments that give ``lora_config`` (a ``peft.LoraConfig``)'s
    adapters: ``r``, ``lora_alpha`` (times ``√r`` under ``use_rslora``, so the scale is
    PEFT's ``alpha/√r``), ``lora_dropout``, ``target_modules``, ``modules_to_save`` as
    ``trainable`` and ``bias`` (checked by ``LoRASCConfig``). A field set to anything LoRASC
    cannot honour raises ``ValueError`` naming it."""
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    defaults = LoraConfig()
    for name, value in vars(lora_config).items():
        if name in _TAKEN or name.startswith("_") or value == getattr(defaults, name, value):
            continue
        raise ValueError(
            f"LoraConfig.{name}={value!r} has no LoRASC counterpart: leave it at "
            f"its default ({getattr(defaults, name)!r})"
        )
    if lora_config.init_lora_weights is not True:
        raise ValueError(
            f"LoraConfig.init_lora_weights={lora_config.init_lora_weights!r}: a LoRASCLinear "
            "draws each fast LoRA as PEFT's default (True, Kaiming-uniform A); the PEFT route "
            "(Cascade on a get_peft_model model) honours 'gaussian'"
        )
    targets = lora_config.target_modules
    if targets is None:
        raise ValueError(
            "LoraConfig.target_modules is None (PEFT then guesses by model "
            "type): name the modules, or 'all-linear'"
        )
    scale_alpha = math.sqrt(lora_config.r) if lora_config.use_rslora else 1.0
    return {
        "r": lora_config.r,
        "lora_alpha": lora_config.lora_alpha * scale_alpha,
        "lora_dropout": lora_config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "trainable": sorted(lora_config.modules_to_save or ()),
        "bias": lora_config.bias,
    }


class PeftLoraLayer:
    """One PEFT ``lora.Linear`` (its one active adapter) as the layer a ``Cascade`` drives
    (:class:`~lorasc_kernels.cascade.driven.DrivenLayer`): ``weight``/``bias`` are its base layer's,
    ``lora_A`` (r, in) and ``lora_B`` (out, r) its adapter's weights, ``scaling`` PEFT's; a
    float weight (no ``weight_scale``, no ``weight_format``), merged on the ``"auto"``
    backend. Get it with :func:`peft_lora_layers`."""

    weight_format = None
    weight_scale = None
    backend = "auto"

    def __init__(self, module: nn.Module, adapter: str, init_lora_weights: bool | str = True):
        self.module = module
        self.adapter = adapter
        self.init_lora_weights = init_lora_weights
        # (seed, scale) of the noise a Cascade in "inplace" mode wrote into W, else None.
        self.weight_noise: tuple[int, float] | None = None

    @property
    def driven_module(self) -> nn.Module:
        """The PEFT ``lora.Linear`` the model holds (what finalize() replaces)."""
        return self.module

    @property
    def weight(self) -> nn.Parameter:
        return self.module.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.module.base_layer.bias

    @property
    def lora_A(self) -> nn.Parameter:
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> nn.Parameter:
        return self.module.lora_B[self.adapter].weight

    @property
    def r(self) -> int:
        return self.module.r[self.adapter]

    @property
    def in_features(self) -> int:
        return self.module.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.module.base_layer.out_features

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def dropout_p(self) -> float:
        dropout = self.module.lora_dropout[self.adapter]
        return dropout.p if isinstance(dropout, nn.Dropout) else 0.0

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """A fresh adapter as PEFT initialises it (``init_lora_weights`` True or
        ``"gaussian"``), ``A`` drawn by ``generator`` (under FSDP2 the whole ``A``, each rank
        keeping its rows); ``B = 0``."""
        with torch.no_grad():
            if self.init_lora_weights == "gaussian":
                init_rows(self.lora_A, lambda a: a.normal_(std=1 / self.r, generator=generator))
            else:
                init_rows(
                    self.lora_A,
                    lambda a: nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator),
                )
            self.lora_B.zero_()

    def check_unchanged(self, name: str) -> None:
        """Refuse (``RuntimeError`` naming the layer ``name``) a layer that can no longer be
        merged as driven: its adapter merged (``merge_adapter``), another adapter active
        (``set_adapter``), or adapters disabled (inside ``disable_adapter()``). Flags only."""
        where = f"PEFT layer {name!r}"
        if self.module.merged:
            raise RuntimeError(
                f"{where} has its adapter merged (merge_adapter()): the Cascade would merge "
                "it a second time; call unmerge_adapter() first (nothing was merged)"
            )
        active = list(self.module.active_adapters)
        if active != [self.adapter]:
            raise RuntimeError(
                f"{where}: the active adapters are {active}, the Cascade drives "
                f"{self.adapter!r}; set_adapter({self.adapter!r}) first (nothing was merged)"
            )
        if self.module.disable_adapters:
            raise RuntimeError(
                f"{where} has its adapters disabled (inside disable_adapter()): the model "
                "trained is not the one it computes; leave the context first (nothing "
                "was merged)"
            )

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """The base ``nn.Linear`` (it holds every merge), what ``finalize`` puts back."""
        if dtype is not None:
            raise ValueError("a PEFT layer finalizes to its own base layer, in its dtype")
        return self.module.base_layer


def _check_peft_layer(name: str, module: nn.Module) -> str:
    """The one active adapter of the PEFT ``lora.Linear`` ``module``, which LoRASC can drive."""
    adapters = list(module.active_adapters)
    where = f"PEFT layer {name!r}"
    if len(adapters) != 1:
        raise ValueError(
            f"{where} has {len(adapters)} active adapters {adapters}: LoRASC drives exactly one"
        )
    adapter = adapters[0]
    if type(module.base_layer) is not nn.Linear:
        raise ValueError(
            f"{where}: its base layer is a {type(module.base_layer).__name__}, "
            "LoRASC merges into nn.Linear base layers only"
        )
    if module.merged:
        raise ValueError(f"{where} has its adapter merged (merge_adapter): unmerge it first")
    if module.use_dora.get(adapter, False) or module.lora_bias.get(adapter, False):
        raise ValueError(f"{where} uses DoRA or a LoRA bias, which LoRASC cannot merge")
    return adapter


def peft_lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT LoRA layer of ``model`` by its dotted name (none without PEFT)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def peft_lora_layers(model: nn.Module) -> dict[str, PeftLoraLayer]:
    """Every PEFT ``lora.Linear`` of ``model`` by its dotted name, each as the same
    :class:`PeftLoraLayer` on every call (kept on the module); one LoRASC cannot drive
    raises ``ValueError`` naming it."""
    configs = getattr(model, "peft_config", {})
    layers = {}
    for name, module in peft_lora_modules(model).items():
        adapter = _check_peft_layer(name, module)
        init = getattr(configs.get(adapter), "init_lora_weights", True)
        if init not in _INITS:
            raise ValueError(
                f"PEFT layer {name!r}: init_lora_weights={init!r}; LoRASC draws "
                f"each fast LoRA afresh as {_INITS} do"
            )
        view = module.__dict__.get("_lorasc_layer")
        if view is None or (view.adapter, view.init_lora_weights) != (adapter, init):
            view = PeftLoraLayer(module, adapter, init)
            module.__dict__["_lorasc_layer"] = view  # a plain attribute, not a submodule
        layers[name] = view
    return layers


def _fused_forward(module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``module``'s forward through the fused kernel, or PEFT's own where its adapter is
    off (``disable_adapters``, merged, or another adapter active)."""
    view = module.__dict__["_lorasc_layer"]
    if (
        module.disable_adapters
        or module.merged
        or args
        or kwargs
        or list(module.active_adapters) != [view.adapter]
    ):
        return type(module).forward(module, x, *args, **kwargs)
    base = module.base_layer
    return lorasc_linear(
        x,
        base.weight,
        base.bias,
        view.lora_A,
        view.lora_B,
        view.scaling,
        dropout_p=view.dropout_p if module.training else 0.0,
        backend=view.backend,
    )


def use_fused_kernels(model: nn.Module) -> dict[str, PeftLoraLayer]:
    """Route every PEFT ``lora.Linear`` forward of ``model`` through the fused kernel
    (``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` as ``LoRASCLinear`` computes it, dropout
    included). Returns the layers; calling it again changes nothing."""
    layers = peft_lora_layers(model)
    if not layers:
        raise ValueError("model has no PEFT LoRA layer (peft.get_peft_model makes them)")
    for layer in layers.values():
        module = layer.module
        # a partial of a module-level function: the model still pickles (torch.save)
        module.forward = functools.partial(_fused_forward, module)
    return layers


def base_weights(layers: dict[str, PeftLoraLayer]) -> dict[str, torch.Tensor]:
    """Copies of the base weights (this rank's rows) of PEFT layers: they hold every merge,
    and a PEFT checkpoint (``save_pretrained``, the Trainer's) keeps the adapter only."""
    return {
        name: local_row_block(layer.weight.detach())[0].clone() for name, layer in layers.items()
    }


def load_base_weights(layers: dict[str, PeftLoraLayer], saved, where: str) -> None:
    """Put :func:`base_weights` ``saved`` (read from ``where``) back, every one checked (shape,
    dtype, finite) before the first is copied."""
    if not isinstance(saved, dict) or list(saved) != list(layers):
        raise ValueError(f"{where} must hold the base weights of the PEFT layers {list(layers)}")
    for name, layer in layers.items():
        checks.check_saved_like(
            f"{where}[{name!r}]", saved[name], local_row_block(layer.weight.detach())[0]
        )
    with torch.no_grad():
        for name, layer in layers.items():
            local_row_block(layer.weight.detach())[0].copy_(saved[name])


def plain_model(model: nn.Module) -> tuple[nn.Module, str]:
    """``(plain model, prefix)``: a PEFT model's base model (``get_base_model()``) and the
    prefix of its names in the PEFT model (``base_model.model.``); any other model and ``""``."""
    try:
        from peft import PeftModel
    except ImportError:
        return model, ""
    if isinstance(model, PeftModel):
        return model.get_base_model(), PEFT_PREFIX
    return model, ""


def keep_base_weights_in_saves(model: nn.Module, names: list[str]) -> None:
    """Make ``save_pretrained`` of the PEFT model ``model`` (and so ``Trainer.save_model``
    and its checkpoints) write the base ``weight``/``bias`` of the PEFT layers ``names``
    into each adapter file it writes, under the keys ``<name>.base_layer.weight``, where
    ``PeftModel.from_pretrained`` loads them back (it loads any key that is not an adapter
    weight as it is). A Cascade merges its training into those base weights, which a PEFT
    save would otherwise leave out. A ``model`` that is no ``PeftModel`` is left alone."""
    if plain_model(model)[1] != PEFT_PREFIX:
        return
    model.__dict__["save_pretrained"] = functools.partial(
        _save_pretrained_with_base_weights, model, tuple(names)
    )


def _save_pretrained_with_base_weights(model, names, *args, **kwargs) -> None:
    """``PeftModel.save_pretrained(*args, **kwargs)``, then the base weights of the layers
    ``names`` (from the ``state_dict`` argument, else the model's) added to each adapter
    file written; a ``state_dict`` that is not the PEFT model's is refused first."""
    save = type(model).save_pretrained
    arguments = inspect.signature(save).bind(model, *args, **kwargs).arguments
    options = {**arguments.pop("kwargs", {}), **arguments}
    state = options.get("state_dict")
    source = model.state_dict() if state is None else state
    base = {}
    for name in names:
        for part in ("weight", "bias"):
            # a driven layer's base parameter; after finalize() the plain linear's
            key = next(
                (k for k in (f"{name}.base_layer.{part}", f"{name}.{part}") if k in source), None
            )
            if key is not None:
                tensor = full_tensor(source[key].detach())
                base[f"{name}.base_layer.{part}"] = tensor.to("cpu").contiguous()  # read at once
            elif part == "weight":
                raise ValueError(
                    f"save_pretrained(state_dict=...) holds no weight of the PEFT layer "
                    f"{name!r}, whose base weight holds the Cascade's merges: pass the PEFT "
                    "model's own state dict (a Cascade.merged_state_dict() is the plain "
                    "model's: save it with peft_model.get_base_model().save_pretrained("
                    "path, state_dict=...))"
                )
    save(model, *args, **kwargs)
    if not options.get("is_main_process", True):
        return
    folder = Path(options["save_directory"])
    for adapter in options.get("selected_adapters") or list(model.peft_config):
        _add_to_adapter_file(folder / adapter if adapter != "default" else folder, base)


def _add_to_adapter_file(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add ``tensors`` to the adapter file PEFT wrote in ``folder`` (safetensors or
    ``.bin``), rewritten atomically (:func:`~lorasc_kernels._files.atomic_write`)."""
    safetensors_file = folder / "adapter_model.safetensors"
    if safetensors_file.exists():
        from safetensors.torch import load_file, save_file

        path, tensors = safetensors_file, {**load_file(safetensors_file), **tensors}
        write = functools.partial(save_file, metadata={"format": "pt"})
    else:
        path = folder / "adapter_model.bin"
        tensors = {**torch.load(path, weights_only=True), **tensors}
        write = torch.save
    atomic_write(path, lambda file: write(tensors, file))
