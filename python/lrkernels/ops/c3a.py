"""C³A (block-circulant adapter through FFTs): fake kernels, autograd and public wrappers."""

import torch

from ._autocast import register_autocast
from ._util import bind, fake_grads, needs_grad, nvtx_range, register_fake

_fwd = torch.ops.lrkernels.c3a.default
_bwd = torch.ops.lrkernels.c3a_backward.default
_lin_fwd = torch.ops.lrkernels.c3a_linear.default
_lin_bwd = torch.ops.lrkernels.c3a_linear_backward.default


def _spectrum_dtype(x):
    return torch.complex128 if x.dtype == torch.float64 else torch.complex64


def _check_kernel_shape(op, x, kernel, out_features=None):
    torch._check(x.dim() >= 1, lambda: f"lrkernels.{op}: x must have shape (..., in_features)")
    torch._check(kernel.dim() == 3, lambda: f"lrkernels.{op}: kernel must be 3-D (out_features / b, "
                                            f"in_features / b, b), got shape {tuple(kernel.shape)}")
    b = kernel.shape[2]
    torch._check(kernel.shape[1] * b == x.shape[-1],
                 lambda: f"lrkernels.{op}: kernel must have shape (out_features / b, in_features / b, b), "
                         f"got {tuple(kernel.shape)} for x of shape {tuple(x.shape)}")
    if out_features is not None:
        torch._check(kernel.shape[0] * b == out_features,
                     lambda: f"lrkernels.{op}: kernel must have shape (out_features / b, in_features / b, b), "
                             f"got {tuple(kernel.shape)} for out_features = {out_features}")


def _fake_outputs(x, kernel):
    n_out, n_in, b = kernel.shape
    y = x.new_empty((*x.shape[:-1], n_out * b))
    kernel_fft = x.new_empty((n_out, n_in, b // 2 + 1), dtype=_spectrum_dtype(x))
    return y, kernel_fft


@register_fake("c3a")
def _c3a_fake(x, kernel, scale):
    _check_kernel_shape("c3a", x, kernel)
    return _fake_outputs(x, kernel)


@register_fake("c3a_backward")
def _c3a_backward_fake(grad_out, x, kernel, kernel_fft, scale, output_mask):
    _check_kernel_shape("c3a_backward", x, kernel)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else None
    gk = torch.empty_like(kernel, memory_format=torch.contiguous_format) if output_mask[1] else None
    return gx, gk


@register_fake("c3a_linear")
def _c3a_linear_fake(x, weight, bias, kernel, scale):
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: f"lrkernels.c3a_linear: weight must have shape (out_features, in_features), "
                         f"got {tuple(weight.shape)} for x of shape {tuple(x.shape)}")
    _check_kernel_shape("c3a_linear", x, kernel, weight.shape[0])
    return _fake_outputs(x, kernel)


@register_fake("c3a_linear_backward")
def _c3a_linear_backward_fake(grad_out, x, weight, kernel, kernel_fft, scale, output_mask):
    _check_kernel_shape("c3a_linear_backward", x, kernel, weight.shape[0])
    like = (x, weight, None, kernel)
    return fake_grads(output_mask, like, weight.shape[0], x)


# ---------------------------------------------------------------------------- autograd

def _c3a_setup_context(ctx, inputs, output):
    a = bind(_fwd, inputs)
    _, kernel_fft = output
    ctx.mark_non_differentiable(kernel_fft)
    ctx.save_for_backward(a["x"], a["kernel"], kernel_fft)
    ctx.scale = a["scale"]
    ctx.output_mask = [needs_grad(ctx, _fwd, n) for n in ("x", "kernel")]


def _c3a_backward(ctx, grad_y, grad_kernel_fft):
    x, kernel, kernel_fft = ctx.saved_tensors
    gx, gk = _bwd(grad_y.contiguous(), x, kernel, kernel_fft, ctx.scale, ctx.output_mask)
    return gx, gk, None  # x, kernel, scale


torch.library.register_autograd("lrkernels::c3a", _c3a_backward, setup_context=_c3a_setup_context)


def _c3a_linear_setup_context(ctx, inputs, output):
    a = bind(_lin_fwd, inputs)
    _, kernel_fft = output
    ctx.mark_non_differentiable(kernel_fft)
    ctx.save_for_backward(a["x"], a["weight"], a["kernel"], kernel_fft)
    ctx.scale = a["scale"]
    ctx.output_mask = [needs_grad(ctx, _lin_fwd, n) for n in ("x", "weight", "bias", "kernel")]


def _c3a_linear_backward(ctx, grad_y, grad_kernel_fft):
    x, weight, kernel, kernel_fft = ctx.saved_tensors
    gx, gw, gb, gk = _lin_bwd(grad_y.contiguous(), x, weight, kernel, kernel_fft, ctx.scale, ctx.output_mask)
    return gx, gw, gb, gk, None  # x, weight, bias, kernel, scale


torch.library.register_autograd("lrkernels::c3a_linear", _c3a_linear_backward,
                                setup_context=_c3a_linear_setup_context)
# under torch.autocast the input (and the base layer) compute in the autocast dtype; the kernel
# is an adapter tensor and stays as it is
register_autocast("c3a", ("x",))
register_autocast("c3a_linear", ("x", "weight", "bias"))


# ---------------------------------------------------------------------------- public wrappers

def c3a(x, kernel, *, scale=1.0):
    """The C³A adapter term ``s · x ΔWᵀ`` with a block-circulant ΔW, applied through FFTs.

    Args:
        x: input, shape ``(..., in_features)``; any leading shape, including an empty batch.
        kernel: K, ``(out_features / b, in_features / b, b)`` for a block size b dividing both
            feature counts. It defines ``ΔW[p·b + i, q·b + j] = K[p, q, (j − i) mod b]``
            (``lrkernels.reference.c3a.delta_weight`` builds it densely).
        scale: s. PEFT's C³A uses ``1 / in_features``.

    x and kernel share a device and a dtype: float32/float16/bfloat16 on CUDA, float32/float64/
    bfloat16 on CPU, except that the kernel may be float32 for float16/bfloat16 x (as PEFT keeps
    it). The FFTs and the block contraction run in float32 (float64 for float64). Under
    ``torch.autocast`` x is cast to the autocast dtype and the kernel left as it is.
    Differentiable in x and kernel (the exact gradient of the dense product). Returns a
    tensor of shape ``(..., out_features)``.
    """
    with nvtx_range("lrkernels.c3a"):
        y, _ = _fwd(x, kernel, float(scale))
    return y


def c3a_linear(x, weight, bias, kernel, *, scale=1.0):
    """A linear layer with a C³A adapter: ``y = x Wᵀ + b + s · x ΔWᵀ``, fused.

    Args:
        x: ``(..., in_features)``.  weight: W, ``(out_features, in_features)``.
        bias: b, ``(out_features,)`` or None.
        kernel: K, ``(out_features / b, in_features / b, b)`` (see :func:`c3a`).
        scale: s. PEFT's C³A uses ``1 / in_features``.

    Dtypes: x, weight and bias share one (float32/float16/bfloat16 on CUDA, float32/float64/
    bfloat16 on CPU); the kernel has it or float32 on a float16/bfloat16 x; the output has x's
    dtype, each gradient its own tensor's. Under ``torch.autocast`` x, weight and bias are cast
    to the autocast dtype. Differentiable in x, weight, bias and kernel; each gradient is
    computed only when required.
    """
    with nvtx_range("lrkernels.c3a_linear"):
        y, _ = _lin_fwd(x, weight, bias, kernel, float(scale))
    return y
