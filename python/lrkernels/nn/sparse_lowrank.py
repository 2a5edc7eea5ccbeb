"""SparseLowRankLinear: a fully trainable linear layer W = s·B A + S (SLTrain, LOST) on
sparse_lowrank_linear, and a converter for every nn.Linear of a model."""

import math
import re

import torch
from torch import nn

from ..ops.sparse_lowrank import sparse_lowrank_linear, sparse_support
from ..reference.sparse_lowrank import dense_weight

_SUPPORTS = ("random", "columns")


def _nnz_for(density, out_features, in_features, support):
    if not (0.0 <= float(density) <= 1.0):
        raise ValueError(f"SparseLowRankLinear: density must be in [0, 1], got {density!r}")
    if support == "random":
        return int(round(density * out_features * in_features))
    return int(round(density * in_features))  # columns


class SparseLowRankLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W = s·B A + S`` and every tensor trained — SLTrain (S on a fixed
    random support of ``density·out·in`` entries) or LOST (``support="columns"``: S dense on
    ``density·in`` fixed input channels). W is never formed in backward (see
    :func:`lrkernels.sparse_lowrank_linear`); :meth:`to_dense` builds it for inspection.

    SLTrain's initialisation: A kaiming-uniform, B zeros, values uniform ±1/√in, the support a
    fixed random draw (from ``generator`` when given), bias as nn.Linear's. ``s = alpha / r``
    (``alpha=None``: s = 1).
    The support is held in buffers: ``sparse_indices`` (int64 flat row-major indices, the
    order of ``sparse_values``) and ``sparse_support`` (its int32 compressed form) for random;
    ``sparse_columns`` for columns."""

    def __init__(self, in_features, out_features, r, density, *, support="random", alpha=None, bias=True,
                 device=None, dtype=None, generator=None):
        super().__init__()
        if support not in _SUPPORTS:
            raise ValueError(f"SparseLowRankLinear: support must be one of {_SUPPORTS}, got {support!r}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"SparseLowRankLinear: r must be a positive int, got {r!r}")
        nnz = _nnz_for(density, out_features, in_features, support)
        fk = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r, self.density = in_features, out_features, r, float(density)
        self.support_kind = support
        self.alpha = alpha
        self.scaling = 1.0 if alpha is None else float(alpha) / r
        self.lora_a = nn.Parameter(torch.empty(r, in_features, **fk))
        self.lora_b = nn.Parameter(torch.zeros(out_features, r, **fk))
        if support == "random":
            flat = torch.randperm(out_features * in_features, generator=generator)[:nnz]
            sup = sparse_support(out_features, in_features, indices=flat)
            self.register_buffer("sparse_indices", flat.to(device))
            self.register_buffer("sparse_support", sup.tensor.to(device))
            self.sparse_values = nn.Parameter(torch.empty(nnz, **fk))
        else:
            cols = torch.randperm(in_features, generator=generator)[:nnz].sort().values
            self.register_buffer("sparse_columns", cols.to(device))
            self.sparse_values = nn.Parameter(torch.empty(out_features, nnz, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk)) if bias else None
        self.reset_parameters(generator=generator)

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        """SLTrain's initialisation (the support is kept)."""
        bound_a = 1 / math.sqrt(self.in_features) if self.in_features else 0.0  # kaiming_uniform, a = √5
        self.lora_a.uniform_(-bound_a, bound_a, generator=generator)
        self.lora_b.zero_()
        bound = 1 / math.sqrt(self.in_features) if self.in_features else 0.0
        self.sparse_values.uniform_(-bound, bound, generator=generator)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound, generator=generator)

    def _support_tensor(self):
        return self.sparse_support if self.support_kind == "random" else self.sparse_columns

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, r, density, *, support="random", init="svd", alpha=None,
                    generator=None):
        """A SparseLowRankLinear of `linear`'s shape, dtype and device.

        ``init="svd"``: s·B A is the top-r SVD of the weight (√σ split between the factors) and
        S the residual W − s·B A on the support; for ``support="columns"`` the n input channels
        with the largest residual norm (LOST-style). ``init="random"``: SLTrain's fresh
        initialisation. The bias is copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLowRankLinear.from_linear: linear must be an nn.Linear, "
                            f"got {type(linear).__name__}")
        if init not in ("svd", "random"):
            raise ValueError(f"SparseLowRankLinear.from_linear: init must be 'svd' or 'random', got {init!r}")
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, r, density, support=support, alpha=alpha,
                bias=linear.bias is not None, device=w.device, dtype=w.dtype, generator=generator)
        if linear.bias is not None:
            m.bias.copy_(linear.bias)
        if init == "random":
            return m
        w64 = w.detach().to(torch.float64)
        u, sv, vh = torch.linalg.svd(w64, full_matrices=False)
        k = min(r, sv.numel())
        root = (sv[:k] / m.scaling).sqrt()
        b = torch.zeros(m.out_features, r, dtype=torch.float64, device=w.device)
        a = torch.zeros(r, m.in_features, dtype=torch.float64, device=w.device)
        b[:, :k] = u[:, :k] * root
        a[:k] = root[:, None] * vh[:k]
        m.lora_a.copy_(a)
        m.lora_b.copy_(b)
        resid = w64 - m.scaling * (b @ a)
        if support == "random":
            m.sparse_values.copy_(resid.reshape(-1)[m.sparse_indices])
        else:
            n = m.sparse_columns.numel()
            cols = resid.norm(dim=0).topk(n).indices.sort().values if n else m.sparse_columns
            m.sparse_columns.copy_(cols)
            m.sparse_values.copy_(resid[:, cols])
        return m

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """W = s·B A + S, (out_features, in_features), in lora_a's dtype (computed in float32,
        float64 for float64)."""
        acc = torch.float64 if self.lora_a.dtype == torch.float64 else torch.float32
        kw = {"indices": self.sparse_indices} if self.support_kind == "random" else {"columns": self.sparse_columns}
        return dense_weight(self.lora_a, self.lora_b, self.sparse_values, scale=self.scaling, dtype=acc,
                            **kw).to(self.lora_a.dtype)

    def to_linear(self) -> nn.Linear:
        """An nn.Linear with weight :meth:`to_dense` (for export)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.lora_a.device, dtype=self.lora_a.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x):
        return sparse_lowrank_linear(x, self.lora_a, self.lora_b, self.sparse_values, self._support_tensor(),
                                     self.bias, scale=self.scaling)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"density={self.density:g}, support={self.support_kind!r}, scaling={self.scaling:g}, "
                f"bias={self.bias is not None}")


def _count(model):
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


def convert_to_sparse_lowrank(model: nn.Module, r, density, *, target_modules=("attn", "attention", "mlp"),
                              support="random", init="svd", alpha=None, generator=None) -> dict:
    """Replace, in place, every nn.Linear of `model` whose qualified name matches one of
    `target_modules` (substrings, or compiled regular expressions; SLTrain's script converts the
    attention and MLP projections) by a :class:`SparseLowRankLinear` (see its from_linear).
    Returns ``{"replaced": [names], "params_before", "params_after", "trainable_before",
    "trainable_after"}``."""
    pats = [re.compile(p) if isinstance(p, str) and any(ch in p for ch in "^$*[](|)\\?+") else p
            for p in target_modules]

    def match(name):
        return any((p.search(name) is not None) if isinstance(p, re.Pattern) else (p in name) for p in pats)

    before, trainable_before = _count(model)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and match(n)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseLowRankLinear.from_linear(mod, r, density, support=support, init=init,
                                                               alpha=alpha, generator=generator))
    after, trainable_after = _count(model)
    return {"replaced": [n for n, _ in targets], "params_before": before, "params_after": after,
            "trainable_before": trainable_before, "trainable_after": trainable_after}
