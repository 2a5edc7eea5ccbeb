"""Optimizers built on the lrkernels ops."""

from .galore import FiraAdamW, GaLoreAdamW

__all__ = ["GaLoreAdamW", "FiraAdamW"]
