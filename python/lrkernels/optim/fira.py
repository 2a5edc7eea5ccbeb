"""Fira AdamW (Chen et al., arXiv 2410.01623) on the fused lrkernels step ops: GaLore plus the
part of the gradient outside the subspace, scaled channel-wise, with a norm-growth limiter."""

import torch

from ..ops.galore import galore_apply_update
from .galore import GaLoreAdamW


class FiraAdamW(GaLoreAdamW):
    """Fira's AdamW (the `fira` package's semantics) on the fused kernels.

    Like :class:`GaLoreAdamW` (groups with ``rank``, ``update_proj_gap``, ``proj_type``), with
    the scale named ``alpha`` as in fira, plus the full-rank residual S = (G − α·back(R)) ⊙ φ,
    φ the channel-wise ratio ‖N‖/‖R‖ (columns for a left projection, rows for a right one),
    limited so ‖S‖ grows by at most 1.01× per step. ‖S‖ is computed in closed form from the
    channel norms of G and R (the projector is orthonormal), never materialising S; the update
    W ← β(W − step·(α·back(N) + S)) is one elementwise pass over W and G plus one GEMM.
    """

    _scale_key = "alpha"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, *, alpha: float = 1.0, **kwargs):
        if "scale" in kwargs:
            raise TypeError("FiraAdamW: the scale is called 'alpha' (as in the fira package)")
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, scale=alpha, **kwargs)

    @staticmethod
    def _grad_channel_sq_norms(w, dim, dtype):
        """Squared norms of G's columns (dim 0) or rows (dim 1); a shard contributes its part and
        one all-reduce of a vector completes them."""
        sq = torch.linalg.vector_norm(w["grad"], dim=dim, dtype=dtype).square()
        if w["pg"] is None:
            return sq
        import torch.distributed as dist
        if dim == 1:
            full = sq.new_zeros(w["full_rows"])
            full[w["row_offset"]:w["row_offset"] + sq.shape[0]] = sq
            sq = full
        dist.all_reduce(sq, group=w["pg"])
        return sq

    def _apply(self, w, n, alpha, beta, step_scale=None):
        weight, grad, group, state = w["weight"], w["grad"], w["group"], w["state"]
        proj, left = state["projector"], bool(state["project_left"])
        row_offset = w["row_offset"]
        a = float(group["alpha"])
        acc = n.dtype
        r = w["r_grad"].to(acc)
        dim = 0 if left else 1  # channels: columns of W for a left projection, rows for a right one
        phi = torch.linalg.vector_norm(n, dim=dim) / (torch.linalg.vector_norm(r, dim=dim) + 1e-8)
        g_norm2 = self._grad_channel_sq_norms(w, dim, acc)
        # ‖g_c − α P Pᵀ g_c‖² = ‖g_c‖² + (α² − 2α)‖r_c‖² for orthonormal P, per channel c.
        resid2 = (g_norm2 + (a * a - 2.0 * a) * r.square().sum(dim=dim)).clamp_min(0.0)
        s_norm = (phi.square() * resid2).sum().sqrt()
        prev = state.get("scaling_grad")
        if prev is None:
            limiter = torch.ones((), dtype=acc, device=n.device)
            state["scaling_grad"] = s_norm
        else:
            limiter = torch.clamp(s_norm / (prev.to(acc) + 1e-8), min=1.01) / 1.01
            state["scaling_grad"] = s_norm / limiter
        phi = phi / limiter
        # β(W − step(α P N + φ ⊙ (G − α P R))) = βW − β·step·(φ ⊙ G) − β·step·α·back(N − φ ⊙ R)
        n_eff = n - (r * phi.unsqueeze(0) if left else r * phi.unsqueeze(1))
        if step_scale is not None:  # capturable: the step size is a tensor, folded into N and φ
            n_eff = n_eff * step_scale
            phi = phi * step_scale
        rows = slice(row_offset, row_offset + weight.shape[0])
        if left:
            galore_apply_update(weight, proj[rows], n_eff, project_left=True, alpha=alpha * a, beta=beta,
                                residual_grad=grad, residual_scale=phi.unsqueeze(0),
                                residual_alpha=alpha)
        else:
            galore_apply_update(weight, proj, n_eff[rows], project_left=False, alpha=alpha * a, beta=beta,
                                residual_grad=grad, residual_scale=phi[rows].unsqueeze(1),
                                residual_alpha=alpha)
