"""nn.Module layers built on the lrkernels ops."""

from .lora import LoRALinear

__all__ = ["LoRALinear"]
