"""The decompositions (float64): from calibration second moments to the linear maps that merge a
group of m key/value heads into one, and the maps folded into q_proj / o_proj.

For a group of old heads g_1..g_m (stacked, m·d dims) every method gives, for keys and values:

- ``A`` (d, m·d): the new head is ``A @ [x_g1; ...; x_gm]`` (applied to the k_proj / v_proj rows
  and biases of the group);
- ``B`` (m, d, d): old head j is reconstructed as ``B[j] @ new``; for keys the query head h of old
  head j is folded as ``q_h ← B[j]ᵀ q_h`` (q · B k' = (Bᵀ q) · k'), for values o_proj's columns
  of h as ``W_o[:, h] ← W_o[:, h] B[j]``;
- values only: ``c`` (m, d), the constant part of the reconstruction (centred PCA), folded into
  o_proj's bias (the attention weights sum to one, so a constant value offset passes through).
  A constant key offset changes every score of a query by the same amount, which the softmax
  ignores, so keys without RoPE are centred and the offset dropped: exact.

Keys under rotate-half RoPE: pair i of a head, dims (i, i + d/2), is the complex number
z = k[i] + i·k[i+d/2], rotated by e^{iθ_i t}. A complex scalar times z commutes with that
rotation, so per frequency pair the new head is z' = Σ_j a_j z_j and old head j is read back as
u_j z' (a 2×2 scaled rotation each, arXiv 2406.07056's special case for RoPE keys; the RoPE-
commuting 2×2 maps of arXiv 2412.20677). (a, u) come from the top eigenvector of the group's
m×m Hermitian second moment of z at that frequency.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class HeadMerge:
    A: torch.Tensor            # (d, m·d)
    B: torch.Tensor            # (m, d, d)
    c: Optional[torch.Tensor]  # (m, d) or None
    kept: float                # energy kept (of the objective's matrix), in [0, 1]


def _sym_sqrt(W: torch.Tensor, rel_eps: float = 1e-10):
    """(W^{1/2}, W^{-1/2}) of a symmetric PSD matrix, its small eigenvalues clamped."""
    e, V = torch.linalg.eigh(W)
    e = e.clamp_min(float(e.max().clamp_min(1e-300)) * rel_eps)
    return (V * e.sqrt()) @ V.T, (V * e.rsqrt()) @ V.T


def _blockdiag(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks.unbind(0))


def mean_merge(m: int, d: int, *, dtype=torch.float64) -> HeadMerge:
    """GQA's mean-pooling (arXiv 2305.13245): the new head is the group's mean, read back as is."""
    eye = torch.eye(d, dtype=dtype)
    return HeadMerge(A=torch.cat([eye / m] * m, dim=1), B=eye.expand(m, d, d).clone(), c=None, kept=float("nan"))


def pca_merge(S: torch.Tensor, m: int, d: int, *, mean: Optional[torch.Tensor] = None,
              weight: Optional[torch.Tensor] = None, keep_offset: bool = True) -> HeadMerge:
    """Real PCA of the group's stacked outputs into d dims.

    S: (m·d, m·d) second moment E[x xᵀ]. ``mean`` (m·d,): centre (covariance S − μμᵀ) and, with
    ``keep_offset``, return the constant ``c`` the centred reconstruction needs. ``weight``
    (m, d, d): per old head a PSD matrix M_j; the error is measured as Σ_j e_jᵀ M_j e_j (query
    second moments for keys: the score error; Σ W_oᵀW_o of the head's query heads for values:
    the error after o_proj) instead of the plain squared error.
    """
    S = S.to(torch.float64)
    if mean is not None:
        S = S - torch.outer(mean, mean)
    if weight is None:
        L = Linv = torch.eye(m * d, dtype=torch.float64)
    else:
        sq, isq = zip(*(_sym_sqrt(w.to(torch.float64)) for w in weight.unbind(0)))
        L, Linv = _blockdiag(torch.stack(sq)), _blockdiag(torch.stack(isq))
    M = L @ S @ L
    M = (M + M.T) / 2
    e, U = torch.linalg.eigh(M)
    Ur = U[:, -d:].flip(1)
    total = float(e.clamp_min(0).sum())
    kept = float(e[-d:].clamp_min(0).sum()) / total if total > 0 else 1.0
    A = Ur.T @ L
    B = (Linv @ Ur).reshape(m, d, d)
    c = None
    if mean is not None and keep_offset:
        c = (mean - (Linv @ Ur) @ (A @ mean)).reshape(m, d)
    return HeadMerge(A=A, B=B, c=c, kept=min(kept, 1.0))


def complex_pair_moments(S: torch.Tensor, m: int, d: int) -> torch.Tensor:
    """(d/2, m, m) Hermitian E[z zᴴ] per frequency pair from the real second moment S (m·d, m·d),
    with z_j = x[j·d + i] + i·x[j·d + i + d/2]."""
    h = d // 2
    S = S.to(torch.float64).reshape(m, d, m, d)
    xx = S[:, :h, :, :h].diagonal(dim1=1, dim2=3)  # (m, m, h): E[x_a x_b] at the same pair
    yy = S[:, h:, :, h:].diagonal(dim1=1, dim2=3)
    yx = S[:, h:, :, :h].diagonal(dim1=1, dim2=3)  # E[y_a x_b]
    xy = S[:, :h, :, h:].diagonal(dim1=1, dim2=3)  # E[x_a y_b]
    C = torch.complex(xx + yy, yx - xy)            # E[z_a conj(z_b)]
    return C.permute(2, 0, 1).contiguous()


def _complex_to_real_blocks(a: torch.Tensor) -> torch.Tensor:
    """(m, h) complex scalars per pair -> (m, d, d) real maps (multiplication by a on each pair)."""
    m, h = a.shape
    d = 2 * h
    out = torch.zeros(m, d, d, dtype=torch.float64)
    idx = torch.arange(h)
    out[:, idx, idx] = a.real
    out[:, idx, idx + h] = -a.imag
    out[:, idx + h, idx] = a.imag
    out[:, idx + h, idx + h] = a.real
    return out


def rope_key_merge(S: torch.Tensor, m: int, d: int, *, pair_weight: Optional[torch.Tensor] = None) -> HeadMerge:
    """Keys under RoPE: per frequency pair a complex-scalar combination of the group's heads.

    S: (m·d, m·d) uncentred second moment of the group's keys before RoPE (a constant key is not
    constant after rotation, so nothing is centred). ``pair_weight`` (m, d/2): per old head and
    pair, the weight of its error: Σ E|q_{h,i}|² over the query heads h of that KV head (the score
    error of a pair is Re(conj(q) e e^{iφ}), whose mean square over the relative phase φ is
    |q|²|e|²/2).
    """
    h = d // 2
    C = complex_pair_moments(S, m, d)                               # (h, m, m)
    if pair_weight is None:
        sw = torch.ones(h, m, dtype=torch.float64)
    else:
        w = pair_weight.to(torch.float64).T                         # (h, m)
        sw = w.clamp_min(float(w.max()) * 1e-12 if w.numel() else 0.0).sqrt()
    D = sw.to(torch.complex128)
    Ct = D[:, :, None] * C * D[:, None, :]
    Ct = (Ct + Ct.conj().transpose(1, 2)) / 2
    e, U = torch.linalg.eigh(Ct)                                    # ascending, (h, m), (h, m, m)
    top = U[:, :, -1]                                               # (h, m)
    total = float(e.clamp_min(0).sum())
    kept = float(e[:, -1].clamp_min(0).sum()) / total if total > 0 else 1.0
    a = top.conj() * D                                              # z' = Σ_j a_j z_j
    u = top / D                                                     # z_j ≈ u_j z'
    A = _complex_to_real_blocks(a.T)                                # (m, d, d)
    return HeadMerge(A=torch.cat(A.unbind(0), dim=1), B=_complex_to_real_blocks(u.T), c=None, kept=min(kept, 1.0))


def rope_key_merge_attention(N: torch.Tensor, init: HeadMerge, *, iters: int = 20) -> HeadMerge:
    """Keys under RoPE for the objective Σ_j r_j N_j r_jᴴ per frequency pair, r_j = e_jᵀ − u_j cᵀ
    the error of old head j (new pair z' = cᵀ z, head j read back as u_j z'), N_j (Hermitian PSD)
    the moment its query heads weigh the error with (see _collect.RopeAttentionMoments).

    The N_j differ per head, so this is no eigenproblem: alternate the two exact least-squares
    steps u_j = (N_j b)_j / (bᴴ N_j b) and b = (Σ_j |u_j|² N_j)⁻¹ Σ_j u_j N_j e_j (b = conj(c)),
    starting from ``init`` (the query-weighted PCA). Each step lowers the objective.

    N: (m, d/2, m, m), N[j] restricted to the group's heads. Returns the merge with ``kept`` =
    1 − objective / objective of a zero reconstruction.
    """
    m, h = N.shape[0], N.shape[1]
    d = 2 * h
    Nt = N.permute(1, 0, 2, 3).to(torch.complex128)                    # (h, m, m, m): [i, j]
    Nt = (Nt + Nt.conj().transpose(-1, -2)) / 2
    idx = torch.arange(m)
    A0 = init.A.reshape(d, m, d)
    pair = torch.arange(h)
    # the complex coefficients of the initial merge, read off its real 2x2 blocks
    c = torch.complex(A0[pair, :, pair], A0[pair + h, :, pair])         # (h, m)
    u = torch.complex(init.B[:, pair, pair], init.B[:, pair + h, pair]).T  # (h, m)
    b = c.conj()

    def objective(b, u):
        r = -u[:, :, None] * b.conj()[:, None, :]                       # (h, j, m): r_j = e_j − u_j cᵀ
        r[:, idx, idx] += 1
        return torch.einsum("ijm,ijmn,ijn->i", r.conj(), Nt.transpose(-1, -2), r).real  # r N rᴴ (N Hermitian)

    f = objective(b, u)
    eye = torch.eye(m, dtype=torch.complex128)
    for _ in range(iters):
        Nb = torch.einsum("ijmn,in->ijm", Nt, b)                       # (h, j, m): N_j b
        den = torch.einsum("im,ijm->ij", b.conj(), Nb).real.clamp_min(1e-300)
        u_new = Nb[:, idx, idx] / den
        M = torch.einsum("ij,ijmn->imn", (u_new.abs() ** 2).to(Nt.dtype), Nt)
        cols = Nt[:, idx, :, idx].permute(1, 0, 2)                      # (h, j, m): column j of N_j
        rhs = torch.einsum("ij,ijm->im", u_new, cols)                   # Σ_j u_j N_j[:, j]
        M = M + eye * (M.diagonal(dim1=-2, dim2=-1).real.mean(-1, keepdim=True)[..., None] * 1e-12 + 1e-300)
        b_new = torch.linalg.solve(M, rhs)
        f_new = objective(b_new, u_new)
        better = f_new <= f                                             # per pair: keep only improvements
        b = torch.where(better[:, None], b_new, b)
        u = torch.where(better[:, None], u_new, u)
        f = torch.minimum(f, f_new)
    total = float(Nt[:, idx, idx, idx].real.sum())
    kept = 1.0 - float(f.clamp_min(0).sum()) / total if total > 0 else 1.0
    A = _complex_to_real_blocks(b.conj().T)
    return HeadMerge(A=torch.cat(A.unbind(0), dim=1), B=_complex_to_real_blocks(u.T), c=None, kept=min(kept, 1.0))


def energy_lost(merge: HeadMerge) -> float:
    return 0.0 if merge.kept != merge.kept else 1.0 - merge.kept  # NaN (mean) counts as 0
