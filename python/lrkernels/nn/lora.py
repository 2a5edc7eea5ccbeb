"""LoRALinear: a frozen base linear layer plus a trainable low-rank update, on lora_linear."""

import math

import torch
from torch import nn

from ._mergeable import MergeableAdapter
from ._scales import check_adapter_options, register_scale
from ..ops.lora import lora_linear


class LoRALinear(MergeableAdapter, nn.Module):
    """``y = x Wᵀ + b + s · ((g ⊙ (drop(x) Aᵀ)) Bᵀ) ⊙ o`` with W frozen and A, B trained.

    ``s = alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA). Initialised like PEFT's LoRA:
    A Kaiming-uniform, B zeros, so the layer starts equal to its base.

    ``rank_scale`` (g, shape ``(r,)``) and ``out_scale`` (o, ``(out_features,)``) are optional:
    None (absent), ``"parameter"`` (trained; SoRA/AdaLoRA gates, VeRA's λ_d and λ_b) or
    ``"buffer"`` (saved with the model, not trained; DyLoRA's 0/1 truncation mask, see
    :meth:`set_active_rank`), both initialised to ones. They are plain attributes of those names,
    so a VeRA layer can also freeze A and B (shared random projections) and train only g and o.

    ``adapter_dtype``: dtype of A, B, g and o (default: the base's dtype). ``torch.float32`` on a
    bfloat16 base is PEFT's default (``autocast_adapter_dtype``): the adapter path then runs in
    float32, y has the base's dtype and each gradient its parameter's dtype (float32 adapters on
    a low-precision base run on CPU; on CUDA once its kernels take them).
    """

    def __init__(self, in_features, out_features, r, alpha=None, *, bias=True, dropout=0.0,
                 use_rslora=False, rank_scale=None, out_scale=None, adapter_dtype=None, device=None, dtype=None):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRALinear: r must be a positive int, got {r!r}")
        check_adapter_options("LoRALinear", dropout, rank_scale=rank_scale, out_scale=out_scale)
        fk = {"device": device, "dtype": dtype}
        ak = {"device": device, "dtype": dtype if adapter_dtype is None else adapter_dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.alpha = float(r if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.dropout = float(dropout)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **fk), requires_grad=False) if bias else None
        self.lora_a = nn.Parameter(torch.empty(r, in_features, **ak))
        self.lora_b = nn.Parameter(torch.zeros(out_features, r, **ak))
        register_scale(self, "rank_scale", rank_scale, torch.ones(r, **ak))
        register_scale(self, "out_scale", out_scale, torch.ones(out_features, **ak))
        self.merged = False
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @torch.no_grad()
    def set_active_rank(self, k: int):
        """DyLoRA: run the adapter truncated to its first ``k`` ranks (rank_scale = k ones, then
        zeros). Needs ``rank_scale`` ("buffer" or "parameter")."""
        if self.rank_scale is None:
            raise RuntimeError("LoRALinear.set_active_rank: the layer has no rank_scale; build it with "
                               "rank_scale='buffer'")
        if not 0 <= k <= self.r:
            raise ValueError(f"LoRALinear.set_active_rank: k must be in [0, r] = [0, {self.r}], got {k}")
        self.rank_scale.zero_()
        self.rank_scale[:k] = 1

    @classmethod
    def from_linear(cls, base: nn.Linear, r, alpha=None, dropout=0.0, use_rslora=False, *, rank_scale=None,
                    out_scale=None, adapter_dtype=None):
        """Wrap an existing nn.Linear: its weight and bias are shared (not copied) and frozen. The
        adapter tensors get ``adapter_dtype`` (default: the base's dtype)."""
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: base must be an nn.Linear, got {type(base).__name__}")
        m = cls(base.in_features, base.out_features, r, alpha, bias=base.bias is not None, dropout=dropout,
                use_rslora=use_rslora, rank_scale=rank_scale, out_scale=out_scale, adapter_dtype=adapter_dtype,
                device=base.weight.device, dtype=base.weight.dtype)
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
        extra = "".join(f", {n}={'parameter' if isinstance(getattr(self, n), nn.Parameter) else 'buffer'}"
                        for n in ("rank_scale", "out_scale") if getattr(self, n) is not None)
        if self.lora_a.dtype != self.weight.dtype:
            extra += f", adapter_dtype={self.lora_a.dtype}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, use_rslora={self.use_rslora}{extra}, "
                f"merged={self.merged}")
