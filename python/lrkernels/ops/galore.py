"""GaLore / Fira step ops: fake kernels and the public wrappers.

Both ops mutate optimizer state or weights in place and are not differentiable (they run
under ``torch.no_grad`` inside an optimizer step): called with grad mode on and an input that
requires grad they raise, rather than return a result with no gradient.
"""

import torch

from ._util import nvtx_range, register_fake, register_not_differentiable

_moments = torch.ops.lrkernels.galore_adam_moments.default
_apply = torch.ops.lrkernels.galore_apply_update.default


def _update_dtype(exp_avg):
    return torch.float64 if exp_avg.dtype == torch.float64 else torch.float32


register_not_differentiable("galore_adam_moments", "it is an optimizer-step kernel; call it under torch.no_grad() "
                            "on detached gradients (GaLoreAdamW does)")
register_not_differentiable("galore_apply_update", "it updates a weight in place inside an optimizer step; call it "
                            "under torch.no_grad() (GaLoreAdamW does)")


@register_fake("galore_adam_moments")
def _galore_adam_moments_fake(exp_avg, exp_avg_sq, grad, beta1, beta2, eps):
    torch._check(exp_avg.shape == grad.shape and exp_avg_sq.shape == grad.shape,
                 lambda: f"lrkernels.galore_adam_moments: exp_avg {tuple(exp_avg.shape)} and exp_avg_sq "
                         f"{tuple(exp_avg_sq.shape)} must have grad's shape {tuple(grad.shape)}")
    return grad.new_empty(grad.shape, dtype=_update_dtype(exp_avg))


@register_fake("galore_apply_update")
def _galore_apply_update_fake(weight, projector, update, project_left, alpha, beta, residual_grad=None,
                              residual_scale=None, residual_alpha=0.0):
    torch._check(weight.dim() == 2 and projector.dim() == 2 and update.dim() == 2,
                 lambda: "lrkernels.galore_apply_update: weight, projector and update must be 2-D")
    if project_left:
        torch._check(projector.shape[0] == weight.shape[0] and update.shape[1] == weight.shape[1]
                     and update.shape[0] == projector.shape[1],
                     lambda: "lrkernels.galore_apply_update: a left projection needs projector (m, r), update (r, n)")
    else:
        torch._check(projector.shape[1] == weight.shape[1] and update.shape[0] == weight.shape[0]
                     and update.shape[1] == projector.shape[0],
                     lambda: "lrkernels.galore_apply_update: a right projection needs projector (r, n), update (m, r)")
    return None


def galore_adam_moments(exp_avg, exp_avg_sq, grad, *, beta1=0.9, beta2=0.999, eps=1e-6):
    """Adam's moment update on a projected gradient, in place, fused in one pass.

    ``m ← β₁m + (1 − β₁)R``, ``v ← β₂v + (1 − β₂)R²``; returns ``N = m / (√v + ε)`` (ε outside
    the square root, as in HF's and galore-torch's AdamW). No bias correction: fold it into
    the ``alpha`` of :func:`galore_apply_update`.

    Args:
        exp_avg, exp_avg_sq: the moments (R's shape; float32, bfloat16 or float64, on CPU and CUDA),
            contiguous, updated in place.
        grad: R, the projected gradient, any supported float dtype.

    Returns:
        N in float32 (float64 when the moments are float64), R's shape.
    """
    with nvtx_range("lrkernels.galore_adam_moments"):
        return _moments(exp_avg, exp_avg_sq, grad, float(beta1), float(beta2), float(eps))


def galore_apply_update(weight, projector, update, *, project_left, alpha, beta=1.0, residual_grad=None,
                        residual_scale=None, residual_alpha=0.0):
    """``W ← β·W + α·back(N) [+ γ·(G ⊙ s)]`` in place, with one GEMM-with-beta writing W.

    ``back(N)`` is ``P N`` for a left projection (projector ``(m, r)``, update ``(r, n)``) and
    ``N P`` for a right one (projector ``(r, n)``, update ``(m, r)``). For GaLore's AdamW step
    with decoupled weight decay applied after the update: ``β = 1 − lr·wd`` and
    ``α = −β·step_size·scale``.

    ``residual_grad`` (G, W's shape) and ``residual_scale`` (s, ``(m, 1)`` for rows or
    ``(1, n)`` for columns, float32) add Fira's channel-wise scaled gradient, weighted by
    ``residual_alpha`` (γ): one extra elementwise pass, no full-size temporary.
    """
    with nvtx_range("lrkernels.galore_apply_update"):
        _apply(weight, projector, update, bool(project_left), float(alpha), float(beta), residual_grad,
               residual_scale, float(residual_alpha))
