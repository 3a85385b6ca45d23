r"""Extreme eigenvalues by Lanczos over a window of three vectors, without restarts or a basis.

:func:`hesd.eigenvalues` with ``reorth="window"`` runs :func:`hesd.algorithms.lanczos` with a
3-vector window (each step re-orthogonalised against :math:`q_{j-2}, q_{j-1}, q_j`, twice) and
stops when the wanted Ritz values of :math:`T_j` have residual norms
:math:`\beta_j |s_{j,i}| \le \text{tol} \cdot \max|\theta|`, the test of the restarted method.

Why that holds without a full basis: Paige's analysis of the Lanczos recurrence in floating
point (Paige 1980; Parlett, *The Symmetric Eigenvalue Problem*, ch. 13) shows that orthogonality
is lost only along Ritz vectors that have converged, and that every Ritz value whose computed
:math:`\beta_j |s_{j,i}|` is small lies that close (plus a multiple of
:math:`\epsilon\|A\|`) to an eigenvalue of :math:`A`, orthogonal basis or not. The converged
values come back as copies ("ghosts") of themselves, which is why the window serves the
extreme value at each end — ``k=1``, or λmin and λmax with ``which="BE"`` — and not the ``k``
largest, where a copy would count as the second. Without restarts no Krylov information is
thrown away, though the copies take steps once a value has converged, so it takes about as
many products as the restarted method; each step reads three stored vectors instead of up to
``max_basis``, and memory is three vectors instead of ``max_basis + 1``. No eigenvectors: the
basis is not kept.
"""

from __future__ import annotations

import torch
from scipy.linalg import eigh_tridiagonal

from .lanczos import lanczos_lockstep

__all__ = ["WINDOW", "arrange", "order", "settled", "wanted", "windowed_extremes"]

#: vectors of the window
WINDOW = 3


def order(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of Ritz values, most wanted first (``which`` as for :func:`hesd.eigenvalues`)."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)
    asc = torch.argsort(theta).tolist()  # BE: alternate high and low ends
    out, lo, hi = [], 0, len(asc) - 1
    while lo <= hi:
        out.append(asc[hi])
        hi -= 1
        if lo <= hi:
            out.append(asc[lo])
            lo += 1
    return torch.tensor(out, dtype=torch.long)


def wanted(theta: torch.Tensor, which: str, k: int) -> torch.Tensor:
    """Indices of the ``k`` wanted Ritz values (``"BE"``: the ``k // 2`` smallest and the rest largest)."""
    if which == "BE":
        asc = torch.argsort(theta)
        low = k // 2
        return torch.cat([asc[:low], asc[len(asc) - (k - low) :]])
    return order(theta, which)[:k]


def settled(
    theta: torch.Tensor, S: torch.Tensor, beta: float, which: str, k: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    r"""The stopping test of :func:`hesd.eigenvalues`, on the eigenpairs ``theta``, ``S`` of ``T_j``.

    Returns the wanted indices, every Ritz pair's residual norm :math:`\beta_j |s_{j,i}|`, and
    whether the ``k`` wanted ones are all at most ``tol · max|θ|``.
    """
    resid = beta * S[-1].abs()
    idx = wanted(theta, which, min(k, len(theta)))
    anorm = float(theta.abs().max())
    return idx, resid, len(idx) == k and bool((resid[idx] <= tol * max(anorm, 1e-300)).all())


def arrange(vals: torch.Tensor, which: str) -> torch.Tensor:
    """The order of ``eigenvalues``' results: descending for ``"LA"``, ``"LM"`` (by magnitude), else ascending."""
    return torch.argsort(vals.abs() if which == "LM" else vals, descending=which in ("LA", "LM"))


def _ritz(alphas: list[float], betas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the tridiagonal ``T_j`` (SciPy's tridiagonal solver, as :mod:`hesd.algorithms.slq`)."""
    theta, S = eigh_tridiagonal(alphas, betas[: len(alphas) - 1])
    return torch.from_numpy(theta), torch.from_numpy(S)


def windowed_extremes(
    op, start: torch.Tensor, k: int, which: str, tol: float, max_matvecs: int
) -> tuple[torch.Tensor, torch.Tensor, bool, int, torch.Tensor]:
    """The ``k`` wanted extreme eigenvalues of ``op`` by windowed Lanczos from ``start`` (module docs).

    Args:
        op: a :class:`hesd.operators.LinearOperator` (vectors may be sharded across ranks).
        start: this rank's rows of the start vector.
        k: 1, or 2 with ``which="BE"``.
        which: as for :func:`hesd.eigenvalues`.
        tol: relative residual tolerance.
        max_matvecs: products at most.

    Returns:
        the eigenvalues (float64, most wanted first as :func:`hesd.eigenvalues` orders them), their
        residual norms, whether every one met ``tol``, the products used, and every Ritz value.
    """

    def stop(alphas: list[float], betas: list[float], beta: float) -> bool:
        theta, S = _ritz(alphas, betas)
        return settled(theta, S, beta, which, k, tol)[2]

    res = lanczos_lockstep(op, start[:, None], max_matvecs, reorth="window", window=WINDOW, should_stop=[stop])[0]
    theta, S = _ritz(res.alpha.tolist(), res.beta.tolist())
    whole = len(theta) >= op.full_dim  # the Krylov space is the whole space: the Ritz values are exact
    idx, resid, done = settled(theta, S, 0.0 if whole else res.residual_norm, which, k, tol)
    perm = arrange(theta[idx], which)
    return theta[idx][perm], resid[idx][perm], done, res.num_matvecs, theta
