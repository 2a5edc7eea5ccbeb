"""GaLore projectors: which side of a weight is projected, and the top-r singular subspace of
its gradient computed by an exact SVD (galore-torch's method) or a randomized range finder.

A projector P is ``(m, r)`` with orthonormal columns when the left side is projected
(R = Pᵀ G is ``(r, n)``) and ``(r, n)`` with orthonormal rows when the right side is
(R = G Pᵀ is ``(m, r)``).
"""

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right")
PROJ_METHODS = ("svd", "randomized")


def projects_left(shape, proj_type: str) -> bool:
    """galore-torch's choice of side: 'std' projects the smaller dimension (the left side of a
    wide matrix, the right side of a tall or square one), 'reverse_std' the larger one."""
    m, n = shape
    if proj_type == "std":
        return m < n
    if proj_type == "reverse_std":
        return m >= n
    if proj_type == "left":
        return True
    if proj_type == "right":
        return False
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def svd_projector(grad: torch.Tensor, rank: int, left: bool, dtype: torch.dtype) -> torch.Tensor:
    """Top-r singular vectors of grad by a full SVD in float32 (as galore-torch computes them,
    so the same gradient gives the same projector, signs included)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    p = u[:, :rank] if left else vh[:rank, :]
    return p.to(dtype).contiguous()


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of y's columns (m × k, k small): CholeskyQR2, two Cholesky
    factorisations of the k × k Gram matrix in float64, which cost O(m k²) instead of a
    Householder QR's many passes; Householder QR when the Gram matrix is singular (a
    rank-deficient gradient, e.g. all zeros)."""
    q = y
    for _ in range(2):
        gram = (q.t() @ q).double()
        chol, info = torch.linalg.cholesky_ex(gram)
        if bool(info != 0):  # host sync, at refresh time only
            return torch.linalg.qr(y).Q
        # y = Q Lᵀ  =>  Q = y L⁻ᵀ
        q = torch.linalg.solve_triangular(chol.t().to(y.dtype), q, upper=True, left=False)
    return q


def randomized_projector(grad: torch.Tensor, rank: int, left: bool, dtype: torch.dtype, *, oversampling: int = 8,
                         power_iters: int = 2, generator=None, previous: torch.Tensor = None) -> torch.Tensor:
    """Top-r singular subspace of grad by a randomized range finder (Halko, Martinsson & Tropp,
    arXiv 0909.4061, algorithms 4.4 and 5.1): a Gaussian sketch with `oversampling` extra
    columns, `power_iters` re-orthonormalised power iterations, then the top-r eigenvectors of
    the small k × k matrix B Bᵀ, B = Qᵀ G (k = r + oversampling). With `previous` (the last
    projector) the sketch starts from the old subspace, so one power iteration is usually
    enough, and the new vectors' signs are aligned with the old ones so the moments kept
    across the refresh stay meaningful."""
    work = torch.float64 if grad.dtype == torch.float64 else torch.float32
    a = grad.to(work)
    if not left:
        a = a.t()
    m, n = a.shape
    k = min(rank + oversampling, m, n)

    def gaussian(cols):
        return torch.randn(n, cols, dtype=work, device=a.device, generator=generator)

    if previous is not None:
        prev = previous.to(work)
        prev = prev if left else prev.t()
        y = prev if k == rank else torch.cat([prev, a @ gaussian(k - rank)], dim=1)
    else:
        y = a @ gaussian(k)
    q = _orthonormalize(y)
    for _ in range(power_iters):
        z = _orthonormalize(a.t() @ q)
        q = _orthonormalize(a @ z)
    b = q.t() @ a
    # Left singular vectors of B = eigenvectors of B Bᵀ (k × k, float64: cheap and exact enough).
    _, vecs = torch.linalg.eigh((b @ b.t()).double())
    u = q @ vecs[:, -rank:].flip(1).to(work)
    if previous is not None:
        sign = torch.sign((u * prev).sum(dim=0))
        u = u * torch.where(sign == 0, torch.ones_like(sign), sign)
    p = u if left else u.t()
    return p.to(dtype).contiguous()


def captured_energy(grad: torch.Tensor, projector: torch.Tensor, left: bool) -> float:
    """‖project(G)‖²_F / Σ_{i ≤ r} σ_i²: how much of the best rank-r energy P keeps (1 = all)."""
    g = grad.double()
    p = projector.double()
    r = p.shape[1] if left else p.shape[0]
    proj = p.t() @ g if left else g @ p.t()
    s = torch.linalg.svdvals(g)
    return float(proj.square().sum() / s[:r].square().sum())
