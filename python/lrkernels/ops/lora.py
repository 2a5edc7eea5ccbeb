"""lora_linear: fake kernels, autograd and the public wrapper."""

import torch

from ._autocast import register_autocast
from ._util import bind, fake_grads, needs_grad, new_seed, nvtx_range, register_fake

_fwd = torch.ops.lrkernels.lora_linear.default
_bwd = torch.ops.lrkernels.lora_linear_backward.default

_GRAD_INPUTS = ("x", "weight", "bias", "lora_a", "lora_b", "rank_scale", "out_scale")


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@register_fake("lora_linear")
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scale, rank_scale, out_scale, dropout_p, seed):
    torch._check(x.dim() >= 1, lambda: "lrkernels.lora_linear: x must have shape (..., in_features)")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: f"lrkernels.lora_linear: weight must have shape (out_features, in_features), "
                         f"got {tuple(weight.shape)} for x of shape {tuple(x.shape)}")
    torch._check(lora_a.dim() == 2 and lora_a.shape[1] == x.shape[-1],
                 lambda: f"lrkernels.lora_linear: lora_a must have shape (r, in_features), got {tuple(lora_a.shape)}")
    torch._check(lora_b.dim() == 2 and lora_b.shape[0] == weight.shape[0] and lora_b.shape[1] == lora_a.shape[0],
                 lambda: f"lrkernels.lora_linear: lora_b must have shape (out_features, r), got {tuple(lora_b.shape)}")
    lead = x.shape[:-1]
    y = x.new_empty((*lead, weight.shape[0]))
    hidden = x.new_empty((*lead, lora_a.shape[0]), dtype=_acc_dtype(x))
    return y, hidden


@register_fake("lora_linear_backward")
def _lora_linear_backward_fake(grad_out, x, weight, lora_a, lora_b, hidden, scale, rank_scale, out_scale,
                               dropout_p, seed, output_mask):
    like = (x, weight, None, lora_a, lora_b, rank_scale, out_scale)
    return fake_grads(output_mask, like, weight.shape[0], x)


def _setup_context(ctx, inputs, output):
    a = bind(_fwd, inputs)
    _, hidden = output
    ctx.mark_non_differentiable(hidden)
    ctx.save_for_backward(a["x"], a["weight"], a["lora_a"], a["lora_b"], hidden, a["rank_scale"],
                          a["out_scale"], a["seed"])
    ctx.scale = a["scale"]
    ctx.dropout_p = a["dropout_p"]
    ctx.output_mask = [needs_grad(ctx, _fwd, n) for n in _GRAD_INPUTS]


def _backward(ctx, grad_y, grad_hidden):
    x, weight, lora_a, lora_b, hidden, rank_scale, out_scale, seed = ctx.saved_tensors
    gx, gw, gbias, ga, gb, gg, go = _bwd(grad_y.contiguous(), x, weight, lora_a, lora_b, hidden, ctx.scale,
                                         rank_scale, out_scale, ctx.dropout_p, seed, ctx.output_mask)
    # grads in schema order: x, weight, bias, lora_a, lora_b, scale, rank_scale, out_scale, dropout_p, seed
    return gx, gw, gbias, ga, gb, None, gg, go, None, None


torch.library.register_autograd("lrkernels::lora_linear", _backward, setup_context=_setup_context)
# under torch.autocast x and the base layer compute in the autocast dtype (as nn.Linear does); the
# adapter tensors are left as they are (float32 adapters on a low-precision x: the mixed rule)
register_autocast("lora_linear", ("x", "weight", "bias"))


def lora_linear(x, weight, bias, lora_a, lora_b, *, scale=1.0, rank_scale=None, out_scale=None,
                dropout_p=0.0, generator=None):
    """Fused LoRA linear layer: ``y = x Wᵀ + b + s·((g ⊙ (drop(x) Aᵀ)) Bᵀ) ⊙ o``.

    Args:
        x: input, shape ``(..., in_features)``.
        weight: base weight W, ``(out_features, in_features)`` (frozen or trainable).
        bias: base bias b, ``(out_features,)`` or None.
        lora_a: A, ``(r, in_features)``.  lora_b: B, ``(out_features, r)``.
        scale: s. LoRA: ``alpha / r``; rsLoRA: ``alpha / sqrt(r)``; VeRA: 1.
        rank_scale: g, ``(r,)`` or None: per-rank scale (VeRA's λ_d, SoRA/AdaLoRA gates,
            DyLoRA's 0/1 truncation mask).
        out_scale: o, ``(out_features,)`` or None: per-output scale (VeRA's λ_b).
        dropout_p: inverted dropout on the adapter's input, applied whenever > 0 (modules pass
            0 in eval mode). The mask comes from a fresh seed drawn on x's device (from
            ``generator`` if given), is never stored, and backward regenerates it.
        generator: a torch.Generator on x's device for the dropout seed.

    All tensors are on x's device; x, weight and bias share one dtype: float32/float16/bfloat16 on
    CUDA, float32/float64/bfloat16 on CPU. The adapter tensors (lora_a, lora_b, rank_scale,
    out_scale) have x's dtype or, on a float16/bfloat16 x, float32 (PEFT's default of float32
    adapters on a low-precision base; on CPU for now). The low-rank path accumulates in float32
    (float64 for float64), y has x's dtype and every gradient comes back in its own tensor's
    dtype. Differentiable in x, weight, bias, lora_a, lora_b, rank_scale and out_scale; each
    gradient is computed only when required.
    """
    seed = new_seed(x.device, generator) if dropout_p > 0 else None
    with nvtx_range("lrkernels.lora_linear"):
        y, _ = _fwd(x, weight, bias, lora_a, lora_b, float(scale), rank_scale, out_scale, float(dropout_p), seed)
    return y
