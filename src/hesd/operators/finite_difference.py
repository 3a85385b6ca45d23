r"""Hessian-vector products from gradients alone: central differences of the gradient.

.. math::

    H v \approx \frac{\nabla L(\theta + \varepsilon v) - \nabla L(\theta - \varepsilon v)}{2 \varepsilon}

Each product costs two gradients per batch and one copy of the selected parameters, and needs
no second derivative: it runs where double backward cannot — attention kernels without a
double backward (flash, flex, hub kernels), custom autograd functions marked
``once_differentiable``, activation checkpointing, losses such as ``ctc_loss``. The model's
own forward runs as it is: hesd switches neither its attention kernel nor its gradient
checkpointing (:class:`hesd.operators.forward.ForwardContext` with ``second_order=False``).

**Restoring** :math:`\theta`. Parameters are perturbed in place, each perturbation computed
from a saved copy :math:`\theta_0` (never by adding and subtracting, which would drift), and
copied back bit for bit after the pass, also when it fails.

**The step.** A step of :math:`\varepsilon` along :math:`v` moves parameter :math:`i` by
:math:`\varepsilon v_i`. Its error has two parts: truncation, :math:`\varepsilon^2` times the
third derivative along :math:`v`, which grows as the step becomes comparable to the
parameters it moves; and rounding, :math:`u / \varepsilon` times the rounding of
:math:`\theta \pm \varepsilon v` and of the gradients (:math:`u` the unit roundoff of the
parameters' dtype). Both are governed by the step *relative to the parameters it moves*, so
hesd measures the step in those units: with :math:`\tilde\theta_i^2 = \theta_i^2 + \tau^2`
(:math:`\tau` a tenth of the parameters' root mean square, so that parameters at zero — fresh
biases, a LoRA factor — still get a step),

.. math::

    \varepsilon = r\, \frac{\lVert \tilde\theta \odot v \rVert}{\lVert v \odot v \rVert},
    \qquad r = \tfrac{3}{4}\, u^{1/3}

(:func:`relative_step`: :math:`r = 3.6 \times 10^{-6}` in float64, :math:`2.9 \times
10^{-3}` in float32). For a direction spread over all :math:`P` parameters this is
:math:`r\lVert\theta\rVert` in length, each parameter moved by about :math:`r` of its size;
for a direction on :math:`k \ll P` parameters it is about :math:`\sqrt{k/P}` shorter, so those
parameters are still moved by about :math:`r` of their size. That matters: the extreme
eigenvectors of a transformer's Hessian are localised (on a random-init GPT-2 of 137 k
parameters, participation ratio 0.1 %), and the plain rule :math:`\varepsilon\lVert v\rVert =
r\lVert\theta\rVert` moved their parameters by about their own size — products along them erred
by 3e-2 in float32 while random directions erred by 6e-5. With the rule above both err by about
1e-4. :math:`r` balances the two error parts (:math:`r \propto u^{1/3}`); the factor 3/4 is
measured on a grid of steps over a GPT-2, a tanh MLP and a GELU CNN, along random directions and
the extreme eigenvectors (BENCHMARKS.md §8). The resulting relative error is of order
:math:`u^{2/3}`: about :math:`10^{-10}` in float64 and :math:`10^{-4}` in float32, over the
conformance matrix too (``tests/operators/test_conformance.py``). Pass ``fd_step=`` to
:class:`hesd.HessianOperator` for another :math:`r`.

The product is symmetric only to that accuracy, so Lanczos sees a slightly non-symmetric
operator, well within what the recurrence tolerates at these sizes.

**Kinks.** The exact methods differentiate a piecewise-linear network (ReLU, max pooling,
Huber's corner) where it is smooth, ignoring the kinks. A difference step that crosses a kink
picks up the jump of the gradient there, an error of order one that no step removes (the
number of crossings grows with :math:`\varepsilon`, each weighs :math:`1/\varepsilon`). On a
ReLU CNN (BENCHMARKS.md §8) random-direction products erred by order one in float32; in float64
they were exact to 2e-10, yet Lanczos, which seeks the directions where products are largest,
found the rare crossing and reported λmax 13.3 for a true 1.09 — and the wrong HESD type.
hesd therefore warns whenever a model with such layers gets finite-difference products, in any
dtype: use an exact method there (smooth activations — GELU, SiLU, tanh, what transformers
use — are safe).

Half-precision parameters (bfloat16, float16) are refused: :math:`r \approx 0.1` would perturb
every weight by a tenth of its size. Keep float32 master weights for the analysis.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import HesdValueError
from .first_order import FirstOrderState, Objective
from .loss import LossBatch

__all__ = [
    "KINKED_LAYERS",
    "check_dtype",
    "check_model",
    "expected_error",
    "finite_difference_pass",
    "finite_difference_product",
    "kink_note",
    "relative_step",
    "step_size",
]

logger = logging.getLogger("hesd")

#: :math:`\tau` in units of the parameters' root mean square (module docs)
TAU = 0.1

#: Layer types whose output is piecewise linear in their input (kinks a difference step can cross).
KINKED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Hardshrink, nn.Softshrink,
    nn.Threshold, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.HuberLoss, nn.SmoothL1Loss, nn.L1Loss, nn.MultiMarginLoss,
)  # fmt: skip


def relative_step(dtype: torch.dtype) -> float:
    r""":math:`r = \tfrac34 u^{1/3}`, the default relative step for parameters of ``dtype`` (module docs)."""
    return 0.75 * float(torch.finfo(dtype).eps / 2) ** (1.0 / 3.0)


def expected_error(dtype: torch.dtype) -> float:
    r"""The typical relative error of a product at the default step, :math:`10\,u^{2/3}` (measured, module docs)."""
    return 10.0 * float(torch.finfo(dtype).eps / 2) ** (2.0 / 3.0)


def check_dtype(dtype: torch.dtype, caller: str) -> None:
    """Refuse half-precision parameters, whose rounding leaves no usable step.

    Raises:
        HesdValueError: ``dtype`` is bfloat16 or float16.
    """
    if dtype in (torch.bfloat16, torch.float16):
        raise HesdValueError(
            f"{caller}(hvp_method='finite_difference'): the parameters are {str(dtype).replace('torch.', '')}, whose "
            f"rounding (unit roundoff {torch.finfo(dtype).eps / 2:.1e}) leaves no usable difference step. Analyse a "
            "float32 copy of the model (model.float()), or use hvp_method='auto' (products accumulated in float32)"
        )


def kink_note(model: nn.Module, dtype: torch.dtype) -> str | None:
    """The warning for finite differences on a model with :data:`KINKED_LAYERS`, or ``None``.

    Kinks written as functions (``F.relu``) are not seen; the module docs apply to them too.
    """
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, KINKED_LAYERS)})
    if not kinds:
        return None
    return (
        f"hesd: finite-difference products on a model with piecewise-linear layers ({', '.join(kinds)}): a "
        f"{str(dtype).replace('torch.', '')} difference step that crosses their kinks picks up the gradient's jumps "
        "there, an error of order one that a smaller step does not remove, and Lanczos finds such directions "
        "(hesd.operators.finite_difference measures it). Use an exact method (hvp_method='auto')"
    )


def check_model(model: nn.Module, dtype: torch.dtype, caller: str) -> None:
    """Before any work: refuse half precision (:func:`check_dtype`), warn about kinks (:func:`kink_note`)."""
    check_dtype(dtype, caller)
    note = kink_note(model, dtype)
    if note is not None:
        logger.warning(note)


def step_size(theta0: list[torch.Tensor], pieces: list[torch.Tensor], rel: float, tau: float) -> float:
    r""":math:`\varepsilon = r\, \lVert \tilde\theta \odot v\rVert / \lVert v \odot v\rVert` (module docs).

    ``theta0`` and ``pieces`` are the parameters and the direction, tensor by tensor;
    :math:`\tilde\theta_i^2 = \theta_i^2 + \tau^2`. Accumulated in float64, one tensor at a time.
    """
    num = sum(float(((p0.double() * d.double()) ** 2).sum()) for p0, d in zip(theta0, pieces, strict=True))
    v2 = sum(float((d.double() ** 2).sum()) for d in pieces)
    v4 = sum(float((d.double() ** 4).sum()) for d in pieces)
    return rel * math.sqrt(num + tau**2 * v2) / math.sqrt(v4)


def _gradient(objective: Objective, batch: LossBatch, index: int) -> torch.Tensor:
    with torch.enable_grad():
        loss = objective.loss(batch, index)
        return objective.layout.flatten(objective.gradient(loss, create_graph=False))


def finite_difference_product(
    objective: Objective, batch: LossBatch, index: int, V: torch.Tensor, w: float, rel: float,
    theta0: list[torch.Tensor], tau: float, out: torch.Tensor | None,
) -> torch.Tensor | None:  # fmt: skip
    """``out + w · H_b V`` by central differences of the batch's gradient, one column at a time.

    The parameters are left at ``theta0 + ε v`` or ``theta0 - ε v`` of the last column: the
    caller restores them (:func:`finite_difference_pass`).
    """
    layout = objective.layout
    fresh = out is None  # the first batch writes each column, the others add to it
    for j in range(V.shape[1]):
        v = V[:, j]
        v_norm = float(torch.linalg.vector_norm(v))
        if v_norm == 0.0 or not math.isfinite(v_norm):
            r = torch.zeros_like(v) if v_norm == 0.0 else torch.full_like(v, math.nan)
        else:
            pieces = layout.unflatten(v)
            eps = step_size(theta0, pieces, rel, tau)
            grads = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, p0, d in zip(layout.params, theta0, pieces, strict=True):
                        torch.add(p0, d.to(p0.dtype), alpha=sign * eps, out=p.data)
                grads.append(_gradient(objective, batch, index))
            r = (grads[0] - grads[1]) * (w / (2.0 * eps))
        out = layout.result(V.shape[1]) if out is None else out  # after the first column's gradients: not beside them
        if fresh:
            out[:, j] = r
        else:
            out[:, j] += r
    return out


def finite_difference_pass(state: FirstOrderState, objective: Objective, V: torch.Tensor, width: int) -> torch.Tensor:
    r""":math:`HV` by central differences of each batch's gradient (two gradients per batch and column).

    ``width`` is ignored: columns are differenced one at a time, all in one pass over the data.
    The step's relative size is ``objective.fd_step`` (module docs); the parameters are
    restored exactly afterwards, and the state's version counters with them.
    """
    del width
    layout = objective.layout
    check_dtype(layout.dtype, "HessianOperator")
    rel = objective.fd_step or relative_step(layout.dtype)
    theta0 = [p.detach().clone() for p in layout.params]
    count = sum(t.numel() for t in theta0)
    rms = math.sqrt(sum(float((t.double() ** 2).sum()) for t in theta0) / max(count, 1))
    tau = TAU * rms if rms > 0 else 1.0
    out = None
    try:
        with objective.forward.state(second_order=False):
            for index, batch in enumerate(objective.batches()):
                w = objective.contract.weight(batch.count, state.total)
                out = finite_difference_product(objective, batch, index, V, w, rel, theta0, tau, out)
    finally:
        with torch.no_grad():
            for p, p0 in zip(layout.params, theta0, strict=True):
                p.data.copy_(p0)
        state.versions = layout.versions()  # the values are restored bit for bit: kept state stays valid
    return out if out is not None else torch.zeros_like(V)
