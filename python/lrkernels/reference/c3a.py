"""Float64 oracle for the C³A ops: the dense block-circulant ΔW built index by index, then
plain matrix products (no FFTs), so it checks the spectral kernels independently."""

import torch


def delta_weight(kernel, *, dtype=torch.float64):
    """Dense ΔW (out, in) of a C³A kernel K (out/b, in/b, b):
    ΔW[p·b + i, q·b + j] = K[p, q, (j − i) mod b]. Differentiable in `kernel`."""
    n_out, n_in, b = kernel.shape
    k = kernel.to(dtype)
    i = torch.arange(b, device=kernel.device)
    idx = (i.view(1, b) - i.view(b, 1)) % b                 # idx[i, j] = (j − i) mod b
    blocks = k[:, :, idx]                                     # (n_out, n_in, b_i, b_j)
    return blocks.permute(0, 2, 1, 3).reshape(n_out * b, n_in * b)


def c3a(x, kernel, *, scale=1.0, dtype=torch.float64):
    """s · x ΔWᵀ, every operand cast to `dtype`. Differentiable (plain autograd)."""
    dw = delta_weight(kernel, dtype=dtype)
    return (x.to(dtype) @ dw.T) * scale


def c3a_linear(x, weight, bias, kernel, *, scale=1.0, dtype=torch.float64):
    """x Wᵀ + b + s · x ΔWᵀ, every operand cast to `dtype`. Differentiable (plain autograd)."""
    y = x.to(dtype) @ weight.to(dtype).T + c3a(x, kernel, scale=scale, dtype=dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y
