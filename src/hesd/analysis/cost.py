r"""What an analysis will cost, said before it starts: sanity limits and a time and memory estimate.

A series of ``C`` checkpoints with ``k`` probes of ``m`` Lanczos steps takes, per checkpoint,
about

.. math::  N = k\,m\,(1 + h) + e + 2

Hessian-vector products (``h = 1`` with ``heldout_criteria``; ``e`` ≈ :data:`EXTREME_PRODUCTS`
for the certified λmin/λmax; two passes for the loss and the gradient). :func:`estimate_cost`
times one exact product on the first batch, scales it by the number of batches, and multiplies:
a rough estimate (the first batch stands for the others; the extremes' restarts vary), meant to
tell minutes from days before the first checkpoint, not to plan a deadline. The memory it quotes
is the Lanczos basis, the part that grows with the settings (``m`` vectors of :math:`P` entries
per probe run together); the planner (:mod:`hesd.analysis.memory_plan`) sizes the rest.

:data:`MAX_PROBES` and :data:`MAX_STEPS` bound the settings themselves
(:class:`hesd.AnalysisSettings` refuses more): SLQ's error falls as :math:`1/\sqrt{k}` and
3–30 probes are typical; Lanczos steps beyond a few hundred add nothing the criteria read.

Examples:
    >>> import torch, hesd
    >>> from hesd.analysis.cost import estimate_cost
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> data = [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(4)]
    >>> est = estimate_cost(model, torch.nn.functional.cross_entropy, data, hesd.AnalysisSettings(), checkpoints=5)
    >>> est.products_per_checkpoint, est.basis_bytes
    (282, 62400)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..operators.data import as_reiterable
from ..operators.hessian import HessianOperator
from .settings import MAX_PROBES, MAX_STEPS, AnalysisSettings

__all__ = ["EXTREME_PRODUCTS", "MAX_PROBES", "MAX_STEPS", "CostEstimate", "estimate_cost", "say_cost"]

logger = logging.getLogger("hesd")

#: products the certified extremes take, typically (restarted Lanczos, which="BE"; measured 20–45)
EXTREME_PRODUCTS = 40
#: estimates longer than this (seconds) are said as a warning, shorter ones as information
LONG = 600.0


@dataclass(frozen=True)
class CostEstimate:
    """A series' estimated cost.

    Attributes:
        products_per_checkpoint: Hessian-vector products per checkpoint (module docs).
        checkpoints: checkpoints to analyse.
        seconds_per_product: one exact product over all the data, timed on the first batch.
        basis_bytes: the stored Lanczos basis at its largest (full re-orthogonalisation).
    """

    products_per_checkpoint: int
    checkpoints: int
    seconds_per_product: float
    basis_bytes: int

    @property
    def seconds(self) -> float:
        """The whole series' estimated wall time."""
        return self.products_per_checkpoint * self.checkpoints * self.seconds_per_product

    def describe(self) -> str:
        """The estimate in one line."""
        return (f"about {self.products_per_checkpoint:,} Hessian-vector products per checkpoint × {self.checkpoints} "
                f"checkpoint(s), {_duration(self.seconds)} at {self.seconds_per_product:.3g} s per product (timed on "
                f"the first batch); the Lanczos basis takes up to {self.basis_bytes / 2**30:.3g} GiB")  # fmt: skip


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def estimate_cost(
    model: nn.Module, loss_fn: Any, data: Any, settings: AnalysisSettings, checkpoints: int = 1,
    params: list[str] | None = None, operator_kwargs: dict[str, Any] | None = None,
) -> CostEstimate:  # fmt: skip
    """Estimate a series' products, time and basis memory (module docs) from one timed product.

    ``operator_kwargs``: how products will be taken (a memory plan's
    :meth:`~hesd.analysis.memory_plan.MemoryPlan.operator_kwargs`); default exact products by
    the settings' ``hvp_method``.
    """
    s = settings
    batches = as_reiterable(data, "estimate_cost")
    first = next(iter(batches), None)
    count = sum(1 for _ in batches)
    if first is None:  # an empty shard (data parallelism): nothing to time here
        return CostEstimate(0, checkpoints, 0.0, 0)
    kw = dict(operator_kwargs or {"hvp_method": s.hvp_method})
    op = HessianOperator(model, loss_fn, [first], model_mode=s.model_mode, params=params, **kw)
    dim = op.shape[0]
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(op.layout.dtype)
    op.matvec(v)  # warm-up: first-call allocations
    t0 = time.perf_counter()
    op.matvec(v)
    per_product = (time.perf_counter() - t0) * max(count, 1)
    steps = min(s.num_steps, dim)
    slq_products = s.num_probes * steps * (2 if s.heldout_criteria else 1)
    extremes = min(EXTREME_PRODUCTS, dim) if s.refine_extremes else 0
    basis = steps * dim * max(op.layout.dtype.itemsize, 4)
    return CostEstimate(slq_products + extremes + 2, checkpoints, per_product, basis)


def say_cost(estimate: CostEstimate) -> None:
    """Log ``estimate`` once, before the work: a warning when it is long (:data:`LONG`), else information."""
    level = logging.WARNING if estimate.seconds > LONG else logging.INFO
    logger.log(level, "hesd: this analysis will take %s", estimate.describe())
