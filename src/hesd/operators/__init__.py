"""Operators: Hessian-vector products over a model, a loss and data.

One concern per module: :mod:`~hesd.operators.linear` (the operator interface),
:mod:`~hesd.operators.layout` (parameters and flat vectors), :mod:`~hesd.operators.data`,
:mod:`~hesd.operators.loss` and :mod:`~hesd.operators.model_loss` (batches and the loss
contracts), :mod:`~hesd.operators.forward`
(the state forward passes run in), :mod:`~hesd.operators.first_order` (loss, gradient, kept
graphs), :mod:`~hesd.operators.products` (product methods), :mod:`~hesd.operators.tuning`
(choices made from timings), :mod:`~hesd.operators.support` (what PyTorch cannot
differentiate), :mod:`~hesd.operators.hessian` (the operator that composes them) and
:mod:`~hesd.operators.exact` (the dense Hessian).
"""

from .exact import exact_hessian
from .forward import model_state
from .hessian import HessianOperator
from .layout import ParameterLayout
from .linear import LinearOperator, MatrixOperator, ScipyOperator, as_operator
from .loss import LossBatch, LossContract, PairLoss
from .model_loss import BatchLoss, ModelLoss

__all__ = [
    "BatchLoss",
    "HessianOperator",
    "LinearOperator",
    "LossBatch",
    "LossContract",
    "MatrixOperator",
    "ModelLoss",
    "PairLoss",
    "ParameterLayout",
    "ScipyOperator",
    "as_operator",
    "exact_hessian",
    "model_state",
]
