"""nn.Module layers built on the lrkernels ops."""

from .lora import LoRALinear
from .c3a import C3ALinear, convert_peft_c3a

__all__ = ["LoRALinear", "C3ALinear", "convert_peft_c3a"]
