"""hesd — the Hessian eigenvalue spectral density of PyTorch networks, and the decisions it supports.

Layers: :mod:`hesd.operators` (Hessian-vector products) → :mod:`hesd.algorithms`
(Lanczos, power iteration, trace, SLQ) → :mod:`hesd.analysis` (criteria, HESD type,
checkpoint series and selection) → :mod:`hesd.interfaces` (CLI, report, callbacks).
"""

from ._version import __version__
from .algorithms import EigenResult, Spectrum, TraceResult, eigenvalues, lanczos, power_iteration, slq, trace
from .allocator import tune_cpu_allocator
from .analysis import (
    AnalysisSettings,
    BestHeldout,
    Criteria,
    ExtremeOf,
    HighestCtAmongMP,
    QSRule,
    Selection,
    SeriesResult,
    SmallestLambdaMax,
    analyze_checkpoints,
    analyze_model,
    criteria,
)
from .errors import (
    CheckpointError,
    HesdError,
    HesdFileNotFoundError,
    HesdPermissionError,
    HesdTypeError,
    HesdValueError,
    InsecureCheckpointError,
    MemoryBudgetError,
    NonDeterministicError,
    NonFiniteError,
    NonFiniteLossError,
    UnsupportedModelError,
)
from .interfaces.monitor import Monitor
from .operators import BatchLoss, HessianOperator, LinearOperator, ModelLoss, ParameterLayout, exact_hessian


def __getattr__(name: str):
    # The framework callbacks import Lightning / transformers, which is slow: load on first use.
    if name in ("HesdLightningCallback", "HesdTrainerCallback"):
        from .interfaces import callbacks

        return getattr(callbacks, name)
    if name == "lm_batches":
        from .interfaces.hf_data import lm_batches

        return lm_batches
    raise AttributeError(f"module 'hesd' has no attribute {name!r}")


__all__ = [
    "AnalysisSettings",
    "BatchLoss",
    "BestHeldout",
    "CheckpointError",
    "Criteria",
    "EigenResult",
    "ExtremeOf",
    "HesdError",
    "HesdFileNotFoundError",
    "HesdLightningCallback",
    "HesdPermissionError",
    "HesdTrainerCallback",
    "HesdTypeError",
    "HesdValueError",
    "HessianOperator",
    "HighestCtAmongMP",
    "InsecureCheckpointError",
    "LinearOperator",
    "MemoryBudgetError",
    "ModelLoss",
    "Monitor",
    "NonDeterministicError",
    "NonFiniteError",
    "NonFiniteLossError",
    "ParameterLayout",
    "QSRule",
    "Selection",
    "SeriesResult",
    "SmallestLambdaMax",
    "Spectrum",
    "TraceResult",
    "UnsupportedModelError",
    "__version__",
    "analyze_checkpoints",
    "analyze_model",
    "criteria",
    "eigenvalues",
    "exact_hessian",
    "lanczos",
    "lm_batches",
    "power_iteration",
    "slq",
    "trace",
    "tune_cpu_allocator",
]
