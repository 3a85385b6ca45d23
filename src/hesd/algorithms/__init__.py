"""Model-free spectral algorithms; each accepts a hesd operator, a tensor or a SciPy operator."""

from .eigen import eigenvalues
from .lanczos import LanczosResult, lanczos, lanczos_lockstep
from .power import power_iteration
from .results import EigenResult, TraceResult
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
