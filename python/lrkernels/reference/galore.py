"""float64 oracles for the GaLore / Fira step ops (pure PyTorch, out of place)."""

import torch


def galore_adam_moments(exp_avg, exp_avg_sq, grad, beta1, beta2, eps, dtype=torch.float64):
    """Returns (new exp_avg, new exp_avg_sq, N), all in `dtype`."""
    m = exp_avg.to(dtype)
    v = exp_avg_sq.to(dtype)
    g = grad.to(dtype)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    return m, v, m / (v.sqrt() + eps)


def galore_apply_update(weight, projector, update, project_left, alpha, beta, residual_grad=None,
                        residual_scale=None, residual_alpha=0.0, dtype=torch.float64):
    """Returns β·W + α·back(N) [+ γ·(G ⊙ s)] in `dtype`."""
    w = weight.to(dtype)
    p = projector.to(dtype)
    n = update.to(dtype)
    back = p @ n if project_left else n @ p
    out = beta * w + alpha * back
    if residual_grad is not None:
        out = out + residual_alpha * residual_grad.to(dtype) * residual_scale.to(dtype)
    return out
