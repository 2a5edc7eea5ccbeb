"""Float64 oracle for the multi-LoRA ops: a plain loop over tokens, one adapter each."""

import torch

from .philox import dropout_mask


def _ranks_list(ranks, L, r_max):
    return [r_max] * L if ranks is None else [int(r) for r in ranks.tolist()]


def multi_lora_linear(x, weight, bias, lora_a, lora_b, adapter_ids, *, scales, ranks=None, rank_scale=None,
                      out_scale=None, dropout_p=0.0, seed=0, dtype=torch.float64):
    """y_t = x_t Wᵀ + b + s[a] · ((g[a] ⊙ (drop(x_t) A[a, :r]ᵀ)) B[a, :, :r]ᵀ) ⊙ o[a], a = a_t,
    token by token, every operand cast to `dtype`; a_t = -1 leaves the base output. The
    dropout mask of token t is row t of the kernels' Philox mask for `seed` (lora_linear's).
    Differentiable (plain autograd), so it is also the gradient oracle."""
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x, weight, bias, lora_a, lora_b, scales = c(x), c(weight), c(bias), c(lora_a), c(lora_b), c(scales)
    rank_scale, out_scale = c(rank_scale), c(out_scale)
    L, r_max = lora_a.shape[0], lora_a.shape[1]
    rk = _ranks_list(ranks, L, r_max)
    x2 = x.reshape(-1, x.shape[-1])
    xd = x2
    if dropout_p > 0:
        xd = x2 * dropout_mask(int(seed), x2.shape[0], x2.shape[1], dropout_p, dtype=dtype).to(x2.device)
    ids = adapter_ids.reshape(-1).tolist()
    base = x2 @ weight.T
    if bias is not None:
        base = base + bias
    rows = []
    for t, a in enumerate(ids):
        row = base[t]
        if a >= 0:
            r = rk[a]
            h = lora_a[a, :r] @ xd[t]
            if rank_scale is not None:
                h = h * rank_scale[a, :r]
            z = scales[a] * (lora_b[a, :, :r] @ h)
            if out_scale is not None:
                z = z * out_scale[a]
            row = row + z
        rows.append(row)
    y = torch.stack(rows) if rows else base
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_shrink(x, lora_a, adapter_ids, ranks=None, dtype=torch.float64):
    """hidden[s, t, :r] = x_t A[s, a_t, :r]ᵀ, zero elsewhere; (T, r_max) for a 3-D lora_a."""
    a4 = lora_a.to(dtype) if lora_a.dim() == 4 else lora_a.to(dtype).unsqueeze(0)
    S, L, r_max = a4.shape[0], a4.shape[1], a4.shape[2]
    rk = _ranks_list(ranks, L, r_max)
    x2 = x.to(dtype).reshape(-1, x.shape[-1])
    out = torch.zeros(S, x2.shape[0], r_max, dtype=dtype)
    for t, a in enumerate(adapter_ids.reshape(-1).tolist()):
        if a >= 0:
            for s in range(S):
                out[s, t, :rk[a]] = a4[s, a, :rk[a]] @ x2[t]
    return out if lora_a.dim() == 4 else out[0]


def lora_expand(y, hidden, lora_b, adapter_ids, *, scales, ranks=None, slice_sizes=None, dtype=torch.float64):
    """y + the expand update: y[t, slice s] += scales[a_t] · hidden[s, t, :r] B[a_t, slice s, :r]ᵀ."""
    h3 = hidden.to(dtype) if hidden.dim() == 3 else hidden.to(dtype).unsqueeze(0)
    b = lora_b.to(dtype)
    S, L, r_max = h3.shape[0], b.shape[0], b.shape[2]
    sizes = list(slice_sizes) if slice_sizes is not None else [b.shape[1] // S] * S
    rk = _ranks_list(ranks, L, r_max)
    out = y.to(dtype).clone()
    for t, a in enumerate(adapter_ids.reshape(-1).tolist()):
        if a < 0:
            continue
        col = 0
        for s in range(S):
            r = rk[a]
            out[t, col:col + sizes[s]] += scales[a].to(dtype) * (b[a, col:col + sizes[s], :r] @ h3[s, t, :r])
            col += sizes[s]
    return out
