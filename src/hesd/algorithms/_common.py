"""Shared pieces of the algorithms: seeded probes, results, argument checks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def rademacher(n: int, k: int, seed: int, dtype: torch.dtype, device: torch.device, offset: int = 0) -> torch.Tensor:
    """``(n, k)`` Rademacher (±1) probes, identical for a given ``seed`` on every device and dtype.

    Column ``j`` is drawn from generator state ``seed`` advanced by ``offset + j`` probes,
    so chunked and unchunked draws agree.
    """
    out = torch.empty(n, k, dtype=dtype, device=device)
    for j in range(k):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + offset + j)
        out[:, j] = (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(dtype)
    return out


def gaussian(n: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A seeded standard normal vector, the same on every device."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def check_positive_int(value: int, name: str, caller: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{caller}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


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
