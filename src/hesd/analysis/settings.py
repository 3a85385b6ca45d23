"""The settings of an analysis: one definition, stored with every result and read by the CLI.

:class:`AnalysisSettings` is the single place where an analysis option and its default are
written. The results store fingerprints them (results computed with other settings are never
mixed) and the command line takes its defaults and help text from them.

Examples:
    >>> import hesd
    >>> s = hesd.AnalysisSettings(num_steps=40)
    >>> s.num_steps, s.num_probes, s.ct_threshold
    (40, 3, -0.6)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import HesdValueError
from .selection import QSRule

__all__ = ["MAX_PROBES", "MAX_STEPS", "AnalysisSettings", "default_of"]

#: the most SLQ probes a setting may ask for (SLQ's error falls as 1/√probes; 3–30 are typical)
MAX_PROBES = 10_000
#: the most Lanczos steps per probe a setting may ask for (the criteria read the extremes, settled in tens)
MAX_STEPS = 10_000


@dataclass
class AnalysisSettings:
    """Settings of an analysis; stored with the results so runs never mix silently.

    Attributes:
        num_steps: Lanczos steps per SLQ probe.
        num_probes: SLQ probes (the same at every checkpoint).
        seed: probe seed.
        reorth: SLQ re-orthogonalisation (``"full"``, ``"window"``, ``"none"``).
        window: window for ``reorth="window"``.
        n: exponent of :math:`K_{h,n}`.
        ct_threshold: MP/MN threshold on Ct.
        aggregate: ``"mean"`` or ``"pooled"`` Ct (see :func:`hesd.criteria`).
        zero_band: band (relative to λmax) for the per-checkpoint zero mass.
        zero_curvature: below this max|λ|·‖θ‖² (loss units) the Hessian
            counts as numerically zero and the HESD type is ``"undetermined"``
            (:func:`hesd.analysis.criteria.undetermined_reason`).
        model_mode: ``"eval"`` or ``"train"`` (see :class:`hesd.HessianOperator`).
        refine_extremes: certify λmin and λmax with Lanczos (``which="BE"``; restarted, or over
            a 3-vector window where the memory plan gives the SLQ a window,
            :meth:`~hesd.analysis.memory_plan.MemoryPlan.extremes_kwargs`) to ``extreme_tol``
            instead of reporting SLQ's extreme Ritz values.
        extreme_tol: relative residual tolerance for the refinement.
        heldout_criteria: also compute the criteria on the held-out data.
        lr: the optimiser's learning rate, for the edge-of-stability ratio.
        dtype: ``"float32"``/``"float64"`` to cast the model to, or ``None`` to keep it.
        device: device to run on (``None``: where the model is).
        qs: the quasi-singular rule.
        params: ``fnmatch`` patterns of parameter names to restrict the Hessian to (block
            analysis, e.g. ``["layers.3.*"]``); ``None``: all trainable parameters.
        max_memory: bytes the analysis may allocate beyond the model and the data: gradient,
            Lanczos vectors and basis, kept first-order graphs, each product's transient
            buffers. :func:`hesd.analysis.memory_plan.plan_memory` measures the first batch and
            chooses a plan that fits (micro-batches, finite differences, a reduced basis, in
            that order of accuracy cost) or stops before any product with the parts and the
            options. ``None``: the defaults, planned against free memory only when the full
            basis would not fit in it.
        hvp_method: how products are taken (see :class:`hesd.HessianOperator`): ``"auto"``
            (exact; finite differences only where no exact method runs), ``"graph"``,
            ``"double_backward"``, ``"func"`` or ``"finite_difference"`` (gradients only: models
            whose kernels have no second derivative, activation checkpointing).
        sharpness_draws: perturbations of the random-direction sharpness
            (:func:`hesd.analysis.baselines.random_sharpness`; 0: not computed; single process only).
        stop_tol: adaptive SLQ — stop each probe once λmin, λmax, re and Ct have settled to
            this tolerance (``num_steps`` becomes the cap); see :func:`hesd.slq`. KH05 then
            refers to a varying step count: leave ``None`` when KH05 matters.
    """

    num_steps: int = 80
    num_probes: int = 3
    seed: int = 0
    reorth: str = "full"
    window: int | None = None
    n: float = 0.5
    ct_threshold: float = -0.6
    aggregate: str = "mean"
    zero_band: float = 0.01
    zero_curvature: float = 1e-4
    model_mode: str = "eval"
    refine_extremes: bool = True
    extreme_tol: float = 1e-4
    heldout_criteria: bool = False
    lr: float | None = None
    dtype: str | None = None
    device: str | None = None
    qs: QSRule = field(default_factory=QSRule)
    params: list[str] | None = None
    max_memory: int | None = None
    stop_tol: float | None = None
    hvp_method: str = "auto"
    sharpness_draws: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.qs, dict):
            self.qs = QSRule(**self.qs)
        for name in ("num_steps", "num_probes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise HesdValueError(f"AnalysisSettings: {name} must be a positive integer, got {v!r}")
        for name, most, typical in (("num_probes", MAX_PROBES, "3–30"), ("num_steps", MAX_STEPS, "20–300")):
            if getattr(self, name) > most:
                raise HesdValueError(
                    f"AnalysisSettings: {name}={getattr(self, name):,} is beyond hesd's limit of {most:,} "
                    f"({typical} are typical; each costs Hessian-vector products over all the data)"
                )
        if self.reorth not in ("full", "window", "none"):
            raise HesdValueError(f"AnalysisSettings: reorth must be 'full', 'window' or 'none', got {self.reorth!r}")
        if self.dtype not in (None, "float32", "float64"):
            raise HesdValueError(f"AnalysisSettings: dtype must be 'float32', 'float64' or None, got {self.dtype!r}")
        if self.model_mode not in ("eval", "train"):
            raise HesdValueError(f"AnalysisSettings: model_mode must be 'eval' or 'train', got {self.model_mode!r}")
        if isinstance(self.params, str):
            self.params = [self.params]
        if self.max_memory is not None and self.max_memory <= 0:
            raise HesdValueError(
                f"AnalysisSettings: max_memory must be a positive number of bytes, got {self.max_memory}"
            )
        methods = ("auto", "graph", "double_backward", "func", "finite_difference")
        if self.hvp_method not in methods:
            raise HesdValueError(f"AnalysisSettings: hvp_method must be one of {methods}, got {self.hvp_method!r}")
        if (
            isinstance(self.sharpness_draws, bool)
            or not isinstance(self.sharpness_draws, int)
            or self.sharpness_draws < 0
        ):
            raise HesdValueError(
                f"AnalysisSettings: sharpness_draws must be an integer ≥ 0, got {self.sharpness_draws!r}"
            )
        if not (isinstance(self.zero_curvature, (int, float)) and self.zero_curvature >= 0):
            raise HesdValueError(f"AnalysisSettings: zero_curvature must be ≥ 0, got {self.zero_curvature!r}")
        if not self.ct_threshold <= 0:
            raise HesdValueError(f"AnalysisSettings: ct_threshold must be ≤ 0, got {self.ct_threshold}")

    def to_dict(self) -> dict:
        """The settings as plain JSON-ready values (the results store's fingerprint)."""
        d = asdict(self)
        d["qs"] = asdict(self.qs)
        return d


def default_of(name: str) -> Any:
    """The default value of the :class:`AnalysisSettings` field ``name`` (for the CLI's options)."""
    for f in fields(AnalysisSettings):
        if f.name == name:
            return f.default_factory() if callable(f.default_factory) else f.default
    raise KeyError(name)
