"""lrkernels: fast, correct kernels for low-rank methods in PyTorch.

Importing the package loads the native library, which registers every op under
``torch.ops.lrkernels``, then registers their fake (meta) kernels for ``torch.compile`` and
their autograd formulas. Public functions are thin documented wrappers over those ops.
"""

import torch  # noqa: F401  (the native library links against torch: import it first)

from . import _C  # noqa: F401  registers torch.ops.lrkernels.*
from . import ops  # noqa: F401  fakes + autograd for every op
from ._build import (build_info, cuda_kernel_launches, get_cpu_capability, get_cpu_kernels, get_cuda_kernels,
                     has_kernel, registered_ops, set_cpu_capability, set_cpu_kernels, set_cuda_kernels,
                     use_cpu_capability, use_cpu_kernels, use_cuda_kernels)
from .ops.common import dropout_mask
from .ops.lora import lora_linear
from .ops.c3a import c3a, c3a_linear
from .ops.miss import miss_linear
from .ops.multi_lora import (MultiLoraSegments, lora_expand_, lora_shrink, multi_lora_linear,
                              multi_lora_segments)
from .ops.galore import galore_adam_moments, galore_apply_update
from .ops.sparse_lowrank import SparseSupport, sparse_lowrank_linear, sparse_support
from .ops.gqa import gqa_attention
from . import nn, optim, reference  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "registered_ops",
    "has_kernel",
    "get_cpu_kernels",
    "set_cpu_kernels",
    "use_cpu_kernels",
    "get_cpu_capability",
    "set_cpu_capability",
    "use_cpu_capability",
    "get_cuda_kernels",
    "set_cuda_kernels",
    "use_cuda_kernels",
    "cuda_kernel_launches",
    "dropout_mask",
    "lora_linear",
    "MultiLoraSegments",
    "multi_lora_segments",
    "multi_lora_linear",
    "lora_shrink",
    "lora_expand_",
    "c3a",
    "c3a_linear",
    "miss_linear",
    "galore_adam_moments",
    "galore_apply_update",
    "SparseSupport",
    "sparse_support",
    "sparse_lowrank_linear",
    "gqa_attention",
    "nn",
    "optim",
    "reference",
]
