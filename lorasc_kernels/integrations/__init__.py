"""Bridges to other training stacks: :mod:`.peft` (PEFT's LoRA configs, models and layers),
:mod:`.peft_adapter` (a run's merged updates as one PEFT adapter) and :mod:`.hf_callback`
(``LoRASCCallback``, a Cascade inside a Hugging Face ``Trainer``)."""
