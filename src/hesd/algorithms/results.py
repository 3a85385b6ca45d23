"""Result types of the spectral algorithms."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["EigenResult", "TraceResult"]


@dataclass
class EigenResult:
    """Extreme eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` tensor, ordered as the ``which`` argument asks (LA and LM:
            descending; SA and BE: ascending).
        eigenvectors: ``(n, k)`` tensor of unit eigenvectors, or ``None`` if not requested.
        residuals: ``(k,)`` residual norms ``‖A x − θ x‖``; an eigenvalue of ``A`` lies
            within this distance of each reported value.
        converged: whether every residual met the tolerance.
        num_matvecs: operator products used.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: bool
    num_matvecs: int
    which: str = "LA"
    info: dict = field(default_factory=dict)


@dataclass
class TraceResult:
    """A stochastic trace estimate.

    Attributes:
        estimate: the trace estimate.
        stderr: its standard error (sample standard deviation of the stochastic part over
            the square root of its probe count).
        num_matvecs: operator products used.
        method: the estimator that produced ``estimate``: ``"hutchinson"`` or ``"hutchpp"``
            (for ``method="auto"``, the one it chose).
        samples: the per-probe quadratic forms of the stochastic part.
        info: for ``method="auto"``, how it chose (see :func:`hesd.trace`).
    """

    estimate: float
    stderr: float
    num_matvecs: int
    method: str
    samples: torch.Tensor = field(repr=False)
    info: dict = field(default_factory=dict)

    def __float__(self) -> float:
        return self.estimate
