"""Fake kernels, autograd and public wrappers, one module per op family."""

from . import common, galore, lora  # noqa: F401
