r"""Lanczos tridiagonalisation and extreme eigenpairs of symmetric operators.

:func:`lanczos` builds the tridiagonal :math:`T_m = Q_m^\top A Q_m` of the Krylov space
:math:`\mathcal{K}_m(A, v_0)`; :func:`eigenvalues` finds extreme eigenpairs by Lanczos with
full re-orthogonalisation and thick (Krylov–Schur style) restarts, stopping when every
wanted Ritz pair :math:`(\theta_i, x_i)` has residual
:math:`\|A x_i - \theta_i x_i\| = \beta_m |s_{m,i}| \le \text{tol}\cdot\|A\|_{\text{est}}`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..operators._base import LinearOperator, as_operator
from ._common import EigenResult, check_positive_int, gaussian

__all__ = ["LanczosResult", "eigenvalues", "lanczos"]

_WHICH = ("LA", "SA", "BE", "LM")


@dataclass
class LanczosResult:
    """Output of :func:`lanczos`.

    Attributes:
        alpha: ``(m,)`` diagonal of the tridiagonal, float64 on the CPU.
        beta: ``(m - 1,)`` off-diagonal.
        residual_norm: :math:`\\beta_m`, the norm of the remainder after the last step.
        broke_down: True if the Krylov space became invariant before ``num_steps``
            (then ``m < num_steps`` and the Ritz values are exact eigenvalues).
        num_matvecs: products used.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    residual_norm: float
    broke_down: bool
    num_matvecs: int


class _Basis:
    """Lanczos basis storage: full, a sliding window, or none; any dtype and device."""

    def __init__(self, n: int, m: int, reorth: str, window: int | None, dtype, device, op: LinearOperator):
        self.reorth = reorth
        self.size = {"full": m, "window": window or 0, "none": 0}[reorth]
        self.dtype = dtype or op.dtype
        self.device = torch.device(device) if device is not None else op.device
        self.op_dtype, self.op_device = op.dtype, op.device
        self.store = torch.empty(self.size, n, dtype=self.dtype, device=self.device) if self.size else None
        self.count = 0

    def add(self, q: torch.Tensor) -> None:
        if self.store is None:
            return
        slot = self.count % self.size if self.reorth == "window" else self.count
        self.store[slot] = q.to(device=self.device, dtype=self.dtype)
        self.count += 1

    def orthogonalise(self, w: torch.Tensor) -> torch.Tensor:
        if self.store is None or self.count == 0:
            return w
        Q = self.store[: min(self.count, self.size)].to(device=self.op_device, dtype=self.op_dtype)
        for _ in range(2):  # classical Gram-Schmidt twice ("twice is enough")
            w = w - Q.T @ (Q @ w)
        return w


def lanczos(
    A: Any,
    v0: torch.Tensor,
    num_steps: int,
    *,
    reorth: str = "full",
    window: int | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: str | torch.device | None = None,
    breakdown_tol: float | None = None,
    callback: Callable[[int], None] | None = None,
    should_stop: Callable[[list[float], list[float]], bool] | None = None,
) -> LanczosResult:
    r"""Run ``num_steps`` of the Lanczos recurrence from ``v0``.

    .. math::  \beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1}

    Args:
        A: symmetric operator, tensor or SciPy operator.
        v0: start vector (normalised here).
        num_steps: number of products (at most the dimension).
        reorth: ``"full"`` — re-orthogonalise against every basis vector (memory
            ``num_steps × n`` entries of ``basis_dtype``: e.g. 100 steps of a 1 M-parameter
            model in float32 take 400 MB); ``"window"`` — against the last ``window`` vectors
            only (memory ``window × n``; as LLA does, loses orthogonality and creates spurious
            copies of converged Ritz values); ``"none"`` — three-term recurrence only.
        window: window size for ``reorth="window"``.
        basis_dtype: dtype to store the basis in (``torch.bfloat16`` or ``torch.float16`` halves
            the memory at the cost of orthogonality near that precision).
        basis_device: where to store the basis (``"cpu"`` moves it off the GPU).
        breakdown_tol: stop when :math:`\beta_j` falls below this; default
            :math:`100\,\epsilon\,\|T\|`.
        callback: called with the step index after each step (progress bars).
        should_stop: ``should_stop(alphas, betas)`` after each step (``len(betas) ==
            len(alphas) - 1``); returning ``True`` ends the recurrence early (adaptive SLQ).

    Returns:
        :class:`LanczosResult` with float64 coefficients.
    """
    caller = "lanczos"
    op = as_operator(A, caller)
    n = op.shape[0]
    check_positive_int(num_steps, "num_steps", caller)
    if reorth not in ("full", "window", "none"):
        raise ValueError(f"{caller}: reorth must be 'full', 'window' or 'none', got {reorth!r}")
    if reorth == "window":
        check_positive_int(window, "window", caller)  # type: ignore[arg-type]
    num_steps = min(num_steps, n)
    eps = torch.finfo(op.dtype).eps
    basis = _Basis(n, num_steps, reorth, window, basis_dtype, basis_device, op)
    q = v0.to(device=op.device, dtype=op.dtype).reshape(-1)
    norm = torch.linalg.vector_norm(q)
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"{caller}: start vector must be finite and non-zero")
    q = q / norm
    q_prev = torch.zeros_like(q)
    alphas: list[float] = []
    betas: list[float] = []
    beta_prev = 0.0
    anorm = 0.0
    broke = False
    matvecs = 0
    for j in range(num_steps):
        basis.add(q)
        w = op @ q
        matvecs += 1
        alpha = float(torch.dot(q, w))
        w = w - alpha * q - beta_prev * q_prev
        w = basis.orthogonalise(w)
        beta = float(torch.linalg.vector_norm(w))
        if not math.isfinite(beta) or not math.isfinite(alpha):
            raise FloatingPointError(f"{caller}: a product returned NaN/inf at step {j}; check the operator")
        alphas.append(alpha)
        anorm = max(anorm, abs(alpha) + beta + beta_prev)
        if callback is not None:
            callback(j)
        tol = breakdown_tol if breakdown_tol is not None else 100 * eps * max(anorm, 1e-300)
        if j == num_steps - 1:
            break
        if beta <= tol:
            broke = True
            break
        if should_stop is not None and should_stop(alphas, betas):
            break
        betas.append(beta)
        q_prev, q, beta_prev = q, w / beta, beta
    return LanczosResult(
        alpha=torch.tensor(alphas, dtype=torch.float64),
        beta=torch.tensor(betas, dtype=torch.float64),
        residual_norm=beta if not broke else 0.0,
        broke_down=broke,
        num_matvecs=matvecs,
    )


def _order(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of Ritz values, most wanted first."""
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


def _wanted(theta: torch.Tensor, which: str, k: int) -> torch.Tensor:
    if which == "BE":
        asc = torch.argsort(theta)
        low = k // 2
        return torch.cat([asc[:low], asc[len(asc) - (k - low) :]])
    return _order(theta, which)[:k]


def eigenvalues(
    A: Any,
    k: int = 1,
    which: str = "LA",
    *,
    tol: float = 1e-6,
    seed: int = 0,
    return_eigenvectors: bool = False,
    max_matvecs: int | None = None,
    max_basis: int | None = None,
    v0: torch.Tensor | None = None,
    warn: bool = True,
) -> EigenResult:
    r"""Extreme eigenvalues (and eigenvectors) of a symmetric operator by restarted Lanczos.

    Lanczos with full re-orthogonalisation builds an orthonormal basis :math:`Q` and the
    projection :math:`T = Q^\top A Q`; Ritz pairs :math:`(\theta_i, Q s_i)` of :math:`T`
    approximate eigenpairs. When the basis reaches ``max_basis`` vectors it is compressed
    to the most wanted Ritz vectors (thick restart) and grown again. Iteration stops when
    every wanted pair's residual :math:`\|A x_i - \theta_i x_i\|` is at most
    ``tol · max|θ|``; by Weyl's bound each reported eigenvalue is then within that residual
    of a true one (and typically within residual²/gap).

    Args:
        A: symmetric operator (:class:`hesd.HessianOperator`, tensor, SciPy operator).
        k: number of eigenvalues (``1 ≤ k ≤ n``).
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"BE"`` both ends
            (``k // 2`` smallest and the rest largest; ``k=2`` gives λmin and λmax), ``"LM"``
            largest magnitude (what power iteration finds).
        tol: relative residual tolerance.
        seed: seed of the random start vector.
        return_eigenvectors: also return the eigenvectors.
        max_matvecs: give up after this many products (default ``max(500, 30 k)``); the
            result then has ``converged=False`` and a warning is issued.
        max_basis: basis size before a restart (default ``min(n, max(2k + 20, 40))``).
        v0: start vector instead of a random one.
        warn: warn when not converged.

    Returns:
        :class:`hesd.algorithms.EigenResult`.

    Example:
        >>> import torch, hesd
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> hesd.eigenvalues(A, k=2, which="BE").eigenvalues.round(decimals=6).tolist()
        [1.0, 100.0]
    """
    caller = "eigenvalues"
    op = as_operator(A, caller)
    n = op.shape[0]
    check_positive_int(k, "k", caller)
    if k > n:
        raise ValueError(f"{caller}: k={k} is larger than the operator's dimension {n}")
    if which not in _WHICH:
        raise ValueError(f"{caller}: which must be one of {_WHICH}, got {which!r}")
    if not tol > 0:
        raise ValueError(f"{caller}: tol must be positive, got {tol}")
    m_max = min(n, max_basis if max_basis is not None else max(2 * k + 20, 40))
    if m_max < min(n, k + 1):
        raise ValueError(f"{caller}: max_basis={max_basis} must exceed k={k}")
    max_matvecs = max_matvecs if max_matvecs is not None else max(500, 30 * k)
    dtype, device = op.dtype, op.device
    Q = torch.zeros(m_max + 1, n, dtype=dtype, device=device)
    T = torch.zeros(m_max, m_max, dtype=torch.float64)
    q = v0.to(device=device, dtype=dtype).reshape(-1) if v0 is not None else gaussian(n, seed, dtype, device)
    Q[0] = q / torch.linalg.vector_norm(q)
    j = 0  # number of basis vectors with a filled column of T
    matvecs = 0
    restarts = 0
    fresh = 0  # seeds for replacement vectors after breakdown
    eps = torch.finfo(dtype).eps
    theta = S = None
    beta = 0.0
    converged = False
    while True:
        w = op @ Q[j]
        matvecs += 1
        h = Q[: j + 1] @ w
        w = w - Q[: j + 1].T @ h
        h2 = Q[: j + 1] @ w
        w = w - Q[: j + 1].T @ h2
        h = (h + h2).to(torch.float64).cpu()
        T[: j + 1, j] = h
        T[j, : j + 1] = h
        beta = float(torch.linalg.vector_norm(w))
        j += 1
        theta, S = torch.linalg.eigh(T[:j, :j])
        anorm = float(theta.abs().max()) if j else 0.0
        resid = beta * S[j - 1].abs()
        if j >= n:
            resid = torch.zeros_like(resid)
        idx = _wanted(theta, which, min(k, j))
        done = len(idx) == k and bool((resid[idx] <= tol * max(anorm, 1e-300)).all())
        if done:
            converged = True
            break
        if matvecs >= max_matvecs:
            break
        if beta <= 100 * eps * max(anorm, 1e-300):
            # Invariant subspace: continue with a random vector orthogonal to the basis.
            fresh += 1
            r = gaussian(n, seed + 7919 * fresh, dtype, device)
            for _ in range(2):
                r = r - Q[:j].T @ (Q[:j] @ r)
            nr = torch.linalg.vector_norm(r)
            if nr <= eps * math.sqrt(n):
                converged = True  # the basis spans the whole space
                break
            w, beta = r, 0.0
            q_next = r / nr
        else:
            q_next = w / beta
        if j < m_max:
            Q[j] = q_next
            continue
        # Thick restart: keep the most wanted Ritz vectors plus the residual direction.
        restarts += 1
        keep = min(j - 1, max(k + (m_max - k) // 2, k + 1))
        order = _order(theta, which)[:keep]
        Y = S[:, order].to(dtype=dtype, device=device)
        Q[:keep] = (Y.T @ Q[:j]).clone()
        coupling = beta * S[j - 1, order]
        T.zero_()
        T[:keep, :keep] = torch.diag(theta[order])
        T[:keep, keep] = coupling
        T[keep, :keep] = coupling
        Q[keep] = q_next
        # Column `keep` of T is recomputed (with the coupling) by the next expansion.
        j = keep
    idx = _wanted(theta, which, min(k, len(theta)))
    vals = theta[idx]
    res = (beta * S[j - 1, idx].abs()) if j < n else torch.zeros(len(idx), dtype=torch.float64)
    order = torch.argsort(vals, descending=which in ("LA", "LM"))
    if which == "LM":
        order = torch.argsort(vals.abs(), descending=True)
    vals, res, idx = vals[order], res[order], idx[order]
    vecs = None
    if return_eigenvectors:
        vecs = Q[:j].T @ S[:, idx].to(dtype=dtype, device=device)
    if not converged and warn:
        warnings.warn(
            f"{caller}: not converged after {matvecs} products (largest relative residual "
            f"{float(res.max()) / max(float(theta.abs().max()), 1e-300):.2e} > tol={tol}); "
            "raise max_matvecs or max_basis, or loosen tol",
            RuntimeWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=vals.to(dtype),
        eigenvectors=vecs,
        residuals=res,
        converged=converged,
        num_matvecs=matvecs,
        which=which,
        info={"restarts": restarts, "basis_size": m_max},
    )
