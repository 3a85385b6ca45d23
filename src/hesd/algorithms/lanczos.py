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

__all__ = ["LanczosResult", "eigenvalues", "lanczos", "lanczos_lockstep"]

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
    """Lanczos bases of ``b`` recurrences run in lockstep: full, a sliding window, or none.

    Stored as ``(b, size, n)`` in any dtype and on any device; rows of probes that stop are
    dropped (:meth:`keep`) so the active bases stay contiguous.
    """

    def __init__(self, b: int, n: int, m: int, reorth: str, window: int | None, dtype, device, op: LinearOperator):
        self.reorth = reorth
        self.size = {"full": m, "window": window or 0, "none": 0}[reorth]
        self.dtype = dtype or op.dtype
        self.device = torch.device(device) if device is not None else op.device
        self.op_dtype, self.op_device = op.dtype, op.device
        self.store = torch.empty(b, self.size, n, dtype=self.dtype, device=self.device) if self.size else None
        self.count = 0

    def add(self, Q: torch.Tensor) -> None:
        if self.store is None:
            return
        slot = self.count % self.size if self.reorth == "window" else self.count
        self.store[:, slot] = Q.to(device=self.device, dtype=self.dtype)
        self.count += 1

    @property
    def exact(self) -> bool:
        """Whether every basis vector is stored exactly (full, in the operator's dtype and device):
        then :meth:`project` can take the recurrence coefficients from the projection itself."""
        return self.reorth == "full" and self.dtype == self.op_dtype and self.device == self.op_device

    def orthogonalise(self, W: torch.Tensor) -> torch.Tensor:
        """Remove from each row of ``W`` (``(b, n)``) its components along that probe's basis."""
        if self.store is None or self.count == 0:
            return W
        Q = self.store[:, : min(self.count, self.size)].to(device=self.op_device, dtype=self.op_dtype)
        for _ in range(2):  # classical Gram-Schmidt twice ("twice is enough")
            W = W - torch.bmm(Q.transpose(1, 2), torch.bmm(Q, W.unsqueeze(2))).squeeze(2)
        return W

    def project(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Full re-orthogonalisation that also yields :math:`\alpha_j` (only when :attr:`exact`).

        Classical Gram-Schmidt twice on :math:`w = A q_j`, the first pass local, the second
        full:

        1. against :math:`q_{j-1}, q_j` only: coefficients :math:`h`, whose last entry is
           :math:`\alpha_j = q_j^\top A q_j` (the other is :math:`\beta_{j-1}`). This is the
           three-term recurrence written as a projection. Along every older :math:`q_i`,
           :math:`q_i^\top A q_j = (A q_i)^\top q_j` is of order :math:`\epsilon\|A\|`,
           because :math:`A q_i` lies in :math:`\operatorname{span}(q_0 \dots q_{i+1})` up to the
           rounding that step :math:`i` removed.
        2. against the whole basis :math:`Q_j = [q_0 \dots q_j]`: removes those rounding-level
           components and the first pass's own rounding; its last coefficient corrects
           :math:`\alpha_j`.

        The second pass's input is therefore orthogonal to :math:`Q_j` to a relative
        :math:`\epsilon\|A\|/\beta_j`, at most about 1 % while :math:`\beta_j` is above the
        breakdown threshold :math:`100\,\epsilon\,\|T\|`, so one full pass restores
        orthogonality to rounding ("twice is enough" needs a nearly orthogonal input, not a
        full first pass). Measured on 400-dimensional spectra with outliers, clusters, a
        geometric decay and near-low rank, in float32 and float64, 200 steps: the basis stays
        orthonormal to the same :math:`2\cdot10^{-7}` / :math:`2\cdot10^{-15}` as two full
        passes, while a single full pass loses orthogonality completely.

        Cost: two reads of the stored basis a step instead of four, in 4 tensor operations.
        With a free operator (``benchmarks/profile_hesd.py --task lanczos``), 100 steps cost
        89 instead of 111 µs a step at the digits MLP's 3466 parameters and 5.2 instead of
        10.3 ms at ResNet-20's 0.27 M (``benchmarks/results/cpu/lanczos_step.txt``). Next to a
        real product the gain mostly vanishes: the product evicts the basis from the cache,
        and the first read, which both forms make, is what a step pays.

        Returns the orthogonalised ``W`` and ``alpha``.
        """
        Q = self.store[:, : self.count]
        local = Q[:, -2:]  # q_{j-1}, q_j: the only directions with O(1) components in A q_j
        W3 = W.unsqueeze(2)
        h = torch.bmm(local, W3)
        W3 = torch.baddbmm(W3, local.transpose(1, 2), h, alpha=-1)
        h2 = torch.bmm(Q, W3)
        W3 = torch.baddbmm(W3, Q.transpose(1, 2), h2, alpha=-1)
        return W3.squeeze(2), (h[:, -1, 0] + h2[:, -1, 0])

    def keep(self, rows: torch.Tensor) -> None:
        if self.store is not None:
            self.store = self.store[rows.to(self.device)]


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

    Example:
        >>> import torch, hesd
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> r = hesd.algorithms.lanczos(A, torch.ones(3, dtype=torch.float64), 3)
        >>> round(float(r.alpha[0]), 12)  # the Rayleigh quotient of the start vector
        2.0
    """
    caller = "lanczos"
    op = as_operator(A, caller)
    v0 = torch.as_tensor(v0)
    if v0.dim() != 1 or v0.shape[0] != op.shape[0]:
        raise ValueError(f"{caller}: v0 must be a vector of length {op.shape[0]}, got shape {tuple(v0.shape)}")
    return lanczos_lockstep(
        op,
        v0[:, None],
        num_steps,
        reorth=reorth,
        window=window,
        basis_dtype=basis_dtype,
        basis_device=basis_device,
        breakdown_tol=breakdown_tol,
        callback=(lambda p, j: callback(j)) if callback is not None else None,
        should_stop=[should_stop],
    )[0]


def lanczos_lockstep(
    A: Any,
    V0: torch.Tensor,
    num_steps: int,
    *,
    reorth: str = "full",
    window: int | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: str | torch.device | None = None,
    breakdown_tol: float | None = None,
    callback: Callable[[int, int], None] | None = None,
    should_stop: list[Callable[[list[float], list[float]], bool] | None] | None = None,
) -> list[LanczosResult]:
    r"""Run independent Lanczos recurrences from the ``b`` columns of ``V0`` in lockstep.

    Each step multiplies the operator by all still-running Lanczos vectors at once
    (``A @ Q`` with ``Q`` of shape ``(n, b)``), so an operator that batches columns
    (:class:`hesd.HessianOperator` with ``batch_columns > 1``, e.g. on a GPU) does one
    batched pass per step instead of ``b``. The recurrences do not interact: each column's
    result equals :func:`lanczos` from that column, to rounding (tested). A recurrence that
    breaks down or whose ``should_stop`` fires leaves the block; the others go on.

    Args:
        A, num_steps, reorth, window, basis_dtype, basis_device, breakdown_tol: as for
            :func:`lanczos` (the basis memory is ``b`` times that of one recurrence).
        V0: ``(n, b)`` start vectors, one per column (each normalised here).
        callback: ``callback(column, step)`` after each step of each recurrence.
        should_stop: one ``should_stop(alphas, betas)`` (or ``None``) per column.

    Returns:
        one :class:`LanczosResult` per column, in column order.
    """
    caller = "lanczos_lockstep"
    op = as_operator(A, caller)
    n = op.shape[0]
    check_positive_int(num_steps, "num_steps", caller)
    if reorth not in ("full", "window", "none"):
        raise ValueError(f"{caller}: reorth must be 'full', 'window' or 'none', got {reorth!r}")
    if reorth == "window":
        check_positive_int(window, "window", caller)  # type: ignore[arg-type]
    if V0.dim() != 2 or V0.shape[0] != n or V0.shape[1] == 0:
        raise ValueError(f"{caller}: V0 must have shape ({n}, b) with b >= 1, got {tuple(V0.shape)}")
    b = V0.shape[1]
    stops = list(should_stop) if should_stop is not None else [None] * b
    if len(stops) != b:
        raise ValueError(f"{caller}: should_stop has {len(stops)} entries for {b} start vectors")
    num_steps = min(num_steps, n)
    eps = torch.finfo(op.dtype).eps
    basis = _Basis(b, n, num_steps, reorth, window, basis_dtype, basis_device, op)
    exact = basis.exact
    Q = V0.to(device=op.device, dtype=op.dtype).T.contiguous()
    norms = torch.linalg.vector_norm(Q, dim=1)
    if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
        raise ValueError(f"{caller}: start vectors must be finite and non-zero")
    Q = Q / norms[:, None]
    Q_prev = torch.zeros_like(Q)
    beta_prev = torch.zeros(b, dtype=op.dtype, device=op.device)
    active = list(range(b))
    alphas: list[list[float]] = [[] for _ in range(b)]
    betas: list[list[float]] = [[] for _ in range(b)]
    anorm = [0.0] * b
    last_beta = [0.0] * b
    broke = [False] * b
    for j in range(num_steps):
        basis.add(Q)
        W = (op @ Q.T).T
        if exact:
            W, alpha = basis.project(W)
        else:
            alpha = (Q * W).sum(dim=1)
            W = W - alpha[:, None] * Q - beta_prev[:, None] * Q_prev
            W = basis.orthogonalise(W)
        beta = torch.linalg.vector_norm(W, dim=1)
        keep: list[int] = []
        for row, (p, a, bt) in enumerate(zip(active, alpha.tolist(), beta.tolist(), strict=True)):
            if not math.isfinite(bt) or not math.isfinite(a):
                raise FloatingPointError(f"{caller}: a product returned NaN/inf at step {j}; check the operator")
            alphas[p].append(a)
            prev = betas[p][-1] if betas[p] else 0.0
            anorm[p] = max(anorm[p], abs(a) + bt + prev)
            last_beta[p] = bt
            if callback is not None:
                callback(p, j)
            tol = breakdown_tol if breakdown_tol is not None else 100 * eps * max(anorm[p], 1e-300)
            if j == num_steps - 1:
                continue
            if bt <= tol:
                broke[p] = True
                continue
            stop = stops[p]
            if stop is not None and stop(alphas[p], betas[p]):
                continue
            betas[p].append(bt)
            keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, dtype=torch.long, device=op.device)
            Q, W, beta = Q[rows], W[rows], beta[rows]
            basis.keep(rows)
            active = [active[r] for r in keep]
        Q_prev, Q, beta_prev = Q, W / beta[:, None], beta
    return [
        LanczosResult(
            alpha=torch.tensor(alphas[p], dtype=torch.float64),
            beta=torch.tensor(betas[p], dtype=torch.float64),
            residual_norm=0.0 if broke[p] else last_beta[p],
            broke_down=broke[p],
            num_matvecs=len(alphas[p]),
        )
        for p in range(b)
    ]


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
    start_hint: bool = True,
    warn: bool = True,
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
    :math:`r_i^2/\delta_i`, with :math:`\delta_i` the gap to the nearest other Ritz value,
    was tried and dropped: on a trained ResNet-20 it stopped at 11 instead of 14 products
    with a 1.9e-3 error for ``tol=1e-3``, because unconverged Ritz values overstate the gap.

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
        start_hint: for ``which`` in ``"LA"``, ``"LM"``, ``"BE"`` and without ``v0``, start from
            :math:`z/\|z\| + d/\|d\|` with :math:`z` random and :math:`d` the operator's
            :meth:`~hesd.operators.LinearOperator.start_direction` (the loss gradient for a
            :class:`hesd.HessianOperator`; plain matrices have none). The gradient of a trained
            network lies mostly in its top eigenvectors' span, so Lanczos starts closer to them:
            top-5 to ``tol=1e-3`` took 11–12 products instead of 13–16 on a trained ResNet-20 and
            11–12 instead of 13 on the trained digits MLP, and 35 instead of 35–40 and 27–28
            instead of 26–29 at initialisation (3 seeds each, the same accuracy). The random half
            keeps every eigenvector's overlap with the start vector, so nothing is missed that a
            random start would find, and the stopping test (residuals) is unchanged. ``False``:
            a random start only. ``"SA"`` always starts at random.
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
    if v0 is not None:
        q = v0.to(device=device, dtype=dtype).reshape(-1)
    else:
        q = gaussian(n, seed, dtype, device)
        hint = op.start_direction() if start_hint and which != "SA" else None
        if hint is not None:
            q = q / torch.linalg.vector_norm(q) + hint.to(device=device, dtype=dtype) / torch.linalg.vector_norm(hint)
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
    resid_all = (beta * S[j - 1].abs()) if j < n else torch.zeros(len(theta), dtype=torch.float64)
    order = torch.argsort(vals, descending=which in ("LA", "LM"))
    if which == "LM":
        order = torch.argsort(vals.abs(), descending=True)
    vals, idx = vals[order], idx[order]
    res = resid_all[idx]
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
