"""Bone / MiSS (block-affine adapters): fake kernels, autograd and the public wrapper."""

import torch

from ._autocast import register_autocast
from ._util import bind, fake_grads, needs_grad, new_seed, nvtx_range, register_fake

_fwd = torch.ops.lrkernels.miss_linear.default
_bwd = torch.ops.lrkernels.miss_linear_backward.default
_bat_fwd = torch.ops.lrkernels.miss_bat_linear.default
_bat_bwd = torch.ops.lrkernels.miss_bat_linear_backward.default

VARIANTS = ("balance", "bat")


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_base(op, x, weight):
    torch._check(x.dim() >= 1, lambda: f"lrkernels.{op}: x must have shape (..., in_features)")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: f"lrkernels.{op}: weight must have shape (out_features, in_features), "
                         f"got {tuple(weight.shape)} for x of shape {tuple(x.shape)}")


def _check_block(op, x, weight, block):
    _check_base(op, x, weight)
    torch._check(block.dim() == 2, lambda: f"lrkernels.{op}: miss_block must be 2-D (r, out_features) or "
                                           f"(r, mini_r), got shape {tuple(block.shape)}")
    r, cols, out = block.shape[0], block.shape[1], weight.shape[0]
    torch._check(r >= 1 and r <= x.shape[-1],
                 lambda: f"lrkernels.{op}: the block size r = miss_block.size(0) = {r} must be in "
                         f"[1, in_features = {x.shape[-1]}]")
    torch._check(cols == out or (cols >= 1 and out % cols == 0),
                 lambda: f"lrkernels.{op}: miss_block must have shape (r, out_features) or (r, mini_r) with mini_r "
                         f"dividing out_features = {out}, got {tuple(block.shape)}")


def _check_bat_block(op, x, weight, block):
    _check_base(op, x, weight)
    torch._check(block.dim() == 3, lambda: f"lrkernels.{op}: miss_block must be 3-D (out_features / r, r, r), "
                                           f"got shape {tuple(block.shape)}")
    r = block.shape[2]
    torch._check(r >= 1 and x.shape[-1] % r == 0 and weight.shape[0] % r == 0 and r <= x.shape[-1],
                 lambda: f"lrkernels.{op}: the block size r = miss_block.size(2) = {r} must divide in_features = "
                         f"{x.shape[-1]} and out_features = {weight.shape[0]}")
    torch._check(block.shape[0] * r == weight.shape[0] and block.shape[1] == r,
                 lambda: f"lrkernels.{op}: miss_block must have shape (out_features / r, r, r), "
                         f"got {tuple(block.shape)}")


def _grads_like(output_mask, x, weight, block):
    like = (x, weight, None, block)
    return fake_grads(output_mask, like, weight.shape[0], x)


@register_fake("miss_linear")
def _miss_linear_fake(x, weight, bias, miss_block, dropout_p, seed):
    _check_block("miss_linear", x, weight, miss_block)
    lead = x.shape[:-1]
    y = x.new_empty((*lead, weight.shape[0]))
    chunk_sum = x.new_empty((*lead, miss_block.shape[0]), dtype=_acc_dtype(x))
    return y, chunk_sum


@register_fake("miss_linear_backward")
def _miss_linear_backward_fake(grad_out, x, weight, miss_block, chunk_sum, dropout_p, seed, output_mask):
    _check_block("miss_linear_backward", x, weight, miss_block)
    return _grads_like(output_mask, x, weight, miss_block)


@register_fake("miss_bat_linear")
def _miss_bat_linear_fake(x, weight, bias, miss_block):
    _check_bat_block("miss_bat_linear", x, weight, miss_block)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@register_fake("miss_bat_linear_backward")
def _miss_bat_linear_backward_fake(grad_out, x, weight, miss_block, output_mask):
    _check_bat_block("miss_bat_linear_backward", x, weight, miss_block)
    return _grads_like(output_mask, x, weight, miss_block)


# ---------------------------------------------------------------------------- autograd

_GRAD_INPUTS = ("x", "weight", "bias", "miss_block")


def _setup_context(ctx, inputs, output):
    a = bind(_fwd, inputs)
    _, chunk_sum = output
    ctx.mark_non_differentiable(chunk_sum)
    ctx.save_for_backward(a["x"], a["weight"], a["miss_block"], chunk_sum, a["seed"])
    ctx.dropout_p = a["dropout_p"]
    ctx.output_mask = [needs_grad(ctx, _fwd, n) for n in _GRAD_INPUTS]


def _backward(ctx, grad_y, grad_chunk_sum):
    x, weight, block, chunk_sum, seed = ctx.saved_tensors
    gx, gw, gb, gm = _bwd(grad_y.contiguous(), x, weight, block, chunk_sum, ctx.dropout_p, seed, ctx.output_mask)
    return gx, gw, gb, gm, None, None  # x, weight, bias, miss_block, dropout_p, seed


torch.library.register_autograd("lrkernels::miss_linear", _backward, setup_context=_setup_context)


def _bat_setup_context(ctx, inputs, output):
    a = bind(_bat_fwd, inputs)
    ctx.save_for_backward(a["x"], a["weight"], a["miss_block"])
    ctx.output_mask = [needs_grad(ctx, _bat_fwd, n) for n in _GRAD_INPUTS]


def _bat_backward(ctx, grad_y):
    x, weight, block = ctx.saved_tensors
    return _bat_bwd(grad_y.contiguous(), x, weight, block, ctx.output_mask)  # x, weight, bias, miss_block


torch.library.register_autograd("lrkernels::miss_bat_linear", _bat_backward, setup_context=_bat_setup_context)
# under torch.autocast x and the base layer compute in the autocast dtype; the block is an
# adapter tensor and stays as it is (float32 on a bfloat16 base is the mixed-precision rule)
register_autocast("miss_linear", ("x", "weight", "bias"))
register_autocast("miss_bat_linear", ("x", "weight", "bias"))


# ---------------------------------------------------------------------------- public wrapper

def miss_linear(x, weight, bias, miss_block, *, variant="balance", dropout_p=0.0, generator=None):
    """A linear layer with a Bone / MiSS block adapter, fused: ``y = x (W + ΔW)ᵀ + b``.

    Args:
        x: input, shape ``(..., in_features)``.
        weight: base weight W, ``(out_features, in_features)`` (frozen or trainable).
        bias: base bias b, ``(out_features,)`` or None.
        miss_block: M, the trainable block (r the block size):

            * ``variant="balance"`` (PEFT's default MiSS): M of shape ``(r, out_features)``,
              ``ΔW[o, c] = M[c mod r, o]``, i.e. ``y = x Wᵀ + b + (Σ_chunks drop(x)) M`` with x cut
              into ⌈in/r⌉ chunks of r (the last one zero-padded). r ≤ in_features.
            * the mini form is the same variant with a narrower M, ``(r, mini_r)`` with mini_r
              dividing out_features: ``ΔW[o, c] = M[c mod r, o mod mini_r]``.
            * ``variant="bat"``: M of shape ``(out_features / r, r, r)``, r dividing both feature
              counts; for the r×r block (p, q) of W, ``ΔW_pq = W_pq M_p + M_p``. W + ΔW is never
              built whole (neither is the weight gradient when W is frozen).
        variant: ``"balance"`` or ``"bat"``.
        dropout_p: inverted dropout on the adapter's input (balance/mini only; bat has none, as in
            PEFT). The mask comes from a fresh seed drawn on x's device (from ``generator`` if
            given), is never stored, and backward regenerates it.
        generator: a torch.Generator on x's device for the dropout seed.

    Dtypes: x, weight and bias share one (float32/float16/bfloat16 on CUDA, float32/float64/
    bfloat16 on CPU); M has it or float32 on a float16/bfloat16 x (PEFT keeps it in float32). The
    adapter arithmetic runs in float32 (float64 for float64); the output has x's dtype, each
    gradient its own tensor's. Under ``torch.autocast`` x, weight and bias are cast to the
    autocast dtype and M left as it is. Differentiable in x, weight, bias and M (for bat W also
    enters ΔW); each gradient is computed only when required.
    """
    if variant == "balance" or variant == "mini":
        seed = new_seed(x.device, generator) if dropout_p > 0 else None
        with nvtx_range("lrkernels.miss_linear"):
            y, _ = _fwd(x, weight, bias, miss_block, float(dropout_p), seed)
        return y
    if variant == "bat":
        if dropout_p != 0:
            raise ValueError(f"lrkernels.miss_linear: variant 'bat' has no dropout (as in PEFT), got dropout_p = "
                             f"{dropout_p}")
        with nvtx_range("lrkernels.miss_bat_linear"):
            return _bat_fwd(x, weight, bias, miss_block)
    raise ValueError(f"lrkernels.miss_linear: variant must be 'balance' or 'bat' (mini is balance with an "
                     f"(r, mini_r) miss_block), got {variant!r}")
