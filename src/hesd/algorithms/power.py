r"""Deflated power iteration (the classic approach of PyHessian), for parity and comparison.

Finds the ``k`` eigenvalues of largest *magnitude*: for each, iterate
:math:`v \leftarrow (I - U U^\top) A v / \|\cdot\|` against the eigenvectors :math:`U` found
so far, with Rayleigh quotient :math:`\theta = v^\top A v`, until the residual
:math:`\|A v - \theta v\| \le \text{tol}\cdot|\theta|`. Unlike a stop on the change between
iterations, the residual test certifies each value (Weyl's bound). On indefinite
Hessians prefer :func:`hesd.eigenvalues` with ``which="LA"``/``"BE"``: power iteration
converges slowly when two magnitudes are close (e.g. λ and −λ).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..checks import check_positive_int
from ..errors import HesdValueError
from ..operators.linear import as_operator
from .inner import dots, norms
from .probes import gaussian
from .results import EigenResult

__all__ = ["power_iteration"]


def power_iteration(
    A: Any,
    k: int = 1,
    *,
    tol: float = 1e-4,
    max_iter: int = 1000,
    seed: int = 0,
    warn: bool = True,
) -> EigenResult:
    """Top-``k`` largest-magnitude eigenpairs by deflated power iteration.

    Args:
        A: symmetric operator, tensor or SciPy operator.
        k: number of eigenpairs.
        tol: relative residual tolerance per eigenpair.
        max_iter: iterations per eigenpair before giving up (``converged=False``, warning).
        seed: seed of the start vectors.
        warn: warn when an eigenpair does not converge.

    Returns:
        :class:`hesd.algorithms.EigenResult` (eigenvalues in the order found, eigenvectors included).

    Examples:
        >>> import torch, hesd
        >>> A = torch.diag(torch.tensor([1.0, -5.0, 3.0], dtype=torch.float64))
        >>> hesd.power_iteration(A, k=2, tol=1e-8).eigenvalues.round(decimals=6).tolist()
        [-5.0, 3.0]
    """
    caller = "power_iteration"
    op = as_operator(A, caller)
    n = op.shape[0]
    check_positive_int(k, "k", caller)
    check_positive_int(max_iter, "max_iter", caller)
    if k > n:
        raise HesdValueError(f"{caller}: k={k} is larger than the operator's dimension {n}")
    vecs: list[torch.Tensor] = []
    vals, res = [], []
    all_conv = True
    matvecs = 0

    def deflate(x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            for u in vecs:
                x = x - dots(u[None], x[None])[0].to(x.dtype) * u
        return x

    for i in range(k):
        v = deflate(gaussian(n, seed + 104729 * i, op.dtype, op.device))
        v = v / float(norms(v[None])[0])
        theta, r, conv = 0.0, float("inf"), False
        for _ in range(max_iter):
            w = deflate(op @ v)
            matvecs += 1
            theta = float(dots(v[None], w[None])[0])
            r = float(norms((w - theta * v)[None])[0])
            nw = float(norms(w[None])[0])
            if r <= tol * abs(theta) or nw == 0:
                conv = True
                break
            v = w / nw
        vecs.append(v)
        vals.append(theta)
        res.append(r)
        all_conv &= conv
    if not all_conv and warn:
        warnings.warn(
            f"{caller}: not all {k} eigenpairs converged in {max_iter} iterations each; "
            "use hesd.eigenvalues (restarted Lanczos) instead",
            RuntimeWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=torch.tensor(vals, dtype=op.dtype),
        eigenvectors=torch.stack(vecs, dim=1),
        residuals=torch.tensor(res, dtype=torch.float64),
        converged=all_conv,
        num_matvecs=matvecs,
        which="LM",
    )
