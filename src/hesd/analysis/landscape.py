r"""Loss-landscape slices: along top Hessian eigenvectors and filter-normalised random directions.

For unit directions :math:`d_1, d_2` and the parameters :math:`\theta^*` of a checkpoint,

.. math::  f(a, b) = L(\theta^* + a d_1 + b d_2),

evaluated on a grid. Along a Hessian eigenvector :math:`u` with eigenvalue :math:`\lambda`
the quadratic model is :math:`L(\theta^*) + g^\top u\, t + \tfrac{\lambda}{2} t^2`; the 1-D
curves are shown with :math:`\tfrac{\lambda}{2}t^2` overlaid. Random directions are
*filter-normalised* (Li et al., 2018): each filter (row of a weight) of a Gaussian direction
is rescaled to the norm of the matching filter of :math:`\theta^*`; biases and
normalisation parameters get zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..algorithms.eigen import eigenvalues
from ..operators import HessianOperator, model_state
from ..operators.data import as_reiterable
from ..operators.model_loss import mean_loss
from .memory_plan import plan_memory

__all__ = ["filter_normalized_direction", "loss_landscape"]

_BASIS = 40  # hesd.eigenvalues' default restart basis for k=2: what a plan sizes down


def filter_normalized_direction(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A Gaussian direction rescaled filter-wise to the parameters' norms (Li et al. 2018)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in params.items():
        d = torch.randn(p.shape, generator=g, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
        if p.ndim <= 1:
            d.zero_()  # biases, BatchNorm/LayerNorm parameters
        else:
            dn = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-12)
            pn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            d = d * (pn / dn).view(-1, *([1] * (p.ndim - 1)))
        out[name] = d
    return out


def loss_landscape(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    num: int = 21,
    num_2d: int = 15,
    delta: float = 0.2,
    seed: int = 0,
    model_mode: str = "eval",
    hvp_method: str = "auto",
    max_memory: int | None = None,
) -> dict:
    r"""1-D and 2-D slices of the mean loss along the top-2 Hessian eigenvectors and 2 random directions.

    Args:
        model: as for :class:`hesd.HessianOperator`.
        loss_fn: as for :class:`hesd.HessianOperator`.
        data: as for :class:`hesd.HessianOperator`.
        num: points per 1-D slice.
        num_2d: points per side of the 2-D grids.
        delta: the eigen-direction range is :math:`|t| \le \sqrt{2\,\delta/\lambda_1}`, where the
            quadratic model rises by ``delta``; random directions span :math:`[-1, 1]`
            (one filter norm).
        seed: seed of the eigen solver and the random directions.
        model_mode: ``"eval"`` or ``"train"``.
        hvp_method: the product method of the eigen solver (see :class:`hesd.HessianOperator`).
        max_memory: bytes the eigen solver may allocate beyond the model and the data. Given,
            :func:`hesd.analysis.memory_plan.plan_memory` chooses its products and its restart
            basis (:attr:`~hesd.analysis.memory_plan.MemoryPlan.eigen_basis`, at most the default
            40 vectors) as for a 40-step SLQ. ``None``: exact products and 40 basis vectors.

    Returns:
        A JSON-ready dict with ``loss0``, ``eigenvalues``, and for ``"eigen"`` and ``"random"``:
        ``t`` (1-D coordinates), ``curves`` (two 1-D loss arrays), ``grid`` (2-D coordinates)
        and ``surface`` (2-D loss array).
    """
    data = as_reiterable(data, "loss_landscape")  # read more than once
    op_kw: dict[str, Any] = {"hvp_method": hvp_method}
    max_basis = None
    if max_memory is not None:
        plan = plan_memory(model, loss_fn, data, num_steps=_BASIS, max_memory=max_memory, hvp_method=hvp_method,
                           model_mode=model_mode)  # fmt: skip
        op_kw, max_basis = plan.operator_kwargs(), plan.eigen_basis
    op = HessianOperator(model, loss_fn, data, model_mode=model_mode, **op_kw)
    top = eigenvalues(op, k=2, which="LA", tol=1e-4, seed=seed, return_eigenvectors=True, warn=False,
                      max_basis=max_basis)  # fmt: skip
    lam = [float(v) for v in top.eigenvalues]
    layout = op.layout
    names = layout.names
    base = layout.values()
    assert top.eigenvectors is not None  # asked for
    eig_dirs = [layout.as_dict(layout.unflatten(top.eigenvectors[:, i])) for i in range(2)]
    rand_dirs = [filter_normalized_direction(base, seed + 1 + i) for i in range(2)]
    t_max = math.sqrt(2 * delta / lam[0]) if lam[0] > 0 else 1.0

    def loss_at(d1, d2, a: float, b: float) -> float:
        params = {n: base[n] + a * d1[n] + b * d2[n] for n in names}
        return mean_loss(model, op.contract, data, op.device, op.layout.dtype, params)[0]

    result: dict[str, Any] = {"eigenvalues": lam, "residuals": top.residuals.tolist()}
    with torch.no_grad(), model_state(model, model_mode):
        result["loss0"] = loss_at(eig_dirs[0], eig_dirs[1], 0.0, 0.0)
        for key, dirs, r in (("eigen", eig_dirs, t_max), ("random", rand_dirs, 1.0)):
            t = np.linspace(-r, r, num)
            curves = [[loss_at(dirs[i], dirs[1 - i], float(a), 0.0) for a in t] for i in range(2)]
            g = np.linspace(-r, r, num_2d)
            surface = [[loss_at(dirs[0], dirs[1], float(a), float(b)) for a in g] for b in g]
            result[key] = {"t": t.tolist(), "curves": curves, "grid": g.tolist(), "surface": surface}
    return result
