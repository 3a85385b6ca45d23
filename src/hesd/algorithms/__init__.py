"""Model-free spectral algorithms; each accepts a hesd operator, a tensor or a SciPy operator."""

from ._common import EigenResult, TraceResult
from .lanczos import LanczosResult, eigenvalues, lanczos, lanczos_lockstep
from .power import power_iteration
from .slq import ritz_from_tridiagonal, slq
from .spectrum import Spectrum
from .trace import trace

__all__ = [
    "EigenResult",
    "LanczosResult",
    "Spectrum",
    "TraceResult",
    "eigenvalues",
    "lanczos",
    "lanczos_lockstep",
    "power_iteration",
    "ritz_from_tridiagonal",
    "slq",
    "trace",
]
