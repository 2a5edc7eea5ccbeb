"""Float64 oracle for the sparse-plus-low-rank op (SLTrain's own formula: build the dense
W = s·B A, scatter-add the sparse values, call a dense linear), and SLTrain's training
algorithm written in eager PyTorch from the paper's description (dense W rebuilt in forward
and backward, the dense dW = dyᵀx formed and the factor and sparse gradients read from it),
used by the tests for equivalence and by the benchmark as the baseline."""

import torch
import torch.nn.functional as F


def dense_weight(lora_a, lora_b, sparse_values, *, indices=None, columns=None, scale=1.0, dtype=torch.float64):
    """W = s·B A + S, (out, in), every operand cast to `dtype`. S from flat row-major
    `indices` (values (nnz,)) or from `columns` (values (out, n)). Differentiable."""
    w = (lora_b.to(dtype) @ lora_a.to(dtype)) * scale
    v = sparse_values.to(dtype)
    if indices is not None:
        w = w.reshape(-1).index_add(0, indices, v).reshape(w.shape)
    elif columns is not None:
        w = w.index_add(1, columns, v)
    return w


def sparse_lowrank_linear(x, lora_a, lora_b, sparse_values, bias=None, *, indices=None, columns=None, scale=1.0,
                          dtype=torch.float64):
    """x Wᵀ + b with the dense W of :func:`dense_weight`, in `dtype`. Differentiable."""
    w = dense_weight(lora_a, lora_b, sparse_values, indices=indices, columns=columns, scale=scale, dtype=dtype)
    return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))


class _SLTrainLinear(torch.autograd.Function):
    """SLTrain's layer: forward rebuilds W = s·B A, scatter-adds the values, runs a dense
    linear; backward rebuilds W for dx, forms the dense dW = dyᵀx, and takes
    dA = s·Bᵀ dW, dB = s·dW Aᵀ, dv = dW at the support."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, values, indices, bias, scale):
        w = (lora_b @ lora_a).mul_(scale)
        w.view(-1).index_add_(0, indices, values)
        ctx.save_for_backward(x, lora_a, lora_b, values, indices)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        x, lora_a, lora_b, values, indices = ctx.saved_tensors
        s = ctx.scale
        w = (lora_b @ lora_a).mul_(s)
        w.view(-1).index_add_(0, indices, values)
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = (dy2 @ w).view(x.shape)
        dw = dy2.t() @ x2
        da = (lora_b.t() @ dw).mul_(s)
        db = (dw @ lora_a.t()).mul_(s)
        dv = dw.view(-1)[indices]
        dbias = dy2.sum(0) if ctx.has_bias else None
        return dx, da, db, dv, None, dbias, None


def sltrain_linear(x, lora_a, lora_b, sparse_values, indices, bias=None, *, scale=1.0):
    """SLTrain's algorithm in eager PyTorch, in the inputs' dtype (all one dtype)."""
    return _SLTrainLinear.apply(x, lora_a, lora_b, sparse_values, indices, bias, float(scale))
