"""nn.Module layers built on the lrkernels ops."""

from .c3a import C3ALinear, convert_peft_c3a
from .lora import LoRALinear
from .miss import MiSSLinear, convert_peft_miss, load_bone_checkpoint
from .multi_lora import MultiLoRALinear, multi_lora_from_peft, set_multi_lora_batch

__all__ = ["LoRALinear", "MultiLoRALinear", "multi_lora_from_peft", "set_multi_lora_batch", "C3ALinear",
           "convert_peft_c3a", "MiSSLinear", "convert_peft_miss", "load_bone_checkpoint"]
