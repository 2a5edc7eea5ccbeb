"""Fake kernels, autograd and public wrappers, one module per op family."""

from . import common, lora, multi_lora  # noqa: F401
