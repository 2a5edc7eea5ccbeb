"""DoRA with dropout on CPU: the dropout complement (x ⊙ dropped) Wᵀ — fake kernels, autograd,
public wrapper. Used by the PEFT integration's DoRA path (lrkernels.integrations.peft)."""

import torch

from ._util import register_fake, seed_tensor

_fwd = torch.ops.lrkernels.dropout_complement_linear.default
_bwd = torch.ops.lrkernels.dropout_complement_linear_backward.default


@register_fake("dropout_complement_linear")
def _fwd_fake(x, weight, seed, dropout_p):
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: f"lrkernels.dropout_complement_linear: weight must have shape (out_features, "
                         f"in_features), got {tuple(weight.shape)} for x of shape {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@register_fake("dropout_complement_linear_backward")
def _bwd_fake(grad_out, weight, seed, dropout_p):
    torch._check(weight.dim() == 2 and weight.shape[0] == grad_out.shape[-1],
                 lambda: "lrkernels.dropout_complement_linear_backward: grad_out must have shape (..., out_features)")
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight, seed, p = inputs
    ctx.save_for_backward(weight, seed)
    ctx.p = p


def _backward(ctx, grad_y):
    weight, seed = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise NotImplementedError("lrkernels.dropout_complement_linear: no gradient for weight; it must be frozen "
                                  "(requires_grad=False)")
    gx = _bwd(grad_y.contiguous(), weight, seed, ctx.p) if ctx.needs_input_grad[0] else None
    return gx, None, None, None


torch.library.register_autograd("lrkernels::dropout_complement_linear", _backward, setup_context=_setup_context)


def dropout_complement_linear(x, weight, seed, dropout_p):
    """``(x ⊙ dropped) Wᵀ``: the part of ``x Wᵀ`` that the inverted-dropout mask of
    (``seed``, ``dropout_p``) removes, computed from the dropped entries only (a fraction p of a
    GEMM). The mask is :func:`lrkernels.dropout_mask`'s (rows = the tokens of x, cols = its
    features), so with ``x_d = x ⊙ dropout_mask(...)`` one has
    ``x_d Wᵀ = keep_scale · (x Wᵀ − dropout_complement_linear(x, W, seed, p))``, ``keep_scale`` =
    the mask's nonzero value. DoRA with dropout needs ``x_d Wᵀ`` next to ``x Wᵀ``; this replaces
    its second GEMM, forward and backward.

    Args:
        x: ``(..., in_features)``, float32 or float64, CPU.
        weight: ``(out_features, in_features)``, x's dtype; frozen (no gradient is computed for it:
            a backward that needs one raises).
        seed: an int or a one-element int64 tensor on x's device.
        dropout_p: in [0, 1); 0 gives zeros.
    Differentiable in x.
    """
    if not isinstance(seed, torch.Tensor):
        seed = seed_tensor(seed, x.device)
    return _fwd(x, weight, seed, float(dropout_p))
