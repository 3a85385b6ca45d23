r"""The spectral density estimate produced by stochastic Lanczos quadrature.

For a probe :math:`v` with :math:`\|v\| = 1` and :math:`m` Lanczos steps, the tridiagonal
:math:`T_m = S \Theta S^\top` gives Ritz values :math:`\theta_i` and Gauss quadrature weights
:math:`w_i = S_{1i}^2` (:math:`\sum_i w_i = 1`), so that
:math:`v^\top f(A) v \approx \sum_i w_i f(\theta_i)`. Averaging over probes estimates the
spectral density :math:`\phi(t) = \frac{1}{n}\sum_j \delta(t - \lambda_j)`, smoothed with a
Gaussian of width :math:`\sigma` for plotting:

.. math::  \phi_\sigma(t) = \frac{1}{n_v} \sum_{\text{probes}} \sum_i w_i\,
           \frac{1}{\sigma\sqrt{2\pi}} e^{-(t - \theta_i)^2 / 2\sigma^2}.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import HesdValueError

__all__ = ["Spectrum"]


@dataclass
class Spectrum:
    """Per-probe Ritz values and quadrature weights of an SLQ run.

    Attributes:
        values: list (one per probe) of 1-D float64 arrays of Ritz values, ascending.
        weights: matching lists of quadrature weights (each sums to 1 for an SLQ probe).
        dim: dimension ``n`` of the operator (needed for trace estimates), if known.
        broke_down: per probe, whether Lanczos stopped early on an invariant subspace.
        num_matvecs: operator products used.
        info: free-form settings (steps, reorthogonalisation, seed).

    Examples:
        >>> import numpy as np, hesd
        >>> s = hesd.Spectrum.from_ritz([[-1.0, 2.0, 5.0]], [[0.2, 0.3, 0.5]], dim=10)
        >>> s.lambda_min, s.lambda_max, round(s.trace, 6)
        (-1.0, 5.0, 29.0)
    """

    values: list[np.ndarray]
    weights: list[np.ndarray]
    dim: int | None = None
    broke_down: list[bool] = field(default_factory=list)
    num_matvecs: int = 0
    info: dict = field(default_factory=dict)

    @classmethod
    def from_ritz(
        cls,
        values: Sequence[Sequence[float]] | Sequence[float],
        weights: Sequence[Sequence[float]] | Sequence[float],
        *,
        dim: int | None = None,
    ) -> Spectrum:
        """Build a spectrum from raw per-probe Ritz values and weights (e.g. PyHessian's output).

        Args:
            values: one sequence of Ritz values per probe (probes may differ in length),
                or a single flat sequence for one probe.
            weights: matching quadrature weights.
            dim: the operator's dimension, for trace estimates.
        """
        vals: list[Any] = list(values)
        wts: list[Any] = list(weights)
        if vals and np.ndim(vals[0]) == 0:
            vals, wts = [vals], [wts]
        if len(vals) != len(wts) or not vals:
            raise HesdValueError(
                f"Spectrum.from_ritz: got {len(vals)} probes of values and {len(wts)} of weights; "
                "pass one matching list per probe"
            )
        out_v, out_w = [], []
        for i, (v, w) in enumerate(zip(vals, wts, strict=True)):
            v = np.asarray(v, dtype=np.float64).reshape(-1)
            w = np.asarray(w, dtype=np.float64).reshape(-1)
            if v.shape != w.shape or v.size == 0:
                raise HesdValueError(f"Spectrum.from_ritz: probe {i} has {v.size} values and {w.size} weights")
            if not (np.isfinite(v).all() and np.isfinite(w).all()) or (w < 0).any():
                raise HesdValueError(f"Spectrum.from_ritz: probe {i} has non-finite values or negative weights")
            order = np.argsort(v)
            out_v.append(v[order])
            out_w.append(w[order])
        return cls(values=out_v, weights=out_w, dim=dim, broke_down=[False] * len(out_v))

    @property
    def num_probes(self) -> int:
        """Number of probes."""
        return len(self.values)

    @property
    def lambda_min(self) -> float:
        """Smallest Ritz value over all probes (approaches λmin from above)."""
        return float(min(v.min() for v in self.values))

    @property
    def lambda_max(self) -> float:
        """Largest Ritz value over all probes (approaches λmax from below)."""
        return float(max(v.max() for v in self.values))

    def moment(self, k: int) -> float:
        r"""Quadrature estimate of :math:`\frac{1}{n}\operatorname{tr}(A^k)`, averaged over probes."""
        return float(np.mean([np.sum(w * v**k) for v, w in zip(self.values, self.weights, strict=True)]))

    def moments(self, kmax: int = 4) -> np.ndarray:
        """Moments ``k = 0..kmax`` (``k = 0`` is the mean total weight, 1 for SLQ)."""
        return np.array([self.moment(k) for k in range(kmax + 1)])

    @property
    def trace(self) -> float:
        r"""SLQ trace estimate :math:`n \\cdot \\mathbb{E}[\\sum_i w_i \\theta_i]` (needs ``dim``)."""
        if self.dim is None:
            raise HesdValueError("Spectrum.trace: the dimension is unknown; pass dim= to Spectrum.from_ritz")
        return self.dim * self.moment(1)

    def default_sigma(self) -> float:
        """Smoothing width: 1 % of the spectral range (at least 1e-12 of its scale)."""
        lo, hi = self.lambda_min, self.lambda_max
        width = hi - lo
        return max(0.01 * width, 1e-12 * max(abs(lo), abs(hi), 1.0))

    def grid(self, num: int = 1000, margin: float = 0.05) -> np.ndarray:
        """An evaluation grid spanning the Ritz values plus a margin of the range on each side."""
        lo, hi = self.lambda_min, self.lambda_max
        pad = max((hi - lo) * margin, 3 * self.default_sigma())
        return np.linspace(lo - pad, hi + pad, num)

    def density(self, grid: Any = None, sigma: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        r"""Gaussian-smoothed density on ``grid``; integrates to the mean total weight (1 for SLQ).

        Args:
            grid: points at which to evaluate; default :meth:`grid`.
            sigma: Gaussian width; default :meth:`default_sigma`.

        Returns:
            ``(grid, density)`` arrays.
        """
        t = self.grid() if grid is None else np.asarray(grid, dtype=np.float64)
        s = self.default_sigma() if sigma is None else float(sigma)
        if not s > 0:
            raise HesdValueError(f"Spectrum.density: sigma must be positive, got {sigma}")
        dens = np.zeros_like(t)
        norm = 1.0 / (s * np.sqrt(2 * np.pi) * self.num_probes)
        for v, w in zip(self.values, self.weights, strict=True):
            dens += (w[None, :] * np.exp(-0.5 * ((t[:, None] - v[None, :]) / s) ** 2)).sum(axis=1)
        return t, dens * norm

    def to_dict(self) -> dict:
        """A JSON-ready dictionary (inverse of :meth:`from_dict`)."""
        return {
            "values": [v.tolist() for v in self.values],
            "weights": [w.tolist() for w in self.weights],
            "dim": self.dim,
            "broke_down": list(self.broke_down),
            "num_matvecs": self.num_matvecs,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Spectrum:
        """The spectrum stored by :meth:`to_dict`."""
        s = cls.from_ritz(d["values"], d["weights"], dim=d.get("dim"))
        s.broke_down = list(d.get("broke_down", s.broke_down))
        s.num_matvecs = int(d.get("num_matvecs", 0))
        s.info = dict(d.get("info", {}))
        return s

    def __repr__(self) -> str:
        return (
            f"Spectrum(probes={self.num_probes}, lambda_min={self.lambda_min:.4g}, "
            f"lambda_max={self.lambda_max:.4g}, dim={self.dim})"
        )
