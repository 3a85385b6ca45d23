"""Operators: Hessian-vector products over a model, a loss and data."""

from ._base import LinearOperator, MatrixOperator, ScipyOperator, as_operator
from .hessian import HessianOperator, exact_hessian

__all__ = ["HessianOperator", "LinearOperator", "MatrixOperator", "ScipyOperator", "as_operator", "exact_hessian"]
