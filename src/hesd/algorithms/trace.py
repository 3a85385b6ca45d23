r"""Stochastic trace estimation: Hutchinson, Hutch++ and a choice between them.

* Hutchinson: :math:`\operatorname{tr}(A) \approx \frac{1}{m}\sum_i z_i^\top A z_i` with
  Rademacher :math:`z_i`; variance :math:`2(\|A\|_F^2 - \sum_i A_{ii}^2)/m`.
* Hutch++ (Meyer, Musco, Musco, Williams 2021): with :math:`m` products, sketch
  :math:`Q = \operatorname{orth}(A S)` from :math:`m/3` probes, take
  :math:`\operatorname{tr}(Q^\top A Q)` exactly (:math:`m/3` products) and Hutchinson on the
  deflated remainder :math:`(I - QQ^\top) A (I - QQ^\top)` with the last :math:`m/3`.
  The variance falls like :math:`1/m^2` instead of :math:`1/m` when the spectrum decays,
  as Hessian spectra do.

* Auto: Hutch++'s sketch first, then whichever of the two estimators it predicts to have the
  smaller variance with the products left (see :func:`trace`). On a flat spectrum
  (a network at initialisation) deflation removes little and Hutch++ loses to Hutchinson;
  ``"auto"`` then spends the rest on plain Hutchinson probes.

The standard error is the sample standard deviation of the stochastic part divided by the
square root of its probe count. Probes are drawn and pushed through the operator in chunks of
``chunk`` columns, and only a chunk of probes and products is held at a time: beside the operator,
Hutchinson holds two ``(n, chunk)`` matrices and Hutch++ its ``(n, m/3)`` sketch too (which
becomes ``Q`` in place). Probes, products and the sketch are stored column by column, each
column one contiguous vector, as operators take and give them (no transposing copies). Every
quadratic form and projection is accumulated in float64
(:func:`hesd.algorithms.inner.columns`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import check_positive_int
from ..errors import HesdValueError
from ..operators.linear import as_operator
from .inner import CHUNK, columns
from .probes import rademacher
from .results import TraceResult

__all__ = ["trace"]


def _columns(op, X: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
    """``XᵀY`` in float64 on the CPU, summed over the ranks when ``op``'s vectors are sharded."""
    return op.reduce_inner(columns(X, Y)).cpu()


def _probes(op, seed: int, offset: int, width: int) -> torch.Tensor:
    """Rademacher probes ``offset … offset + width − 1`` of stream ``seed``: drawn whole, this rank's rows kept."""
    Z = rademacher(op.full_dim, width, seed, op.dtype, op.device, offset=offset)
    return op.local_rows(Z) if op.sharded else Z


def _forms(op, draw, count: int, chunk: int, Q: torch.Tensor | None = None) -> torch.Tensor:
    """``zᵢᵀ A zᵢ`` (float64, on the CPU) for ``count`` probes drawn ``chunk`` at a time by ``draw(start, width)``.

    Each probe is first projected off ``Q``'s columns when ``Q`` is given (Hutch++'s deflation). No
    more than ``chunk`` probes and their products are held at a time.
    """
    out = torch.empty(count, dtype=torch.float64)
    for start in range(0, count, chunk):
        Z = draw(start, min(chunk, count - start))
        if Q is not None:  # (I - QQᵀ)Z in place, QᵀZ accumulated in float64
            Z.addmm_(Q, _columns(op, Q, Z).to(device=Z.device, dtype=Z.dtype), alpha=-1)
        out[start : start + Z.shape[1]] = _columns(op, Z, op @ Z).diagonal()
    return out


def trace(
    A: Any,
    method: str = "auto",
    num_matvecs: int = 60,
    *,
    seed: int = 0,
    chunk: int = 8,
) -> TraceResult:
    r"""Estimate ``tr(A)`` with a standard error.

    ``method="auto"`` spends the first :math:`s = \lfloor m/3 \rfloor` products on Hutch++'s
    sketch :math:`Y = AS` and then predicts, from :math:`Y` alone, the variance of each way
    to spend the rest:

    * Hutch++ (:math:`s` products for :math:`\operatorname{tr}(Q^\top A Q)`, then
      :math:`m - 2s` deflated probes): :math:`2\,\hat\Delta / (m - 2s)`, where
      :math:`\hat\Delta` is the mean over the sketch's columns of
      :math:`\|(I - P_{-i})\,y_i\|^2 = 1/\|e_i^\top R^{-1}\|^2` (:math:`Y = QR`;
      :math:`P_{-i}` projects onto the other columns), an unbiased estimate of the
      Frobenius energy that a rank :math:`s-1` deflation leaves (an upper bound for rank
      :math:`s`; :math:`2\|\cdot\|_F^2` is a Gaussian probe's variance, Rademacher's is lower);
    * Hutchinson (:math:`m - s` fresh probes): :math:`v / (m - s)`, with :math:`v` the sample
      variance of the sketch's own quadratic forms :math:`s_i^\top y_i`.

    The smaller wins. The choice depends on the sketch only and each branch then uses fresh,
    independent probes, so the estimate stays unbiased (the sketch's quadratic forms are not
    reused: the choice depends on them). A sketch of :math:`s \ge n` columns spans the space,
    and Hutch++ is then exact: it is chosen. The sketch products that the Hutchinson branch cannot
    reuse are the price on a flat spectrum (a network at initialisation); BENCHMARKS.md §5 has the
    error over 200 seeds at initialisation and trained.

    Operators whose vectors are split across ranks (:class:`hesd.operators.sharded.ShardedOperator`,
    :class:`hesd.operators.fsdp.FSDPHessianOperator`) are run as in one process: each probe is drawn
    whole and cut, every quadratic form and Gram matrix is summed over the ranks (``reduce_inner``),
    and each rank holds its rows of the sketch (tested against one process to 1e-8).

    Args:
        A: symmetric operator, tensor or SciPy operator.
        method: ``"auto"`` (default), ``"hutchpp"`` or ``"hutchinson"``.
        num_matvecs: total operator products (Hutch++ and ``"auto"`` need at least 3).
        seed: probe seed. ``"auto"`` draws the same probes as ``"hutchpp"``, so where it
            chooses Hutch++ the two results are equal.
        chunk: probes per operator call (memory bound).

    Returns:
        :class:`hesd.algorithms.TraceResult`; for ``"auto"``, ``method`` is the estimator
        chosen and ``info`` holds ``left`` (:math:`\hat\Delta` over the mean
        :math:`\|y_i\|^2`, the share of the energy deflation leaves) and the two predicted
        variances.

    Examples:
        >>> import torch, hesd
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> r = hesd.trace(A, method="hutchinson", num_matvecs=10)
        >>> r.estimate  # Rademacher probes are exact on diagonal matrices
        55.0
    """
    caller = "trace"
    op = as_operator(A, caller)
    n = op.full_dim  # the whole dimension (each rank holds op.shape[0] rows when vectors are sharded)
    check_positive_int(num_matvecs, "num_matvecs", caller)
    check_positive_int(chunk, "chunk", caller)
    dt, dev = op.dtype, op.device
    if method == "hutchinson":
        return _hutchinson(op, num_matvecs, seed, 0, chunk, num_matvecs)
    if method not in ("hutchpp", "auto"):
        raise HesdValueError(f"{caller}: method must be 'hutchinson', 'hutchpp' or 'auto', got {method!r}")
    if num_matvecs < 3:
        raise HesdValueError(f"{caller}: {method} needs num_matvecs >= 3, got {num_matvecs}")
    s = num_matvecs // 3
    g = num_matvecs - 2 * s
    Y = torch.empty(s, op.shape[0], dtype=dt, device=dev).T  # the sketch A S (this rank's rows), column by column
    forms = torch.empty(s, dtype=torch.float64)  # the sketch's own quadratic forms sᵢᵀ yᵢ (for "auto")
    for a in range(0, s, chunk):
        S = _probes(op, seed, a, min(chunk, s - a))
        Y[:, a : a + S.shape[1]] = op @ S
        forms[a : a + S.shape[1]] = _columns(op, S, Y[:, a : a + S.shape[1]]).diagonal()
        del S
    energy = _columns(op, Y).diagonal()  # ‖yᵢ‖², each an unbiased estimate of ‖A‖_F²
    Q, R = _orthonormal(op, Y)  # in place: Q is Y where it can be
    del Y
    info: dict = {}
    if method == "auto":
        info = _predict(R, energy, forms, num_matvecs) if s < n else {"left": 0.0, "hutchpp_variance": 0.0}
        if info.get("hutchinson_variance", math.inf) < info["hutchpp_variance"]:
            del Q
            return _hutchinson(op, num_matvecs - s, seed, s, chunk, num_matvecs, info)
    t_low = float(_forms(op, lambda a, w: Q[:, a : a + w], Q.shape[1], chunk).sum())
    samples = _forms(op, lambda a, w: _probes(op, seed, s + a, w), g, chunk, Q)
    est = t_low + float(samples.mean())
    se = float(samples.std(unbiased=True) / math.sqrt(g)) if g > 1 else math.inf
    return TraceResult(est, se, num_matvecs, "hutchpp", samples, info)


def _orthonormal(op, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``Y = QR`` with ``Q``'s columns orthonormal: for float32, shifted Cholesky QR (CholeskyQR3).

    Hutch++ needs an orthogonal projector :math:`P = QQ^\top` (the split :math:`\operatorname{tr}(A) =
    \operatorname{tr}(Q^\top AQ) + \operatorname{tr}((I-P)A(I-P))` holds for no other ``Q``) onto the
    span of the sketch (what it leaves is sampled). LAPACK's float32 QR accumulates its inner
    products over all :math:`n` rows in float32: at GPT-2 small's :math:`n = 1.24 \times 10^8` its
    ``Q`` was orthonormal only to 2.8e-3 and its span off the sketch's, and Hutch++ on a rank-3
    operator from a 3-column sketch erred by 6.9e-3 where it is exact (BENCHMARKS.md §9). Here the
    Gram matrices are accumulated in float64 (:func:`hesd.algorithms.inner.columns`) and
    :math:`Q = Y C_1^{-1} C_2^{-1} C_3^{-1}`, each :math:`C` the Cholesky factor of the current
    :math:`Q^\top Q`, the first shifted by :math:`10^{-6}\operatorname{tr}(Y^\top Y)` so that it
    exists for any finite ``Y`` (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa, SIAM J. Sci.
    Comput. 2020), so ``Q`` spans the sketch's columns as computed; ``Y`` is overwritten by ``Q``
    (no second ``n × s`` matrix). Where that fails (a sketch of lower rank than its columns: then
    ``Q`` is checked and found not orthonormal), LAPACK's QR finishes on what the steps left; for
    other dtypes, LAPACK's QR of ``Y``. On vectors sharded across ranks (``op.sharded``: each rank
    holds its rows of ``Y``) every dtype takes the Cholesky steps, their Gram matrices summed over
    the ranks, and a sketch of lower rank than its columns is an error.
    """
    s = Y.shape[1]
    if not op.sharded and (Y.dtype != torch.float32 or not 0 < s <= Y.shape[0]):
        return torch.linalg.qr(Y)
    R = torch.eye(s, dtype=torch.float64)  # the original Y is Y R throughout
    for shift in (1e-6, 0.0, 0.0):
        C = _cholesky_step(op, Y, shift)
        if C is None:
            break
        R = C @ R
    else:
        tol = 1e-5 if Y.dtype == torch.float32 else 1e-10
        if float((_columns(op, Y) - torch.eye(s, dtype=torch.float64)).abs().max()) < tol:
            return Y, R.to(dtype=Y.dtype, device=Y.device)
    if op.sharded:
        raise HesdValueError(
            f"trace: Hutch++'s sketch of {s} columns has lower rank than that on sharded vectors, so it cannot "
            f"be orthonormalised across the ranks; use method='hutchinson' or fewer num_matvecs (the sketch "
            f"takes num_matvecs // 3 columns)"
        )
    Q, R_last = torch.linalg.qr(Y)  # Y's span as the steps left it, which is the sketch's
    return Q, (R_last.to(torch.float64).cpu() @ R).to(dtype=Y.dtype, device=Y.device)


def _cholesky_step(op, X: torch.Tensor, shift: float) -> torch.Tensor | None:
    """``X ← X C⁻¹`` in place, ``C`` upper with ``CᵀC = XᵀX + shift·tr(XᵀX)·I``; returns ``C`` (``None``: no factor)."""
    gram = _columns(op, X)
    gram += shift * float(gram.diagonal().sum()) * torch.eye(gram.shape[0], dtype=torch.float64)
    lower, failed = torch.linalg.cholesky_ex(gram)
    if failed or not bool(torch.isfinite(lower).all()):
        return None
    C = lower.T
    inverse = torch.linalg.solve_triangular(C, torch.eye(C.shape[0], dtype=torch.float64), upper=True)
    inverse = inverse.to(dtype=X.dtype, device=X.device)
    for r in range(0, X.shape[0], CHUNK):  # by blocks of rows: no second n × s matrix
        X[r : r + CHUNK] = X[r : r + CHUNK] @ inverse
    return C


def _hutchinson(op, count: int, seed: int, offset: int, chunk: int, total: int, info=None) -> TraceResult:
    """Hutchinson with ``count`` Rademacher probes (stream ``seed`` from ``offset``), ``total`` products in all."""
    samples = _forms(op, lambda a, w: _probes(op, seed, offset + a, w), count, chunk)
    se = float(samples.std(unbiased=True) / math.sqrt(count)) if count > 1 else math.inf
    return TraceResult(float(samples.mean()), se, total, "hutchinson", samples, info or {})


def _predict(R: torch.Tensor, energy: torch.Tensor, forms: torch.Tensor, m: int) -> dict:
    """``"auto"``'s prediction (see :func:`trace`) from the sketch ``Y = A S = QR``, ``‖yᵢ‖²`` and ``sᵢᵀyᵢ``."""
    s = R.shape[1]
    R64 = R.to(torch.float64).cpu()
    eye = torch.eye(s, dtype=torch.float64)
    rinv = torch.linalg.solve_triangular(R64, eye, upper=True)  # inf/nan where Y is rank deficient
    loo = 1.0 / (rinv**2).sum(dim=1)
    loo = torch.where(torch.isfinite(loo), loo, torch.zeros_like(loo))  # a dependent column: nothing left
    spread = float(forms.var(unbiased=True)) if s > 1 else 2 * float(energy.mean())
    left = float(loo.mean())
    return {
        "left": left / max(float(energy.mean()), 1e-300),
        "hutchpp_variance": 2 * left / (m - 2 * s),
        "hutchinson_variance": spread / (m - s),
    }
