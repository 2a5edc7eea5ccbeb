"""C3ALinear: a frozen base linear layer plus a trainable block-circulant update, on c3a_linear."""

import math

import torch
from torch import nn

from ._mergeable import MergeableAdapter
from ..ops.c3a import c3a, c3a_linear

_INITS = ("zeros", "gaussian", "kaiming_uniform", "xavier_uniform")


class C3ALinear(MergeableAdapter, nn.Module):
    """``y = x Wᵀ + b + s · x ΔWᵀ`` with W frozen and the C³A kernel K trained.

    ΔW is block-circulant with block size b (``ΔW[p·b + i, q·b + j] = K[p, q, (j − i) mod b]``,
    K of shape ``(out_features / b, in_features / b, b)``) and is applied through FFTs, never
    built, except by :meth:`delta_weight` and :meth:`merge`. ``scale`` defaults to
    ``1 / in_features`` as in PEFT's C³A. ``init`` follows PEFT's ``init_weights`` options and
    default (xavier_uniform); ``"zeros"`` makes the layer start equal to its base. For a
    float16/bfloat16 layer the kernel is kept in float32 (as PEFT does), so its updates are not
    rounded away.
    """

    def __init__(self, in_features, out_features, block_size, *, bias=True, scale=None, init="xavier_uniform",
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"C3ALinear: block_size must be a positive int, got {block_size!r}")
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if n % block_size != 0:
                raise ValueError(f"C3ALinear: block_size {block_size} must divide {name} = {n}")
        if init not in _INITS:
            raise ValueError(f"C3ALinear: init must be one of {_INITS}, got {init!r}")
        fk = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.scaling = float(1.0 / in_features if scale is None else scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **fk), requires_grad=False) if bias else None
        low_prec = dtype in (torch.float16, torch.bfloat16)
        self.kernel = nn.Parameter(torch.zeros(out_features // block_size, in_features // block_size, block_size,
                                               device=device, dtype=torch.float32 if low_prec else dtype))
        self.merged = False
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_kernel(init)

    @torch.no_grad()
    def reset_kernel(self, init="zeros"):
        """Re-initialise K: zeros, or PEFT's gaussian / kaiming_uniform / xavier_uniform."""
        if init == "zeros":
            self.kernel.zero_()
        elif init == "gaussian":
            nn.init.normal_(self.kernel)
        elif init == "kaiming_uniform":
            a = math.sqrt(1.0 / self.in_features)
            nn.init.uniform_(self.kernel, -a, a)
        elif init == "xavier_uniform":
            a = math.sqrt(3.0) * math.sqrt(2.0 / (self.in_features + self.out_features))
            nn.init.uniform_(self.kernel, -a, a)
        else:
            raise ValueError(f"C3ALinear: init must be one of {_INITS}, got {init!r}")

    @classmethod
    def from_linear(cls, base: nn.Linear, block_size, *, scale=None, init="xavier_uniform"):
        """Wrap an existing nn.Linear: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(base, nn.Linear):
            raise TypeError(f"C3ALinear.from_linear: base must be an nn.Linear, got {type(base).__name__}")
        m = cls(base.in_features, base.out_features, block_size, bias=base.bias is not None, scale=scale,
                init=init, device=base.weight.device, dtype=base.weight.dtype)
        m.weight = base.weight
        m.weight.requires_grad_(False)
        if base.bias is not None:
            m.bias = base.bias
            m.bias.requires_grad_(False)
        return m

    @classmethod
    def from_peft(cls, layer, adapter_name="default"):
        """Convert a PEFT C³A layer (``peft.tuners.c3a.C3ALinear``, unmerged): the base weight and
        bias are shared, the adapter's kernel is copied into this layer's kernel, and the scale
        is PEFT's ``1 / in_features``. A float32 PEFT kernel on a float16/bfloat16 base stays
        float32 (exact conversion)."""
        kernels = getattr(layer, "c3a_kernel", None)
        if kernels is None or adapter_name not in kernels:
            raise ValueError(f"C3ALinear.from_peft: expected a PEFT C3A layer with adapter {adapter_name!r}, "
                             f"got {type(layer).__name__}")
        if getattr(layer, "merged", False):
            raise ValueError("C3ALinear.from_peft: the PEFT layer is merged; unmerge it first")
        base = layer.get_base_layer()
        m = cls.from_linear(base, int(layer.block_size[adapter_name]))
        with torch.no_grad():
            m.kernel.copy_(kernels[adapter_name].detach().to(m.kernel.dtype))
        return m

    def delta_weight(self) -> torch.Tensor:
        """The dense ΔW · s, shape (out_features, in_features), in the weight's dtype. Built with
        the C³A op itself: c3a(I, K) = I ΔWᵀ (in float32, float64 for float64 weights)."""
        acc = torch.float64 if self.kernel.dtype == torch.float64 else torch.float32
        eye = torch.eye(self.in_features, dtype=acc, device=self.kernel.device)
        return c3a(eye, self.kernel.detach().to(acc), scale=self.scaling).T.to(self.weight.dtype)

    def forward(self, x):
        if self.merged:
            return self.merged_forward(x)
        return c3a_linear(x, self.weight, self.bias, self.kernel, scale=self.scaling)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, scaling={self.scaling:g}, merged={self.merged}")


def convert_peft_c3a(model: nn.Module, adapter_name="default") -> int:
    """Replace, in place, every PEFT C³A layer of `model` (one adapter, unmerged) by the
    equivalent :class:`C3ALinear` (see :meth:`C3ALinear.from_peft`). Returns how many were
    replaced. The base weights are shared, not copied."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if hasattr(mod, "c3a_kernel") and adapter_name in getattr(mod, "c3a_kernel", {})]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, C3ALinear.from_peft(mod, adapter_name))
    return len(targets)
