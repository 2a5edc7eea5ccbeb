"""LoRALinear: a frozen base linear layer plus a trainable low-rank update, on lora_linear."""

import math

import torch
from torch import nn

from ._mergeable import MergeableAdapter
from ..ops.lora import lora_linear


class LoRALinear(MergeableAdapter, nn.Module):
    """``y = x Wᵀ + b + s · ((g ⊙ (drop(x) Aᵀ)) Bᵀ) ⊙ o`` with W frozen and A, B trained.

    ``s = alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA). Initialised like PEFT's LoRA:
    A Kaiming-uniform, B zeros, so the layer starts equal to its base. ``rank_scale`` (g) and
    ``out_scale`` (o) are optional buffers/parameters for VeRA-style and gated variants.
    """

    def __init__(self, in_features, out_features, r, alpha=None, *, bias=True, dropout=0.0,
                 use_rslora=False, device=None, dtype=None):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRALinear: r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear: dropout must be in [0, 1), got {dropout}")
        fk = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.alpha = float(r if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.dropout = float(dropout)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **fk), requires_grad=False) if bias else None
        self.lora_a = nn.Parameter(torch.empty(r, in_features, **fk))
        self.lora_b = nn.Parameter(torch.zeros(out_features, r, **fk))
        self.rank_scale = None
        self.out_scale = None
        self.merged = False
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, base: nn.Linear, r, alpha=None, dropout=0.0, use_rslora=False):
        """Wrap an existing nn.Linear: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: base must be an nn.Linear, got {type(base).__name__}")
        m = cls(base.in_features, base.out_features, r, alpha, bias=base.bias is not None, dropout=dropout,
                use_rslora=use_rslora, device=base.weight.device, dtype=base.weight.dtype)
        m.weight = base.weight
        m.weight.requires_grad_(False)
        if base.bias is not None:
            m.bias = base.bias
            m.bias.requires_grad_(False)
        return m

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · diag(o) B diag(g) A, shape (out_features, in_features)."""
        b, a = self.lora_b, self.lora_a
        if self.rank_scale is not None:
            b = b * self.rank_scale
        delta = (b.float() @ a.float()) * self.scaling
        if self.out_scale is not None:
            delta = delta * self.out_scale.float().unsqueeze(1)
        return delta.to(self.weight.dtype)

    def forward(self, x):
        if self.merged:
            return self.merged_forward(x)
        return lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, scale=self.scaling,
                           rank_scale=self.rank_scale, out_scale=self.out_scale,
                           dropout_p=self.dropout if self.training else 0.0)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, use_rslora={self.use_rslora}, merged={self.merged}")
