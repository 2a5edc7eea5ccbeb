"""nn.Module layers built on the lrkernels ops."""

from .c3a import C3ALinear, convert_peft_c3a
from .lora import LoRALinear
from .miss import MiSSLinear, convert_peft_miss, load_bone_checkpoint
from .multi_lora import MultiLoRALinear, multi_lora_from_peft, set_multi_lora_batch
from .sparse_lowrank import SparseLowRankLinear, convert_to_sparse_lowrank

__all__ = ["LoRALinear", "MultiLoRALinear", "multi_lora_from_peft", "set_multi_lora_batch", "C3ALinear",
           "convert_peft_c3a", "MiSSLinear", "convert_peft_miss", "load_bone_checkpoint", "SparseLowRankLinear",
           "convert_to_sparse_lowrank"]
