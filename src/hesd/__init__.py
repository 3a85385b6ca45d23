"""hesd — the Hessian eigenvalue spectral density of PyTorch networks, and the decisions it supports.

Layers: :mod:`hesd.operators` (Hessian-vector products) → :mod:`hesd.algorithms`
(Lanczos, power iteration, trace, SLQ) → :mod:`hesd.analysis` (criteria, HESD type,
checkpoint series and selection) → :mod:`hesd.interfaces` (CLI, report, callbacks).
"""

from ._version import __version__
from .algorithms import EigenResult, Spectrum, TraceResult, eigenvalues, lanczos, power_iteration, slq, trace
from .analysis import (
    AnalysisSettings,
    BestHeldout,
    Criteria,
    HighestCtAmongMP,
    QSRule,
    Selection,
    SeriesResult,
    SmallestLambdaMax,
    analyze_checkpoints,
    analyze_model,
    criteria,
)
from .errors import CheckpointError, HesdError, InsecureCheckpointError, NonDeterministicError, NonFiniteLossError
from .operators import HessianOperator, LinearOperator, exact_hessian

__all__ = [
    "AnalysisSettings",
    "BestHeldout",
    "CheckpointError",
    "Criteria",
    "EigenResult",
    "HesdError",
    "HessianOperator",
    "HighestCtAmongMP",
    "InsecureCheckpointError",
    "LinearOperator",
    "NonDeterministicError",
    "NonFiniteLossError",
    "QSRule",
    "Selection",
    "SeriesResult",
    "SmallestLambdaMax",
    "Spectrum",
    "TraceResult",
    "__version__",
    "analyze_checkpoints",
    "analyze_model",
    "criteria",
    "eigenvalues",
    "exact_hessian",
    "lanczos",
    "power_iteration",
    "slq",
    "trace",
]
