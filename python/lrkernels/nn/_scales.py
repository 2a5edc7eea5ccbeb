"""The optional per-rank gate / per-output scale tensors and the dropout probability of the
LoRA-family modules (LoRALinear, MultiLoRALinear): validated and registered one way."""

import torch
from torch import nn


def check_adapter_options(owner: str, dropout: float, **scales):
    """ValueError naming the argument for a dropout outside [0, 1) or a scale kind that is not
    None, "parameter" or "buffer"."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout}")
    for name, kind in scales.items():
        if kind not in (None, "parameter", "buffer"):
            raise ValueError(f"{owner}: {name} must be None, 'parameter' or 'buffer', got {kind!r}")


def register_scale(module: nn.Module, name: str, kind, init: torch.Tensor):
    """``module.<name>``: a trained Parameter ("parameter"), a saved, untrained buffer ("buffer")
    or None, initialised to `init`."""
    if kind == "parameter":
        module.register_parameter(name, nn.Parameter(init))
    elif kind == "buffer":
        module.register_buffer(name, init)
    else:
        setattr(module, name, None)
