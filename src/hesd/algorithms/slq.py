r"""Stochastic Lanczos quadrature (SLQ).

For each of ``num_probes`` Rademacher probes :math:`v` (normalised), ``num_steps`` Lanczos
steps give :math:`T = S\Theta S^\top`; the Ritz values :math:`\theta_i` and weights
:math:`w_i = S_{1i}^2` form a Gauss quadrature rule for the spectral measure of
:math:`A` seen from :math:`v`. See :class:`hesd.Spectrum`.

Cost: ``num_probes × num_steps`` products, plus re-orthogonalisation
(``O(num_steps² n)`` flops per probe with full re-orthogonalisation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from ..checks import check_positive_int
from ..errors import HesdValueError
from ..operators.linear import as_operator
from .lanczos import lanczos_lockstep
from .probes import rademacher
from .spectrum import Spectrum

__all__ = ["plan_basis", "ritz_from_tridiagonal", "slq"]


def plan_basis(dim: int, num_steps: int, dtype: torch.dtype, budget_bytes: int) -> dict:
    r"""Choose the SLQ re-orthogonalisation mode that fits ``budget_bytes`` of basis memory.

    In order of preference (accuracy cost measured in ``tests/algorithms/test_slq_trace.py``):

    1. ``reorth="full"`` in the operator's dtype — exact to rounding;
    2. ``reorth="full"`` with a ``bfloat16`` basis (half or a quarter of the memory) —
       orthogonality only to about 1e-2, so Ritz values can drift by about 1e-2 relative
       to the spectral range, and spurious copies of the extreme values are held back;
    3. ``reorth="window"`` with as many recent vectors as fit — memory
       ``window × n``; orthogonality is lost against older vectors, so converged extreme
       Ritz values reappear as spurious copies (their quadrature weights are split), while
       the extreme values themselves stay accurate. :math:`C_t` and the MP/MN type therefore
       agree with the full basis's; :math:`K_{h,0.5}`, a sum over the quadrature's nodes and
       weights, does not: 1.095 against 1.005 for a small GPT-2 at 80 steps × 4 probes, 0.62
       against 0.72 on a hard float32 matrix (``benchmarks/results/cpu/window_passes_19.txt``).

    Returns:
        keyword arguments for :func:`slq` plus ``basis_bytes``.
    """
    item = dtype.itemsize
    steps = min(num_steps, dim)
    if steps * dim * item <= budget_bytes:
        return {"reorth": "full", "basis_dtype": None, "window": None, "basis_bytes": steps * dim * item}
    if steps * dim * 2 <= budget_bytes:
        return {"reorth": "full", "basis_dtype": torch.bfloat16, "window": None, "basis_bytes": steps * dim * 2}
    window = max(2, budget_bytes // (dim * item))
    return {"reorth": "window", "basis_dtype": None, "window": int(window), "basis_bytes": int(window) * dim * item}


def ritz_from_tridiagonal(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values (ascending) and Gauss weights (squared first eigenvector components).

    Uses the symmetric tridiagonal solver :func:`scipy.linalg.eigh_tridiagonal`.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    if alpha.size == 1:
        return alpha.copy(), np.ones(1)
    theta, S = eigh_tridiagonal(alpha, beta)
    w = S[0, :] ** 2
    return theta, w / w.sum()


def _extremes(theta: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.array([theta.min(), theta.max()])


class _ConvergenceStop:
    """Stop a probe's Lanczos run once the monitored Ritz quantities have settled."""

    def __init__(self, tol: float, every: int, min_steps: int, quantities=None) -> None:
        if not tol > 0:
            raise HesdValueError(f"slq: stop_tol must be positive, got {tol}")
        self.tol, self.every, self.min_steps = tol, max(1, every), max(2, min_steps)
        self.quantities = quantities or _extremes
        self.prev: np.ndarray | None = None
        self.calm = 0

    def __call__(self, alphas: list[float], betas: list[float]) -> bool:
        m = len(alphas)
        if m < self.min_steps or (m - self.min_steps) % self.every:
            return False
        theta, w = ritz_from_tridiagonal(np.asarray(alphas), np.asarray(betas))
        cur = np.asarray(self.quantities(theta, w), dtype=np.float64)
        if self.prev is not None:
            span = max(cur[1] - cur[0], 1e-300)
            with np.errstate(invalid="ignore"):
                moved = np.abs(cur - self.prev)
            same = cur == self.prev  # equal infinities count as settled
            moved[same] = 0.0
            moved[:2] /= span
            self.calm = self.calm + 1 if (moved <= self.tol).all() else 0
        self.prev = cur
        return self.calm >= 2


def slq(
    A: Any,
    num_steps: int = 100,
    num_probes: int = 1,
    *,
    seed: int = 0,
    reorth: str = "full",
    window: int | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: str | torch.device | None = None,
    callback: Callable[[int, int], None] | None = None,
    stop_tol: float | None = None,
    check_every: int = 5,
    min_steps: int = 10,
    stop_on: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    lockstep: int | None = None,
) -> Spectrum:
    r"""Estimate the spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Args:
        A: :class:`hesd.HessianOperator`, dense tensor or SciPy operator.
        num_steps: Lanczos steps per probe (capped at the dimension). With
            ``num_steps ≥ n`` the quadrature is exact: Ritz values are the eigenvalues.
        num_probes: number of independent Rademacher probes.
        seed: probes are a deterministic function of ``seed`` (same on every device).
        reorth: ``"full"`` (default; the basis costs ``num_steps × n`` entries of
            ``basis_dtype`` — for a 0.27 M-parameter ResNet-20 and 100 steps in float32,
            108 MB), ``"window"`` (last ``window`` vectors: bounded memory, spurious Ritz
            copies possible) or ``"none"``.
        window: window size for ``reorth="window"``.
        basis_dtype: store the basis in a lower precision (bounded-memory mode).
        basis_device: store the basis elsewhere, e.g. ``"cpu"`` for a model on the GPU.
        callback: ``callback(probe, step)`` after each Lanczos step (progress bars).
        stop_tol: adaptive mode. Every ``check_every`` steps (from ``min_steps`` on) the
            probe's Ritz values give the ``stop_on`` quantities; the probe stops when, over
            two consecutive checks, none of them moved by more than ``stop_tol`` (relative to
            the spectral range for λmin and λmax, absolute for the criteria). ``num_steps``
            is then the cap. ``None`` (default): always ``num_steps`` steps.
        check_every: the adaptive mode checks every this many steps.
        min_steps: and not before this many.
        stop_on: ``stop_on(ritz_values, weights) -> array`` of the quantities that must settle;
            its first two entries are treated as λmin, λmax (compared relative to the range),
            the rest absolutely. Default: λmin and λmax only.
            :func:`hesd.analysis.criteria.probe_summary` adds re and Ct (what
            ``hesd.AnalysisSettings(stop_tol=...)`` uses; KH05 never settles, see
            :mod:`hesd.analysis.criteria`).
        lockstep: run this many probes together (:func:`hesd.algorithms.lanczos_lockstep`:
            one product with a block of Lanczos vectors per step). Results are the same as
            one probe at a time, to rounding; the basis memory is ``lockstep`` times larger.
            ``None`` (default): the operator's ``default_lockstep`` if it has one (for a
            :class:`hesd.HessianOperator`, its ``batch_columns`` as given, or 8 on a GPU, where
            batching multiplies throughput, and 1 on the CPU), else 1.

    Returns:
        :class:`hesd.Spectrum`. A probe whose Krylov space became invariant (Lanczos
        breakdown) stops early; its Ritz values are then exact eigenvalues and its
        ``broke_down`` flag is set.

    Examples:
        >>> import torch, hesd
        >>> A = torch.diag(torch.tensor([-1.0, 0.5, 2.0, 3.0], dtype=torch.float64))
        >>> spec = hesd.slq(A, num_steps=4, num_probes=2, seed=0)
        >>> spec.values[0].round(10).tolist()
        [-1.0, 0.5, 2.0, 3.0]
    """
    caller = "slq"
    op = as_operator(A, caller)
    check_positive_int(num_steps, "num_steps", caller)
    check_positive_int(num_probes, "num_probes", caller)
    if lockstep is None:
        lockstep = getattr(op, "default_lockstep", 1)
    check_positive_int(lockstep, "lockstep", caller)
    n = op.full_dim  # probes are drawn whole; an operator on sharded vectors takes its rows
    values, weights, broke = [], [], []
    total = 0
    for first in range(0, num_probes, lockstep):
        b = min(lockstep, num_probes - first)
        V0 = op.local_rows(rademacher(n, b, seed, op.dtype, op.device, offset=first))
        step_cb = (lambda c, j, first=first: callback(first + c, j)) if callback is not None else None
        stops = [_ConvergenceStop(stop_tol, check_every, min_steps, stop_on) if stop_tol is not None else None
                 for _ in range(b)]  # fmt: skip
        results = lanczos_lockstep(
            op,
            V0,
            num_steps,
            reorth=reorth,
            window=window,
            basis_dtype=basis_dtype,
            basis_device=basis_device,
            callback=step_cb,
            should_stop=stops,
        )
        for res in results:
            theta, w = ritz_from_tridiagonal(res.alpha.numpy(), res.beta.numpy())
            values.append(theta)
            weights.append(w)
            broke.append(res.broke_down)
            total += res.num_matvecs
    spec = Spectrum(values=values, weights=weights, dim=n, broke_down=broke, num_matvecs=total)
    spec.info = {
        "num_steps": num_steps,
        "num_probes": num_probes,
        "seed": seed,
        "reorth": reorth,
        "window": window,
        "basis_dtype": str(basis_dtype) if basis_dtype else None,
        "stop_tol": stop_tol,
        "lockstep": lockstep,
        "vector_rows": op.shape[0],  # rows of each stored Lanczos vector on this rank (< dim when sharded)
        "steps_used": [len(v) for v in values],
    }
    return spec
