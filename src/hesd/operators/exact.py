"""The dense Hessian, for small models and for checking everything else against."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .hessian import HessianOperator

__all__ = ["exact_hessian"]


def exact_hessian(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: Any,
    *,
    params: Sequence[str] | None = None,
    model_mode: str = "eval",
    chunk: int = 64,
) -> torch.Tensor:
    r"""The dense ``P × P`` Hessian of the mean loss, one block of columns at a time.

    Computed as :math:`H = H I` with :class:`HessianOperator` by recomputed double backward,
    one column per pass, through PyTorch's own BatchNorm kernel (``eval_batchnorm="native"``),
    so that it checks the default affine form and the batched paths independently. It is exact
    to rounding; the tests check it against central differences of the gradient. Memory is
    :math:`P^2` entries: meant for small models and tests.

    Args:
        model: as for :class:`HessianOperator`.
        loss_fn: as for :class:`HessianOperator`.
        data: as for :class:`HessianOperator`.
        params: as for :class:`HessianOperator`.
        model_mode: as for :class:`HessianOperator`.
        chunk: number of identity columns per call.

    Returns:
        The Hessian, ``(P, P)``, in the parameters' dtype and on their device.

    Examples:
        >>> import torch, hesd
        >>> model = torch.nn.Linear(2, 1).double()
        >>> X, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
        >>> H = hesd.exact_hessian(model, torch.nn.functional.mse_loss, (X, y))
        >>> H.shape, bool(torch.allclose(H, H.T))
        (torch.Size([3, 3]), True)
    """
    op = HessianOperator(
        model,
        loss_fn,
        data,
        params=params,
        model_mode=model_mode,
        check_deterministic=False,
        hvp_method="double_backward",
        eval_batchnorm="native",
        batch_columns=1,
    )
    P = op.shape[0]
    H = torch.empty(P, P, dtype=op.dtype, device=op.device)
    eye = torch.eye(P, dtype=op.dtype, device=op.device)
    for start in range(0, P, chunk):
        H[:, start : start + chunk] = op @ eye[:, start : start + chunk]
    return H
