"""nn.Module layers built on the lrkernels ops."""

from .lora import LoRALinear
from .multi_lora import MultiLoRALinear, multi_lora_from_peft, set_multi_lora_batch

__all__ = ["LoRALinear", "MultiLoRALinear", "multi_lora_from_peft", "set_multi_lora_batch"]
