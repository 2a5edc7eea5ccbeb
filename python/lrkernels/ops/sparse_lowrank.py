"""Sparse plus low-rank linear layers (SLTrain, LOST): the support, fake kernels, autograd and
public wrappers."""

import torch

from ._autocast import register_autocast
from ._util import bind, needs_grad, nvtx_range, register_fake

_compress = torch.ops.lrkernels.sparse_support_compress.default
_fwd = torch.ops.lrkernels.sparse_lowrank_linear.default
_bwd = torch.ops.lrkernels.sparse_lowrank_linear_backward.default


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class SparseSupport:
    """The fixed support of S, built once per layer (:func:`sparse_support`).

    ``kind`` is ``"random"`` (SLTrain: ``nnz`` positions given as flat row-major indices into
    (out, in)) or ``"columns"`` (LOST: S dense on ``n`` input channels). ``tensor`` is what the
    op takes: the int32 compressed support (row- and column-compressed indices, see
    csrc/registration.cpp) or the int64 column indices. ``indices`` keeps the flat indices of a
    random support (in the caller's order, the order of sparse_values), ``columns`` the
    channels of a columns support."""

    __slots__ = ("kind", "out_features", "in_features", "tensor", "indices", "columns")

    def __init__(self, kind, out_features, in_features, tensor, indices=None, columns=None):
        self.kind, self.out_features, self.in_features = kind, out_features, in_features
        self.tensor, self.indices, self.columns = tensor, indices, columns

    @property
    def nnz(self):
        """Number of entries of S (out·n for a columns support)."""
        if self.kind == "random":
            return self.indices.numel()
        return self.out_features * self.columns.numel()

    @property
    def values_shape(self):
        """The shape sparse_values must have: (nnz,) or (out_features, n)."""
        if self.kind == "random":
            return (self.indices.numel(),)
        return (self.out_features, self.columns.numel())

    def to(self, device):
        f = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SparseSupport(self.kind, self.out_features, self.in_features, f(self.tensor), f(self.indices),
                             f(self.columns))

    def __repr__(self):
        return (f"SparseSupport(kind={self.kind!r}, out_features={self.out_features}, "
                f"in_features={self.in_features}, nnz={self.nnz})")


def sparse_support(out_features, in_features, *, indices=None, columns=None) -> SparseSupport:
    """Build the support of S for an (out_features, in_features) weight, once per layer.

    Exactly one of:
        indices: int64 ``(nnz,)`` unique flat row-major indices into (out, in), in any order (as
            SLTrain stores them); sparse_values then has shape ``(nnz,)`` in the same order.
        columns: int64 ``(n,)`` distinct input channels (LOST); sparse_values has shape
            ``(out_features, n)``.

    Out-of-range or duplicate indices/columns raise IndexError/ValueError naming the argument.
    The compressed form is built on the CPU (once per layer) and moved to the indices' device.
    """
    out_features, in_features = int(out_features), int(in_features)
    if (indices is None) == (columns is None):
        raise ValueError("lrkernels.sparse_support: give exactly one of indices= (random support) or columns=")
    if out_features < 0 or in_features < 0:
        raise ValueError(f"lrkernels.sparse_support: out_features and in_features must be >= 0, "
                         f"got {out_features} and {in_features}")
    which, t = ("indices", indices) if indices is not None else ("columns", columns)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lrkernels.sparse_support: {which} must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"lrkernels.sparse_support: {which} must be int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"lrkernels.sparse_support: {which} must be 1-D, got shape {tuple(t.shape)}")
    if indices is not None:
        packed = _compress(indices.detach().cpu(), out_features, in_features).to(indices.device)
        return SparseSupport("random", out_features, in_features, packed, indices=indices.detach())
    c = columns.detach()
    cc = c.cpu()
    if cc.numel():
        bad = (cc < 0) | (cc >= in_features)
        if bad.any():
            k = int(bad.nonzero()[0])
            raise IndexError(f"lrkernels.sparse_support: columns[{k}] = {int(cc[k])} is out of range for "
                             f"in_features = {in_features}")
        if torch.unique(cc).numel() != cc.numel():
            raise ValueError("lrkernels.sparse_support: columns has duplicate entries")
    return SparseSupport("columns", out_features, in_features, c, columns=c)


def _support_tensor(sparse_support):
    return sparse_support.tensor if isinstance(sparse_support, SparseSupport) else sparse_support


# ---------------------------------------------------------------------------- fakes

def _check_shapes(op, x, lora_a, lora_b, sparse_values, sparse_support):
    torch._check(x.dim() >= 1, lambda: f"lrkernels.{op}: x must have shape (..., in_features)")
    torch._check(lora_a.dim() == 2 and lora_a.shape[1] == x.shape[-1],
                 lambda: f"lrkernels.{op}: lora_a must have shape (r, in_features), got {tuple(lora_a.shape)} "
                         f"for x of shape {tuple(x.shape)}")
    torch._check(lora_b.dim() == 2 and lora_b.shape[1] == lora_a.shape[0],
                 lambda: f"lrkernels.{op}: lora_b must have shape (out_features, r), got {tuple(lora_b.shape)} "
                         f"for lora_a of shape {tuple(lora_a.shape)}")
    out, din = lora_b.shape[0], x.shape[-1]
    torch._check(sparse_support.dim() == 1, lambda: f"lrkernels.{op}: sparse_support must be 1-D")
    if sparse_values.dim() == 2:
        torch._check(sparse_support.dtype == torch.int64 and sparse_values.shape[0] == out
                     and sparse_values.shape[1] == sparse_support.shape[0],
                     lambda: f"lrkernels.{op}: sparse_values must have shape (out_features, n) for n columns")
    else:
        torch._check(sparse_values.dim() == 1, lambda: f"lrkernels.{op}: sparse_values must be 1-D or 2-D")
        if sparse_support.dtype == torch.int32:
            torch._check(sparse_support.shape[0] == out + din + 2 + 4 * sparse_values.shape[0],
                         lambda: f"lrkernels.{op}: sparse_values must have shape (nnz,) (nnz from sparse_support)")
        else:
            torch._check(sparse_support.shape[0] == sparse_values.shape[0],
                         lambda: f"lrkernels.{op}: sparse_values must have shape (nnz,) = sparse_support's length")


@register_fake("sparse_support_compress")
def _compress_fake(indices, out_features, in_features):
    return indices.new_empty((out_features + in_features + 2 + 4 * indices.shape[0],), dtype=torch.int32)


@register_fake("sparse_lowrank_linear")
def _fwd_fake(x, lora_a, lora_b, sparse_values, sparse_support, bias, scale):
    _check_shapes("sparse_lowrank_linear", x, lora_a, lora_b, sparse_values, sparse_support)
    return x.new_empty((*x.shape[:-1], lora_b.shape[0]))


@register_fake("sparse_lowrank_linear_backward")
def _bwd_fake(grad_out, x, lora_a, lora_b, sparse_values, sparse_support, scale, output_mask):
    _check_shapes("sparse_lowrank_linear_backward", x, lora_a, lora_b, sparse_values, sparse_support)
    like = (x, lora_a, lora_b, sparse_values)
    out = [torch.empty_like(t, memory_format=torch.contiguous_format) if w else None
           for w, t in zip(output_mask[:4], like)]
    out.append(x.new_empty((lora_b.shape[0],), dtype=_acc_dtype(x)) if output_mask[4] else None)
    return tuple(out)


# ---------------------------------------------------------------------------- autograd

_GRAD_NAMES = ("x", "lora_a", "lora_b", "sparse_values", "bias")


def _setup_context(ctx, inputs, output):
    a = bind(_fwd, inputs)
    # only the inputs: backward recomputes s·x Aᵀ (see csrc/sparse_lowrank/sparse_lowrank_cpu.cpp)
    ctx.save_for_backward(a["x"], a["lora_a"], a["lora_b"], a["sparse_values"], a["sparse_support"])
    ctx.scale = a["scale"]
    ctx.bias_dtype = a["bias"].dtype if a["bias"] is not None else None
    ctx.output_mask = [needs_grad(ctx, _fwd, n) for n in _GRAD_NAMES]


def _backward(ctx, grad_y):
    x, lora_a, lora_b, values, support = ctx.saved_tensors
    gx, ga, gb, gv, gbias = _bwd(grad_y.contiguous(), x, lora_a, lora_b, values, support, ctx.scale,
                                 ctx.output_mask)
    if gbias is not None:
        gbias = gbias.to(ctx.bias_dtype)
    return gx, ga, gb, gv, None, gbias, None  # x, lora_a, lora_b, sparse_values, sparse_support, bias, scale


torch.library.register_autograd("lrkernels::sparse_lowrank_linear", _backward, setup_context=_setup_context)
# under torch.autocast x computes in the autocast dtype; the factors, values and bias are
# trainable tensors kept as they are (float32 on a low-precision x is the mixed-precision rule)
register_autocast("sparse_lowrank_linear", ("x",))


# ---------------------------------------------------------------------------- public wrapper

def sparse_lowrank_linear(x, lora_a, lora_b, sparse_values, sparse_support, bias=None, *, scale=1.0):
    """``y = x Wᵀ + b`` with ``W = scale · lora_b @ lora_a + S`` — SLTrain / LOST — computed
    through the factors and the support; the (out, in) W is never formed in backward.

    Args:
        x: ``(..., in_features)``.  lora_a: A, ``(r, in_features)``.  lora_b: B, ``(out_features, r)``.
        sparse_values: S's values: ``(nnz,)`` for a random support (in the order of its flat
            indices), ``(out_features, n)`` for a columns support.
        sparse_support: what :func:`sparse_support` returns (built once per layer), or, for a
            random support, a plain int64 tensor of flat row-major indices (compressed on each
            call: slower).
        bias: ``(out_features,)`` or None.  scale: s (SLTrain: α / r).

    Dtypes: x float32/float64/bfloat16 on CPU (float32/float16/bfloat16 on CUDA); A, B, values
    and bias have x's dtype, or float32 on a low-precision x. Products accumulate in float32
    (float64 for float64). Under ``torch.autocast`` x is cast to the autocast dtype.
    Differentiable in x, lora_a, lora_b, sparse_values and bias.

    Forward path on CPU: factored (``s·(x Aᵀ) Bᵀ`` plus the sparse SpMM / gather-GEMM) unless
    building W transiently and running one GEMM costs fewer operations:
    ``out·in·(r + T) < T·r·(in + out) + sparse cost`` (many tokens and r close to the width;
    never with few tokens). Backward is always factored, and saves memory rather than a GEMM:
    the forward keeps only its inputs and backward recomputes ``s·x Aᵀ`` by chunks of tokens,
    so a training step allocates less than a dense layer's (output, gradients and scratch).
    """
    with nvtx_range("lrkernels.sparse_lowrank_linear"):
        return _fwd(x, lora_a, lora_b, sparse_values, _support_tensor(sparse_support), bias, float(scale))
