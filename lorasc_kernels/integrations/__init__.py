"""Bridges to other training stacks: :mod:`.peft` (PEFT's LoRA configs, models and layers)."""
