"""nn.Module layers built on the lrkernels ops."""

from .c3a import C3ALinear, convert_peft_c3a
from .lora import LoRALinear
from .multi_lora import MultiLoRALinear, multi_lora_from_peft, set_multi_lora_batch

__all__ = ["LoRALinear", "MultiLoRALinear", "multi_lora_from_peft", "set_multi_lora_batch", "C3ALinear",
           "convert_peft_c3a"]
