r"""Stochastic trace estimation: Hutchinson and Hutch++.

* Hutchinson: :math:`\operatorname{tr}(A) \approx \frac{1}{m}\sum_i z_i^\top A z_i` with
  Rademacher :math:`z_i`; variance :math:`2(\|A\|_F^2 - \sum_i A_{ii}^2)/m`.
* Hutch++ (Meyer, Musco, Musco, Williams 2021): with :math:`m` products, sketch
  :math:`Q = \operatorname{orth}(A S)` from :math:`m/3` probes, take
  :math:`\operatorname{tr}(Q^\top A Q)` exactly (:math:`m/3` products) and Hutchinson on the
  deflated remainder :math:`(I - QQ^\top) A (I - QQ^\top)` with the last :math:`m/3`.
  The variance falls like :math:`1/m^2` instead of :math:`1/m` when the spectrum decays,
  as Hessian spectra do.

The standard error is the sample standard deviation of the stochastic part divided by
the square root of its probe count. Probes are pushed through the operator in chunks of
``chunk`` columns, so memory stays bounded.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..operators._base import as_operator
from ._common import TraceResult, check_positive_int, rademacher

__all__ = ["trace"]


def _apply(op, Z: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([op @ Z[:, s : s + chunk] for s in range(0, Z.shape[1], chunk)], dim=1)


def trace(
    A: Any,
    method: str = "hutchpp",
    num_matvecs: int = 60,
    *,
    seed: int = 0,
    chunk: int = 8,
) -> TraceResult:
    """Estimate ``tr(A)`` with a standard error.

    Args:
        A: symmetric operator, tensor or SciPy operator.
        method: ``"hutchpp"`` (default) or ``"hutchinson"``.
        num_matvecs: total operator products (Hutch++ needs at least 3).
        seed: probe seed.
        chunk: probes per operator call (memory bound).

    Returns:
        :class:`hesd.algorithms.TraceResult`.

    Example:
        >>> import torch, hesd
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> r = hesd.trace(A, method="hutchinson", num_matvecs=10)
        >>> r.estimate  # Rademacher probes are exact on diagonal matrices
        55.0
    """
    caller = "trace"
    op = as_operator(A, caller)
    n = op.shape[0]
    check_positive_int(num_matvecs, "num_matvecs", caller)
    check_positive_int(chunk, "chunk", caller)
    dt, dev = op.dtype, op.device
    if method == "hutchinson":
        Z = rademacher(n, num_matvecs, seed, dt, dev)
        AZ = _apply(op, Z, chunk)
        samples = (Z * AZ).sum(dim=0).to(torch.float64).cpu()
        est = float(samples.mean())
        se = float(samples.std(unbiased=True) / math.sqrt(num_matvecs)) if num_matvecs > 1 else math.inf
        return TraceResult(est, se, num_matvecs, method, samples)
    if method != "hutchpp":
        raise ValueError(f"{caller}: method must be 'hutchinson' or 'hutchpp', got {method!r}")
    if num_matvecs < 3:
        raise ValueError(f"{caller}: hutchpp needs num_matvecs >= 3, got {num_matvecs}")
    s = num_matvecs // 3
    g = num_matvecs - 2 * s
    S = rademacher(n, s, seed, dt, dev)
    Q, _ = torch.linalg.qr(_apply(op, S, chunk))
    t_low = float(torch.sum(Q * _apply(op, Q, chunk)))
    G = rademacher(n, g, seed, dt, dev, offset=s)
    G = G - Q @ (Q.T @ G)
    samples = (G * _apply(op, G, chunk)).sum(dim=0).to(torch.float64).cpu()
    est = t_low + float(samples.mean())
    se = float(samples.std(unbiased=True) / math.sqrt(g)) if g > 1 else math.inf
    return TraceResult(est, se, num_matvecs, method, samples)
