"""Bridges to other training stacks: :mod:`.peft` (PEFT's LoRA configs, models and layers),
:mod:`.peft_adapter` (a run's merged updates as one PEFT adapter) and :mod:`.hf_callback`
(``LoRASCCallback``, a Cascade inside a Hugging Face ``Trainer``).

:data:`DRIVEN_LAYER_FINDERS`: the layers of other libraries a Cascade drives, each as
``(library, find)`` with ``find(model) → {module path: layer}`` returning layers that meet
:class:`~lorasc_kernels.cascade.driven.DrivenLayer` (read by
:func:`~lorasc_kernels.cascade.driven.driven_layers`).
"""

from .peft import peft_lora_layers

__all__ = ["DRIVEN_LAYER_FINDERS"]

DRIVEN_LAYER_FINDERS = (("PEFT", peft_lora_layers),)
