"""hesd — the Hessian eigenvalue spectral density of PyTorch networks, and the decisions it supports.

Layers: :mod:`hesd.operators` (Hessian-vector products) → :mod:`hesd.algorithms`
(Lanczos, power iteration, trace, SLQ) → :mod:`hesd.analysis` (criteria, HESD type,
checkpoint series and selection) → :mod:`hesd.interfaces` (CLI, report, callbacks).
"""

from ._version import __version__
from .algorithms import EigenResult, Spectrum, TraceResult, eigenvalues, lanczos, power_iteration, slq, trace
from .errors import CheckpointError, HesdError, InsecureCheckpointError, NonDeterministicError, NonFiniteLossError
from .operators import HessianOperator, LinearOperator, exact_hessian

__all__ = [
    "CheckpointError",
    "EigenResult",
    "HesdError",
    "HessianOperator",
    "InsecureCheckpointError",
    "LinearOperator",
    "NonDeterministicError",
    "NonFiniteLossError",
    "Spectrum",
    "TraceResult",
    "__version__",
    "eigenvalues",
    "exact_hessian",
    "lanczos",
    "power_iteration",
    "slq",
    "trace",
]
