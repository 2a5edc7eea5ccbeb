"""Fake kernels, autograd and public wrappers, one module per op family."""

from . import c3a, common, dora, galore, gqa, lora, miss, multi_lora, sparse_lowrank  # noqa: F401
