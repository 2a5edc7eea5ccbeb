"""Float64 oracle for lora_linear: the formula written out with dense PyTorch ops."""

import torch

from .philox import dropout_mask


def lora_linear(x, weight, bias, lora_a, lora_b, *, scale=1.0, rank_scale=None, out_scale=None,
                dropout_p=0.0, seed=0, dtype=torch.float64):
    """y = x Wᵀ + b + s·((g ⊙ (drop(x) Aᵀ)) Bᵀ) ⊙ o, every operand cast to `dtype`.

    The dropout mask is the kernels' Philox mask for `seed`, built independently here.
    Differentiable (plain autograd), so it also serves as the gradient oracle.
    """
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x, weight, bias, lora_a, lora_b = c(x), c(weight), c(bias), c(lora_a), c(lora_b)
    rank_scale, out_scale = c(rank_scale), c(out_scale)
    x2 = x.reshape(-1, x.shape[-1])
    xd = x2
    if dropout_p > 0:
        xd = x2 * dropout_mask(int(seed), x2.shape[0], x2.shape[1], dropout_p, dtype=dtype).to(x2.device)
    h = xd @ lora_a.T
    if rank_scale is not None:
        h = h * rank_scale
    z = (h @ lora_b.T) * scale
    if out_scale is not None:
        z = z * out_scale
    y = x2 @ weight.T + z
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])
