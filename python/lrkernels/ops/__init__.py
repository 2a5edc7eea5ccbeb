"""Fake kernels, autograd and public wrappers, one module per op family."""

from . import common, lora  # noqa: F401
from . import c3a  # noqa: F401
