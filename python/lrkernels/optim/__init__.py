"""Optimizers built on the lrkernels ops."""

from .fira import FiraAdamW
from .galore import GaLoreAdamW

__all__ = ["GaLoreAdamW", "FiraAdamW"]
