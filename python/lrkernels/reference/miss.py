"""Float64 oracle for the Bone / MiSS ops: ΔW built densely, index by index from its definition,
then one plain matrix product (no chunk sums, no block-wise GEMMs), so it checks the kernels'
factorisations independently."""

import torch

from .philox import dropout_mask


def delta_weight(miss_block, out_features, in_features, *, weight=None, dtype=torch.float64):
    """Dense ΔW (out, in). balance/mini (M 2-D, (r, cols)): ΔW[o, c] = M[c mod r, o mod cols].
    bat (M 3-D, (out/r, r, r), `weight` W needed): ΔW_pq = W_pq M_p + M_p for the r×r block (p, q).
    Differentiable in M (and W)."""
    m = miss_block.to(dtype)
    if m.dim() == 2:
        r, cols = m.shape
        c = torch.arange(in_features, device=m.device) % r
        o = torch.arange(out_features, device=m.device) % cols
        return m[c.view(1, -1), o.view(-1, 1)]
    n_out, r, _ = m.shape
    w = weight.to(dtype)
    n_in = in_features // r
    blocks = w.reshape(n_out, r, n_in, r).permute(0, 2, 1, 3)        # [p, q] = W_pq
    mp = m.unsqueeze(1)                                                 # M_p for every q
    dw = blocks @ mp + mp
    return dw.permute(0, 2, 1, 3).reshape(out_features, in_features)


def miss_linear(x, weight, bias, miss_block, *, dropout_p=0.0, seed=0, dtype=torch.float64):
    """y = x Wᵀ + b + drop(x) ΔWᵀ (balance/mini, M 2-D) or x (W + ΔW)ᵀ + b (bat, M 3-D), every
    operand cast to `dtype`. The dropout mask is the kernels' Philox mask for `seed`, built
    independently. Differentiable (plain autograd), so it also serves as the gradient oracle."""
    xd = x.to(dtype)
    w = weight.to(dtype)
    out, inf = w.shape
    x2 = xd.reshape(-1, inf)
    dw = delta_weight(miss_block, out, inf, weight=w, dtype=dtype)
    if miss_block.dim() == 3:
        y = x2 @ (w + dw).T
    else:
        xa = x2
        if dropout_p > 0:
            xa = x2 * dropout_mask(int(seed), x2.shape[0], x2.shape[1], dropout_p, dtype=dtype).to(x2.device)
        y = x2 @ w.T + xa @ dw.T
    if bias is not None:
        y = y + bias.to(dtype)
    return y.reshape(*x.shape[:-1], out)
