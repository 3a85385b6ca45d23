r"""Extreme eigenpairs of symmetric operators by restarted Lanczos.

:func:`eigenvalues` finds extreme eigenpairs by Lanczos with full re-orthogonalisation and
thick (Krylov–Schur style) restarts, stopping when every wanted Ritz pair
:math:`(\theta_i, x_i)` has residual
:math:`\|A x_i - \theta_i x_i\| = \beta_m |s_{m,i}| \le \text{tol}\cdot\|A\|_{\text{est}}`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..allocator import basis_buffer
from ..checks import check_positive_int
from ..errors import HesdValueError
from ..operators.linear import as_operator
from . import basis, fused
from .extremes import WINDOW, arrange, order, settled, wanted, windowed_extremes
from .inner import inner
from .lanczos import row_norms, writable
from .probes import gaussian
from .results import EigenResult

__all__ = ["eigenvalues"]

_WHICH = ("LA", "SA", "BE", "LM")

#: columns of the basis rotated at a time by a thick restart (so a restart holds no second basis)
_RESTART_COLUMNS = 1 << 18

# _LOCAL: each expansion re-orthogonalises w = A q_j twice (classical Gram-Schmidt, "twice is
# enough"). The first pass need only remove the O(1) components: along q_{j-1} and q_j, because for
# i < j - 1, q_iᵀ A q_j = (A q_i)ᵀ q_j and A q_i lies in span(q_0 … q_{i+1}) up to rounding; a
# kept Ritz vector y_i satisfies A y_i = θ_i y_i + c_i q_keep, so only column `keep` after a thick
# restart couples to every earlier vector and gets a full first pass. The second pass, over the
# whole basis, removes what is left (as hesd.algorithms.lanczos's projection argues): for the
# restart basis of 6 at 124 M parameters the first pass reads 2 vectors instead of up to 6.


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
    start_hint: bool = True,
    warn: bool = True,
    reorth: str = "full",
) -> EigenResult:
    r"""Extreme eigenvalues (and eigenvectors) of a symmetric operator by restarted Lanczos.

    Lanczos with full re-orthogonalisation builds an orthonormal basis :math:`Q` and the
    projection :math:`T = Q^\top A Q`; Ritz pairs :math:`(\theta_i, Q s_i)` of :math:`T`
    approximate eigenpairs. When the basis reaches ``max_basis`` vectors it is compressed
    to the most wanted Ritz vectors (thick restart) and grown again.

    Iteration stops when every wanted pair's residual :math:`r_i = \|A x_i - \theta_i x_i\|`
    is at most ``tol · max|θ|``. By Weyl's bound an eigenvalue of :math:`A` then lies within
    :math:`r_i` of each :math:`\theta_i`: a guarantee, usually far tighter than needed (the
    eigenvalue error is of order :math:`r_i^2/\text{gap}`). A stopping rule on the estimate
    :math:`r_i^2/\delta_i` (:math:`\delta_i` the gap to the nearest other Ritz value) is not
    used: unconverged Ritz values overstate the gap, and it stopped short of ``tol``
    (BENCHMARKS.md §5). The guarantee is for *an* eigenvalue, not for the largest: a loose
    ``tol`` can stop on one just below it before the largest has emerged from the Krylov space
    (on a random-init GPT-2 of 40 M parameters, ``tol=1e-2`` returned 55.35 for λmax = 57.24;
    ``tol=1e-3`` found λmax from every start tried, BENCHMARKS.md §9), as for any Krylov method.
    For a fixed number of products instead, as hessian-eigenthings' ``lanczos(max_iter=m)`` runs,
    pass ``max_matvecs=m`` and ``warn=False``: ``residuals`` still bound the values' errors and
    ``converged`` says whether ``tol`` was met (the 40 M GPT-2 above, from eigenthings' starts:
    the same Ritz values, and after 20 or 25 products from one of them 55.35 and 56.32 instead
    of λmax, with residuals above 1e-3 saying so).

    Operators whose vectors are split across ranks (:class:`hesd.operators.sharded.ShardedOperator`,
    :class:`hesd.operators.fsdp.FSDPHessianOperator`) are run as in one process: the random
    start is drawn whole and cut, every inner product and norm is summed over the ranks
    (``reduce_inner``), each rank stores its rows of the basis, and the eigenvectors returned
    are this rank's rows.

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
        v0: start vector instead of a random one (for an operator on sharded vectors, the
            whole vector or this rank's rows of it).
        start_hint: for ``which`` in ``"LA"``, ``"LM"``, ``"BE"`` and without ``v0``, start from
            :math:`z/\|z\| + d/\|d\|` with :math:`z` random and :math:`d` the operator's
            :meth:`~hesd.operators.LinearOperator.start_direction` (the loss gradient for a
            :class:`hesd.HessianOperator`; plain matrices have none). The gradient of a trained
            network lies mostly in its top eigenvectors' span, so Lanczos starts closer to them
            (fewer products to the same residuals, BENCHMARKS.md §5). The random half keeps every
            eigenvector's overlap with the start vector, so nothing is missed that a random start
            would find, and the stopping test (residuals) is unchanged. It can cost products
            where the gradient weighs an eigenvalue just below the largest: on a random-init
            GPT-2 of 40 M parameters 40 products against 26–39 from random starts (BENCHMARKS.md
            §9). ``False``: a random start only. ``"SA"`` always starts at random.
        warn: warn when not converged.
        reorth: ``"full"`` — the restarted method above; ``"window"`` — Lanczos over a window of
            3 vectors, without restarts (:mod:`hesd.algorithms.extremes`): for the extreme value
            at each end only (``k=1``, or ``k=2`` with ``which="BE"``) and without eigenvectors,
            in 3 vectors of memory instead of ``max_basis + 1``, each step reading 3 of them
            instead of up to ``max_basis``, in about as many products. The stopping test and
            the residual bound are the same.

    Returns:
        :class:`hesd.algorithms.EigenResult`.

    Examples:
        >>> import torch, hesd
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> hesd.eigenvalues(A, k=2, which="BE").eigenvalues.round(decimals=6).tolist()
        [1.0, 100.0]
    """
    caller = "eigenvalues"
    op = as_operator(A, caller)
    n = op.full_dim  # the whole dimension (each rank holds op.shape[0] rows when vectors are sharded)
    check_positive_int(k, "k", caller)
    if k > n:
        raise HesdValueError(f"{caller}: k={k} is larger than the operator's dimension {n}")
    if which not in _WHICH:
        raise HesdValueError(f"{caller}: which must be one of {_WHICH}, got {which!r}")
    if not tol > 0:
        raise HesdValueError(f"{caller}: tol must be positive, got {tol}")
    if reorth not in ("full", "window"):
        raise HesdValueError(f"{caller}: reorth must be 'full' or 'window', got {reorth!r}")
    if reorth == "window":
        if return_eigenvectors or max_basis is not None or not (k == 1 or (k == 2 and which == "BE")):
            raise HesdValueError(
                f"{caller}: reorth='window' finds the extreme eigenvalue at each end (k=1, or k=2 with which='BE'), "
                f"without eigenvectors and without a basis (got k={k}, which={which!r}, return_eigenvectors="
                f"{return_eigenvectors}, max_basis={max_basis}): converged values come back as copies that would count "
                "as further eigenvalues, and no basis is kept; use reorth='full'"
            )
    m_max = min(n, max_basis if max_basis is not None else max(2 * k + 20, 40))
    if m_max < min(n, k + 1):
        raise HesdValueError(f"{caller}: max_basis={max_basis} must exceed k={k}")
    max_matvecs = max_matvecs if max_matvecs is not None else max(500, 30 * k)
    dtype, device = op.dtype, op.device
    rows = op.shape[0]  # this rank's rows of each vector (n unless sharded)
    red = op.reduce_inner  # sums partial inner products over the ranks (identity unless sharded)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return row_norms(x.unsqueeze(0), op)[0]

    def draw(s: int, out: torch.Tensor | None = None) -> torch.Tensor:  # drawn whole, this rank's rows kept
        if not op.sharded:
            return gaussian(n, s, dtype, device, out=out)
        g = op.local_rows(gaussian(n, s, dtype, device).unsqueeze(1)).squeeze(1)
        return g if out is None else out.copy_(g)

    def _start(q: torch.Tensor) -> torch.Tensor:  # the normalised start vector, written into q
        if v0 is not None:
            v = v0.to(device=device, dtype=dtype).reshape(-1)
            q.copy_(op.local_rows(v.unsqueeze(1)).squeeze(1) if op.sharded and v.numel() == n != rows else v)
        else:
            draw(seed, out=q)
            hint = op.start_direction() if start_hint and which != "SA" else None
            if hint is not None:
                hint = hint.to(device=device, dtype=dtype).reshape(-1)
                q.div_(norm(q))
                h = norm(hint)
                for c in range(0, rows, _RESTART_COLUMNS):  # q += hint / ‖hint‖, a block at a time
                    q[c : c + _RESTART_COLUMNS] += hint[c : c + _RESTART_COLUMNS] / h
            del hint  # a gradient-sized vector: not held through the products
        return q.div_(norm(q))

    if reorth == "window":
        start = _start(torch.empty(rows, dtype=dtype, device=device))
        vals, res, done, used, ritz = windowed_extremes(op, start, k, which, tol, max_matvecs)
        del start
        info = {"restarts": 0, "basis_size": WINDOW}
        return _result(vals.to(dtype), None, res, done, used, which, info, tol, warn, ritz,
                       "raise max_matvecs, or loosen tol")  # fmt: skip
    Q = basis_buffer((m_max + 1, rows), dtype, device)  # hesd.allocator; rows are read only once written
    T = torch.zeros(m_max, m_max, dtype=torch.float64)
    _start(Q[0])  # built in place: no vector-sized temporaries beside the basis
    j = 0  # number of basis vectors with a filled column of T
    coupled = 0  # the column whose product couples to every earlier basis vector (after a thick restart)
    matvecs = 0
    restarts = 0
    fresh = 0  # seeds for replacement vectors after breakdown
    eps = torch.finfo(dtype).eps
    theta = S = None
    beta = 0.0
    converged = False
    while True:
        w = writable(op @ Q[j], Q)  # updated in place: no vector-sized temporaries (hesd.algorithms.lanczos)
        matvecs += 1
        lo = 0 if j == coupled else max(j - 1, 0)  # the first pass: where A q_j has O(1) components (_LOCAL)
        h = torch.zeros(j + 1, dtype=torch.float64, device=w.device)
        pending = None  # the compiled step's second-pass coefficients, not yet subtracted from w
        if fused.usable(Q, w):  # three compiled sweeps (hesd.algorithms.fused), the last into Q[j + 1]
            h[lo:], h2, beta_sq = _project_compiled(Q, w, lo, j, red)
            if beta_sq is not None:
                pending, beta = h2, math.sqrt(beta_sq)
            else:  # near breakdown: subtracted here and the norm taken explicitly
                w.addmv_(Q[: j + 1].T, h2.to(dtype), alpha=-1)
                beta = float(norm(w))
        else:
            h[lo:] = red(inner(Q[None, lo : j + 1], w[None])[0])  # float64 (hesd.algorithms.inner)
            w.addmv_(Q[lo : j + 1].T, h[lo:].to(dtype), alpha=-1)
            h2 = red(inner(Q[None, : j + 1], w[None])[0])  # the second pass: the whole basis
            w.addmv_(Q[: j + 1].T, h2.to(dtype), alpha=-1)
            beta = float(norm(w))
        h = (h + h2).cpu()
        T[: j + 1, j] = h
        T[j, : j + 1] = h
        j += 1
        theta, S = torch.linalg.eigh(T[:j, :j])
        anorm = float(theta.abs().max()) if j else 0.0
        done = settled(theta, S, 0.0 if j >= n else beta, which, k, tol)[2]
        if done:
            converged = True
            break
        if matvecs >= max_matvecs:
            break
        if beta <= 100 * eps * max(anorm, 1e-300):
            # Invariant subspace: continue with a random vector orthogonal to the basis.
            fresh += 1
            r = draw(seed + 7919 * fresh)
            for _ in range(2):
                r.addmv_(Q[:j].T, red(inner(Q[None, :j], r[None])[0]).to(dtype), alpha=-1)
            nr = norm(r)
            if nr <= eps * math.sqrt(n):
                converged = True  # the basis spans the whole space
                break
            beta = 0.0
            q_next = r.div_(nr)
            del r
        elif j < m_max:
            if pending is not None:  # the second pass's subtraction and the division, one sweep into the basis
                fused.subtract_into(Q, range(j), pending, w, j, beta)
            else:  # straight into the basis: one vector pass fewer than dividing, then copying
                torch.div(w, beta, out=Q[j])
            del w  # the next product's output is the only vector beside the basis
            continue
        else:
            if pending is not None:
                w.addmv_(Q[:j].T, pending.to(dtype), alpha=-1)
            q_next = w.div_(beta)
        del w
        if j < m_max:
            Q[j] = q_next
            del q_next
            continue
        # Thick restart: keep the most wanted Ritz vectors plus the residual direction.
        restarts += 1
        keep = min(j - 1, max(k + (m_max - k) // 2, k + 1))
        kept = order(theta, which)[:keep]
        Yt = S[:, kept].T.to(dtype=dtype, device=device)
        for c in range(0, rows, _RESTART_COLUMNS):  # in place, a block of columns at a time: no second basis
            Q[:keep, c : c + _RESTART_COLUMNS] = Yt @ Q[:j, c : c + _RESTART_COLUMNS]
        coupling = beta * S[j - 1, kept]
        T.zero_()
        T[:keep, :keep] = torch.diag(theta[kept])
        T[:keep, keep] = coupling
        T[keep, :keep] = coupling
        Q[keep] = q_next
        del q_next
        # Column `keep` of T is recomputed (with the coupling) by the next expansion.
        j = coupled = keep
    idx = wanted(theta, which, min(k, len(theta)))
    vals = theta[idx]
    resid_all = (beta * S[j - 1].abs()) if j < n else torch.zeros(len(theta), dtype=torch.float64)
    perm = arrange(vals, which)
    vals, idx = vals[perm], idx[perm]
    vecs = Q[:j].T @ S[:, idx].to(dtype=dtype, device=device) if return_eigenvectors else None
    info = {"restarts": restarts, "basis_size": m_max}
    return _result(vals.to(dtype), vecs, resid_all[idx], converged, matvecs, which, info, tol, warn, theta)


def _project_compiled(
    Q: torch.Tensor, w: torch.Tensor, lo: int, j: int, red: Any
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    r"""The two Gram-Schmidt passes of an expansion in :mod:`hesd.algorithms.fused`'s sweeps.

    The first pass against ``Q[lo : j + 1]``, then its subtraction, the second pass's
    coefficients :math:`h_2` over ``Q[: j + 1]`` and :math:`\|w\|^2` in one sweep. The second
    pass's subtraction is left to the caller, which writes it with the division into the basis
    (:func:`hesd.algorithms.fused.subtract_into`).

    Returns:
        the first pass's coefficients, :math:`h_2` (both float64), and :math:`\beta^2` by
        :func:`hesd.algorithms.basis.pythagoras`; ``None`` where it does not hold (near breakdown,
        or not finite): the caller subtracts :math:`h_2` and takes the norm.
    """
    first = range(lo, j + 1)
    h = red(fused.products(Q, first, w))
    r = red(fused.subtract_then_products(Q, first, h, range(j + 1), w))
    beta_sq = basis.pythagoras(r[:-1], r[-1])
    return h, r[:-1], None if beta_sq is None else float(beta_sq)


def _result(
    vals: torch.Tensor,
    vecs: torch.Tensor | None,
    res: torch.Tensor,
    converged: bool,
    matvecs: int,
    which: str,
    info: dict,
    tol: float,
    warn: bool,
    theta: torch.Tensor,
    advice: str = "raise max_matvecs or max_basis, or loosen tol",
) -> EigenResult:
    """The :class:`EigenResult`, warning (``advice`` last) if not converged and ``warn``; ``theta``: all Ritz values."""
    if not converged and warn:
        warnings.warn(
            f"eigenvalues: not converged after {matvecs} products (largest relative residual "
            f"{float(res.max()) / max(float(theta.abs().max()), 1e-300):.2e} > tol={tol}); {advice}",
            RuntimeWarning,
            stacklevel=3,
        )
    return EigenResult(eigenvalues=vals, eigenvectors=vecs, residuals=res, converged=converged, num_matvecs=matvecs,
                       which=which, info=info)  # fmt: skip
