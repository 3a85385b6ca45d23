r"""The non-Hessian measures that curvature is judged against (Jiang et al., ICLR 2020), per checkpoint.

* **parameter norm** :math:`\|\theta\|` of the analysed parameters (``param_norm``, computed by
  :func:`hesd.analyze_model`);
* **distance from initialisation** :math:`\|\theta - \theta_0\|` (``dist_init``), when the
  series holds its initial checkpoint (:func:`distance`);
* **random-direction sharpness** (``sharpness_random``): the mean rise of the training loss when
  every parameter is perturbed in proportion to its own magnitude,

  .. math::  S = \mathbb{E}_z\big[L(\theta + \sigma\,|\theta| \odot z)\big] - L(\theta),
      \quad z \sim \mathcal N(0, I),\ \sigma = 0.05,

  over :data:`DRAWS` seeded draws (the same draws at every checkpoint), a cheap, scale-aware
  stand-in for the protocol's worst-case sharpness. It costs ``draws + 1`` passes of the loss over
  the data, without gradients.

hesd's model-zoo study (docs/evidence.md) scores these beside λmax, Ct and the other criteria.

Examples:
    >>> import torch
    >>> from hesd.analysis.baselines import random_sharpness
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
    >>> random_sharpness(model, torch.nn.functional.cross_entropy, data) > 0
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..operators import ParameterLayout
from ..operators.data import as_reiterable
from ..operators.forward import model_state
from ..operators.model_loss import loss_contract, mean_loss

__all__ = ["DRAWS", "SIGMA", "distance", "random_sharpness"]

#: perturbation size, relative to each parameter's magnitude
SIGMA = 0.05
#: perturbations averaged
DRAWS = 8


def random_sharpness(
    model: nn.Module, loss_fn: Any, data: Any, *, sigma: float = SIGMA, draws: int = DRAWS, seed: int = 0,
    params: list[str] | None = None, model_mode: str = "eval",
) -> float:  # fmt: skip
    """The mean loss rise under ``draws`` perturbations ``σ·|θ|⊙z`` (module docs).

    The model is evaluated functionally at the perturbed values; its parameters are not touched.
    """
    layout = ParameterLayout.select(model, params, "random_sharpness")
    contract = loss_contract(loss_fn, "random_sharpness")
    contract.bind(model)
    data = as_reiterable(data, "random_sharpness")
    g = torch.Generator().manual_seed(seed)
    rises = []
    with model_state(model, model_mode):
        base, _ = mean_loss(model, contract, data, layout.device, layout.dtype)
        for _ in range(draws):
            moved = {n: p.detach() + sigma * p.detach().abs() * torch.randn(p.shape, generator=g).to(p)
                     for n, p in zip(layout.names, layout.params, strict=True)}  # fmt: skip
            rises.append(mean_loss(model, contract, data, layout.device, layout.dtype, params=moved)[0] - base)
    return float(sum(rises) / len(rises)) if rises else math.nan


def distance(model: nn.Module, reference: dict[str, torch.Tensor], params: list[str] | None = None) -> float:
    """‖θ − θ_ref‖ over the analysed parameters that ``reference`` (a state dict) holds.

    ``nan`` when it holds none of them with the same shape (another architecture).
    """
    layout = ParameterLayout.select(model, params, "distance")
    total, matched = 0.0, 0
    for name, p in zip(layout.names, layout.params, strict=True):
        ref = reference.get(name)
        if ref is not None and ref.shape == p.shape:
            total += float(torch.sum((p.detach().double() - ref.to(p.device).double()) ** 2))
            matched += 1
    return math.sqrt(total) if matched else math.nan
