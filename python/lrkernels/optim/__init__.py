"""Optimizers built on the lrkernels ops."""

from .fira import FiraAdamW
from .galore import GaLoreAdamW
from .param_groups import galore_param_groups

__all__ = ["GaLoreAdamW", "FiraAdamW", "galore_param_groups"]
